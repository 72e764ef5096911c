"""Filtering (k-core, duplicates, short users, max_users, re-indexing) and leave-one-out splits."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from speeder_fast.data import RecDataset, filter_dataset, leave_one_out
from speeder_fast.data.splits import seq_offsets


def make_ds(seqs: dict[str, list[str]], text: bool = True) -> RecDataset:
    items: dict[str, int] = {}
    sequences = []
    for s in seqs.values():
        sequences.append(np.array([items.setdefault(x, len(items)) for x in s], dtype=np.int64))
    item_ids = list(items)
    item_text = {"title": [f"T{x}" for x in item_ids]} if text else {}
    return RecDataset("toy", list(seqs), item_ids, sequences, item_text)


def as_raw(ds: RecDataset) -> dict[str, list[str]]:
    return {ds.user_ids[u]: [ds.item_ids[i] for i in s.tolist()] for u, s in enumerate(ds.sequences)}


def test_kcore_hand_checked_cascade():
    # user_k = item_k = 2. Round 1 drops items 3 and 5 (1 event each); then D has 1 event -> out;
    # then item 4 has 1 event -> out; then C has 1 event -> out. Left: A, B over items 1, 2.
    ds = make_ds({"A": ["1", "2", "3"], "B": ["1", "2"], "C": ["1", "4"], "D": ["4", "5"]})
    out, rep = filter_dataset(ds, user_kcore=2, item_kcore=2, min_user_events=0)
    assert as_raw(out) == {"A": ["1", "2"], "B": ["1", "2"]}
    assert out.item_ids == ["1", "2"] and out.user_ids == ["A", "B"]
    assert out.item_text["title"] == ["T1", "T2"]  # text follows re-indexing
    assert (rep.kcore_users_dropped, rep.kcore_items_dropped, rep.kcore_interactions_dropped) == (2, 3, 5)
    # a k-core is a fixed point
    again, rep2 = filter_dataset(out, user_kcore=2, item_kcore=2, min_user_events=0)
    assert as_raw(again) == as_raw(out) and rep2.kcore_interactions_dropped == 0


def test_kcore_sides_independent_and_off():
    ds = make_ds({"A": ["1", "2", "3"], "B": ["1"], "C": ["1", "2"]})
    out, _ = filter_dataset(ds, user_kcore=2, item_kcore=0, min_user_events=0)
    assert as_raw(out) == {"A": ["1", "2", "3"], "C": ["1", "2"]}
    out, _ = filter_dataset(ds, user_kcore=0, item_kcore=2, min_user_events=0)
    assert as_raw(out) == {"A": ["1", "2"], "B": ["1"], "C": ["1", "2"]}
    out, _ = filter_dataset(ds, user_kcore=0, item_kcore=0, min_user_events=0)
    assert as_raw(out) == as_raw(ds)


def test_drop_consecutive_duplicates():
    ds = make_ds({"A": ["1", "1", "2", "1", "2", "2", "2"], "B": ["2", "2", "3"]})
    out, rep = filter_dataset(ds, drop_duplicates=True, min_user_events=0)
    assert as_raw(out) == {"A": ["1", "2", "1", "2"], "B": ["2", "3"]}
    assert rep.duplicates_dropped == 4
    kept, _ = filter_dataset(ds, drop_duplicates=False, min_user_events=0)
    assert as_raw(kept) == as_raw(ds)


def test_short_users_dropped_with_logged_count(caplog):
    lg = logging.getLogger("speeder_fast")
    lg.addHandler(caplog.handler)
    try:
        ds = make_ds({"A": ["1", "2", "3"], "B": ["1"], "C": ["2", "3"], "D": ["3", "1", "2", "4"]})
        out, rep = filter_dataset(ds, min_user_events=3)
    finally:
        lg.removeHandler(caplog.handler)
    assert out.user_ids == ["A", "D"]
    assert rep.short_users_dropped == 2
    assert "dropped 2 users with fewer than 3 events" in caplog.text


def test_short_user_drop_reapplies_item_kcore():
    # C is short (2 < 3); dropping it leaves item 9 with one event, which item 2-core then removes.
    ds = make_ds({"A": ["1", "2", "9", "3"], "B": ["1", "2", "1", "3"], "C": ["9", "2"]})
    out, rep = filter_dataset(ds, user_kcore=0, item_kcore=2, min_user_events=3)
    assert as_raw(out) == {"A": ["1", "2", "3"], "B": ["1", "2", "1", "3"]}
    assert rep.short_users_dropped == 1


def test_max_users_first_in_input_order():
    ds = make_ds({"z": ["1", "2", "3"], "a": ["4", "5", "6"], "m": ["1", "4", "7"]})
    out, rep = filter_dataset(ds, max_users=2)
    assert out.user_ids == ["z", "a"]  # input (first appearance) order, not sorted ids
    assert out.item_ids == ["1", "2", "3", "4", "5", "6"]  # item 7 unused -> dropped
    assert rep.max_users_dropped == 1


def test_nothing_left_is_an_error():
    with pytest.raises(ValueError, match="no users left"):
        filter_dataset(make_ds({"A": ["1", "2"]}), user_kcore=5)


# ---------------------------------------------------------------------------------- splits


def _split(seqs: list[list[int]], H: int, cap: int = 0):
    lengths = np.array([len(s) for s in seqs])
    flat = np.concatenate([np.array(s, dtype=np.int64) for s in seqs])
    return leave_one_out(flat, seq_offsets(lengths), H, cap)


def _rows(sa):
    return [(int(u), sa.histories[i, : sa.lengths[i]].tolist(), int(t))
            for i, (u, t) in enumerate(zip(sa.users, sa.targets))]


def test_leave_one_out_hand_checked():
    train, valid, test = _split([[10, 11, 12, 13, 14], [20, 21, 22]], H=2)
    assert _rows(test) == [(0, [12, 13], 14), (1, [20, 21], 22)]
    assert _rows(valid) == [(0, [11, 12], 13), (1, [20], 21)]
    assert _rows(train) == [(0, [10], 11), (0, [10, 11], 12)]  # user 1's prefix [20] has no target
    for sa in (train, valid, test):
        assert sa.histories.dtype == np.int64 and sa.histories.shape[1] == 2
        for i in range(len(sa)):
            assert (sa.histories[i, sa.lengths[i]:] == -1).all()
    assert train.histories.tolist() == [[10, -1], [10, 11]]


def test_leave_one_out_long_history_200():
    seq = list(range(1000, 1250))  # 250 events
    train, valid, test = _split([seq, [1, 2, 3, 4]], H=200)
    assert test.histories.shape == (2, 200)
    assert test.lengths.tolist() == [200, 3]
    assert test.histories[0].tolist() == seq[49:249] and test.targets[0] == seq[249]
    assert valid.histories[0].tolist() == seq[48:248] and valid.targets[0] == seq[248]
    assert test.histories[1].tolist() == [1, 2, 3] + [-1] * 197
    assert len(train) == 247 + 1
    # window t=230 of user 0: history seq[30:230], target seq[230]
    i = 229
    assert train.users[i] == 0 and train.targets[i] == seq[230]
    assert train.histories[i].tolist() == seq[30:230]
    # window t=5: short history, padded
    assert train.histories[4].tolist() == seq[0:5] + [-1] * 195
    assert train.lengths[:200].tolist() == list(range(1, 201))
    assert _rows(train)[-1] == (1, [1], 2)


def test_max_train_examples_keeps_most_recent():
    train, _, _ = _split([[1, 2, 3, 4, 5, 6], [7, 8, 9, 10, 11]], H=3, cap=3)
    # user 0 windows target 2,3,4 ; user 1 windows target 8,9 ; keep the last of each, then the next
    assert [(int(u), int(t)) for u, t in zip(train.users, train.targets)] == [(0, 3), (0, 4), (1, 9)]


def test_leave_one_out_rejects_short_users():
    with pytest.raises(ValueError, match="needs >= 3 events"):
        _split([[1, 2, 3], [4, 5]], H=3)
