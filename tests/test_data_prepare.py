"""prepare(): cache, invalidation, persisted candidates, training candidates, stats, real data."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest

from speeder_fast.config import DataConfig
from speeder_fast.data import (
    CatalogueTooSmallError,
    format_stats,
    prepare,
    sample_train_candidates,
)


def write_synthetic(folder: Path, n_users: int = 40, n_items: int = 80, seed: int = 0, name: str = "syn") -> Path:
    """A small RecBole atomic dataset (every user 4..12 events) with a partial item table."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    lines = ["user_id:token\titem_id:token\trating:float\ttimestamp:float"]
    for u in range(n_users):
        n = int(rng.integers(4, 13))
        for t, i in enumerate(rng.choice(n_items, size=n, replace=False)):
            lines.append(f"user{u}\titem{i}\t{int(rng.integers(1, 6))}\t{1000 + 10 * t}")
    (folder / f"{name}.inter").write_text("\n".join(lines) + "\n")
    items = ["item_id:token\ttitle:token_seq\tbrand:token"]
    items += [f"item{i}\tTitle {i}\t{'B' if i % 3 else ''}" for i in range(0, n_items, 2)]  # odd items: no row
    (folder / f"{name}.item").write_text("\n".join(items) + "\n")
    return folder


def cfg_for(src: Path, cache: Path, **kw) -> DataConfig:
    kw.setdefault("user_kcore", 0)
    kw.setdefault("item_kcore", 0)
    kw.setdefault("n_candidates", 10)
    return DataConfig(source=str(src), cache_dir=str(cache), **kw)


@pytest.fixture
def logs(caplog):
    lg = logging.getLogger("speeder_fast")
    lg.addHandler(caplog.handler)
    caplog.set_level(logging.INFO, logger="speeder_fast")
    yield caplog
    lg.removeHandler(caplog.handler)


def user_items(prepared) -> list[set[int]]:
    return [set(s.tolist()) for s in prepared.dataset.sequences]


def assert_same(a, b) -> None:
    assert a.dataset.user_ids == b.dataset.user_ids and a.dataset.item_ids == b.dataset.item_ids
    assert a.dataset.item_text == b.dataset.item_text
    for x, y in zip(a.dataset.sequences, b.dataset.sequences):
        np.testing.assert_array_equal(x, y)
    for name in ("train", "valid", "test"):
        sa, sb = a.split(name), b.split(name)
        for f in ("users", "histories", "lengths", "targets"):
            np.testing.assert_array_equal(getattr(sa, f), getattr(sb, f))
    np.testing.assert_array_equal(a.valid_candidates, b.valid_candidates)
    np.testing.assert_array_equal(a.test_candidates, b.test_candidates)


def test_prepare_caches_and_reloads_identically(tmp_path, logs):
    src = write_synthetic(tmp_path / "src")
    cfg = cfg_for(src, tmp_path / "cache")
    a = prepare(cfg)
    assert "preparing" in logs.text and "using cached" not in logs.text
    files = sorted(p.name for p in Path(a.cache_dir).iterdir())
    assert files == ["candidates.safetensors", "data.safetensors", "ids.json", "item_text.json", "manifest.json"]
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.startswith(".")]  # no temp leftovers
    logs.clear()
    b = prepare(cfg)
    assert "using cached" in logs.text and "preparing" not in logs.text
    assert b.cache_dir == a.cache_dir
    assert_same(a, b)
    # persisted candidates are the returned ones
    from safetensors.numpy import load_file

    stored = load_file(str(Path(a.cache_dir) / "candidates.safetensors"))
    np.testing.assert_array_equal(stored["test"], a.test_candidates)
    assert stored["valid"].dtype == np.int64
    # an independent preparation (fresh cache) gives the very same candidates (seeded)
    c = prepare(cfg_for(src, tmp_path / "cache2"))
    assert_same(a, c)


def test_eval_candidates_properties(tmp_path):
    src = write_synthetic(tmp_path / "src", n_users=60, n_items=50)
    p = prepare(cfg_for(src, tmp_path / "cache", n_candidates=12))
    seen = user_items(p)
    for split in ("valid", "test"):
        cand, sa = p.candidates(split), p.split(split)
        assert cand.shape == (len(sa), 12) and cand.dtype == np.int64
        assert ((cand >= 0) & (cand < p.dataset.n_items)).all()
        assert ((cand == sa.targets[:, None]).sum(1) == 1).all()  # target exactly once
        for row, u, t in zip(cand, sa.users, sa.targets):
            assert len(set(row.tolist())) == 12  # distinct
            negs = set(row.tolist()) - {int(t)}
            assert not negs & seen[u]  # never-interacted items only
    # the target's position is spread out, not fixed
    pos = np.argmax(p.test_candidates == p.test.targets[:, None], axis=1)
    assert len(set(pos.tolist())) > 4


def test_train_candidates_deterministic_per_epoch(tmp_path):
    src = write_synthetic(tmp_path / "src")
    p = prepare(cfg_for(src, tmp_path / "cache"))
    a0 = sample_train_candidates(p, epoch=0, n=8, seed=3)
    b0 = sample_train_candidates(p, epoch=0, n=8, seed=3)
    a1 = sample_train_candidates(p, epoch=1, n=8, seed=3)
    other = sample_train_candidates(p, epoch=0, n=8, seed=4)
    np.testing.assert_array_equal(a0, b0)
    assert a0.shape == (len(p.train), 8) and a0.dtype == np.int64
    assert not np.array_equal(a0, a1) and not np.array_equal(a0, other)
    for c in (a0, a1):
        assert ((c == p.train.targets[:, None]).sum(1) == 1).all()
        for row, u, t in zip(c, p.train.users, p.train.targets):
            assert len(set(row.tolist())) == 8
            prefix = set(p.dataset.sequences[u][:-2].tolist())
            assert not (set(row.tolist()) - {int(t)}) & prefix


def test_catalogue_too_small(tmp_path):
    folder = tmp_path / "tiny"
    folder.mkdir()
    rows = ["user_id:token\titem_id:token"] + [f"u\t{i}" for i in "abcd"] + ["v\ta", "v\tb", "v\te"]
    (folder / "tiny.inter").write_text("\n".join(rows) + "\n")
    with pytest.raises(CatalogueTooSmallError, match=r"data\.n_candidates=3 needs 2 never-interacted items per user "
                       r".*1 of 2 users have fewer.*set data\.n_candidates <= 2"):
        prepare(cfg_for(folder, tmp_path / "cache", n_candidates=3))  # u saw 4 of 5 items, needs 2


def test_cache_invalidation_on_input_and_option_change(tmp_path, logs):
    src = write_synthetic(tmp_path / "src")
    cache = tmp_path / "cache"
    a = prepare(cfg_for(src, cache))
    # option changes that affect the persisted result -> different entry
    dirs = {a.cache_dir}
    for kw in ({"seed": 7}, {"n_candidates": 9}, {"user_kcore": 5}, {"item_kcore": 2},
               {"drop_consecutive_duplicates": True}, {"max_users": 10}, {"min_user_events": 5}):
        logs.clear()
        p = prepare(cfg_for(src, cache, **kw))
        assert "preparing" in logs.text, kw
        assert p.cache_dir not in dirs, kw
        dirs.add(p.cache_dir)
    assert not np.array_equal(prepare(cfg_for(src, cache, seed=7)).test_candidates, a.test_candidates)
    # windows only: same entry, same candidates, new splits
    h = prepare(cfg_for(src, cache, max_history=3))
    assert h.cache_dir == a.cache_dir and h.train.histories.shape[1] == 3
    np.testing.assert_array_equal(h.test_candidates, a.test_candidates)
    # changed input content -> re-prepared, stale entry not used
    inter = src / "syn.inter"
    inter.write_text(inter.read_text() + "userNEW\titem1\t5\t1\nuserNEW\titem2\t5\t2\nuserNEW\titem3\t5\t3\n")
    logs.clear()
    b = prepare(cfg_for(src, cache))
    assert "preparing" in logs.text and b.cache_dir != a.cache_dir
    assert "userNEW" in b.dataset.user_ids and "userNEW" not in a.dataset.user_ids
    # changed item text (.item file) -> re-prepared too
    item = src / "syn.item"
    item.write_text(item.read_text().replace("Title 0\t", "Renamed 0\t"))
    c = prepare(cfg_for(src, cache))
    assert c.cache_dir != b.cache_dir and "Renamed 0" in c.dataset.item_text["title"]
    # same content but a new mtime -> new key as well (mtime is part of the fingerprint)
    st = item.stat()
    os.utime(item, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert prepare(cfg_for(src, cache)).cache_dir != c.cache_dir


def test_broken_cache_entry_is_rebuilt(tmp_path, logs):
    src = write_synthetic(tmp_path / "src")
    cfg = cfg_for(src, tmp_path / "cache")
    a = prepare(cfg)
    (Path(a.cache_dir) / "data.safetensors").write_bytes(b"garbage")
    logs.clear()
    b = prepare(cfg)
    assert "unreadable" in logs.text and "preparing" in logs.text
    assert_same(a, b)
    assert prepare(cfg).cache_dir == a.cache_dir


def test_item_without_text_and_stats(tmp_path):
    src = write_synthetic(tmp_path / "src")
    p = prepare(cfg_for(src, tmp_path / "cache"))
    ds = p.dataset
    odd = [j for j, raw in enumerate(ds.item_ids) if int(raw[4:]) % 2]
    assert odd and all(ds.item_text["title"][j] == "" for j in odd)
    s = p.stats()
    assert s["users"] == ds.n_users and s["items"] == ds.n_items
    assert s["interactions"] == ds.n_interactions == sum(len(x) for x in ds.sequences)
    assert s["density"] == pytest.approx(ds.n_interactions / (ds.n_users * ds.n_items))
    assert s["valid_examples"] == s["test_examples"] == ds.n_users
    assert s["train_examples"] == sum(len(x) - 3 for x in ds.sequences)
    assert 0.3 < s["text_coverage"]["title"] < 0.7  # only even items have a row
    assert s["text_coverage"]["title"] == pytest.approx(1 - len(odd) / ds.n_items)
    table = format_stats(s)
    assert "interactions" in table and "title" in table and f"{ds.n_users:,}" in table
    assert json.loads(json.dumps(s)) == s  # JSON-serialisable


def test_short_users_dropped_in_prepare(tmp_path):
    folder = tmp_path / "s"
    folder.mkdir()
    rows = ["user_id:token\titem_id:token\ttimestamp:float"]
    rows += [f"long{u}\ti{(u + k) % 30}\t{k}" for u in range(8) for k in range(5)]
    rows += ["one\ti1\t0", "two\ti1\t0", "two\ti2\t1"]
    (folder / "s.inter").write_text("\n".join(rows) + "\n")
    p = prepare(cfg_for(folder, tmp_path / "cache", min_user_events=2, n_candidates=5))
    assert "one" not in p.dataset.user_ids and "two" not in p.dataset.user_ids  # 3 is the floor
    assert p.manifest["filter"]["short_users_dropped"] == 2
    assert p.dataset.n_users == 8


def test_movielens_source_maps_text(tmp_path, monkeypatch):
    folder = tmp_path / "ml"
    folder.mkdir()
    rows = ["user_id:token\titem_id:token\trating:float\ttimestamp:float"]
    rows += [f"{u}\t{i}\t4\t{100 * u + i}" for u in range(1, 7) for i in range(1, 9) if (u + i) % 4]
    (folder / "ml-100k.inter").write_text("\n".join(rows) + "\n")
    items = ["item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq"]
    items += [f"{i}\tMovie {i}\t{1990 + i}\tAction Sci-Fi" for i in range(1, 8)]
    (folder / "ml-100k.item").write_text("\n".join(items) + "\n")
    fake = types.ModuleType("speeder_fast.assets")
    fake.fetch_movielens_100k = lambda: folder
    monkeypatch.setitem(sys.modules, "speeder_fast.assets", fake)
    p = prepare(DataConfig(source="ml-100k", cache_dir=str(tmp_path / "cache"), user_kcore=0, item_kcore=0,
                           n_candidates=3))
    ds = p.dataset
    assert ds.name == "ml-100k" and Path(p.cache_dir).name.startswith("ml-100k-")
    j = ds.item_ids.index("3")
    assert ds.item_text["title"][j] == "Movie 3 (1993)"
    assert ds.item_text["categories"][j] == "Action, Sci-Fi"
    assert ds.item_text["release_year"][j] == "1993"
    assert ds.item_text["title"][ds.item_ids.index("8")] == ""  # no item row


# ---------------------------------------------------------------------------------- real data


def test_real_amazon_office(shared_data, tmp_path):
    src = shared_data / "amazon-office"
    t = time.perf_counter()
    p = prepare(DataConfig(source=str(src), cache_dir=str(tmp_path)))  # defaults: user 5-core, no item k-core
    elapsed = time.perf_counter() - t
    s = p.stats()
    print("\n" + format_stats(s) + f"\nprepare: {elapsed:.2f}s")
    assert (s["users"], s["items"], s["interactions"]) == (3231, 3317, 22447)  # already user 5-core
    assert s["min_seq_len"] >= 5 and s["test_examples"] == 3231
    assert s["train_examples"] == 22447 - 3 * 3231
    assert s["text_coverage"]["title"] > 0.95 and 0.85 < s["text_coverage"]["description"] < 1.0
    # item 5-core is far from a no-op on this set (it was rebuilt from evaluation windows)
    k5 = prepare(DataConfig(source=str(src), cache_dir=str(tmp_path), item_kcore=5)).stats()
    assert (k5["users"], k5["items"], k5["interactions"]) == (1183, 642, 7548)
    assert elapsed < 10


def test_real_amazon_beauty_5core_preserved(shared_data, tmp_path):
    src = shared_data / "amazon-beauty"
    t = time.perf_counter()
    p = prepare(DataConfig(source=str(src), cache_dir=str(tmp_path), user_kcore=5, item_kcore=5, max_history=200))
    elapsed = time.perf_counter() - t
    s = p.stats()
    print("\n" + format_stats(s) + f"\nprepare: {elapsed:.2f}s")
    assert (s["users"], s["items"], s["interactions"]) == (22363, 12101, 198502)
    assert p.manifest["filter"]["kcore_interactions_dropped"] == 0
    assert s["train_examples"] == 198502 - 3 * 22363
    assert p.train.histories.shape == (s["train_examples"], 200)
    assert elapsed < 15  # measured 1.3 s (fresh, H=200) on a shared 2-core CPU
    q = prepare(DataConfig(source=str(src), cache_dir=str(tmp_path), user_kcore=5, item_kcore=5, max_history=200))
    assert q.cache_dir == p.cache_dir
    np.testing.assert_array_equal(q.test_candidates, p.test_candidates)
    c = sample_train_candidates(p, epoch=0, n=20, seed=0)
    assert ((c == p.train.targets[:, None]).sum(1) == 1).all()


# ------------------------------------------------------------------ issue 14: benchmark files, duplicates


def test_benchmark_split_used_as_given_with_item_text_and_candidates(tmp_path):
    """NAME.{train,valid,test}.inter: valid/test targets are the given rows (not a leave-one-out re-split of
    the train file), item text comes from NAME.item, candidates are persisted as for any source."""
    from test_data_readers import write_benchmark

    folder = write_benchmark(tmp_path / "bench")
    for src in (folder, folder / "bench.train.inter"):
        p = prepare(cfg_for(src, tmp_path / "cache", n_candidates=2))
        ids = p.dataset.item_ids
        users = [p.dataset.user_ids[u] for u in p.test.users]
        assert {u: ids[t] for u, t in zip(users, p.test.targets)} == {"u1": "e", "u2": "b", "u3": "b"}
        assert {u: ids[t] for u, t in zip(users, p.valid.targets)} == {"u1": "d", "u2": "a", "u3": "a"}
        train = {(p.dataset.user_ids[u], ids[t]) for u, t in zip(p.train.users, p.train.targets)}
        assert train == {("u1", "c"), ("u1", "a"), ("u2", "d"), ("u3", "g"), ("u3", "h")}  # train rows only
        assert p.dataset.item_text["title"] == [f"Title {i}" for i in ids]
        assert p.manifest["split"] == "given (RecBole benchmark files)"
        assert p.test_candidates.shape == (3, 2) and (Path(p.cache_dir) / "candidates.safetensors").is_file()
        for row, t in zip(p.test_candidates, p.test.targets):
            assert (row == t).sum() == 1
    assert p.stats()["split"] == "given (RecBole benchmark files)"


def test_benchmark_split_refuses_filters_that_move_targets(tmp_path):
    from test_data_readers import write_benchmark

    from speeder_fast.config import ConfigError

    folder = write_benchmark(tmp_path / "bench")
    with pytest.raises(ConfigError, match=r"benchmark split is used as given.*data\.item_kcore=2 \(set 0\)"):
        prepare(cfg_for(folder, tmp_path / "cache", item_kcore=2, n_candidates=2))
    with pytest.raises(ConfigError, match=r"data\.drop_duplicates=on"):
        prepare(cfg_for(folder, tmp_path / "cache", drop_duplicates="on", n_candidates=2))
    # whole users may go: u2 has 4 events, user_kcore=5 drops it; the others keep their split
    p = prepare(cfg_for(folder, tmp_path / "cache", user_kcore=5, n_candidates=2))
    assert p.dataset.user_ids == ["u1", "u3"]
    assert [p.dataset.item_ids[int(t)] for t in p.test.targets] == ["e", "b"]


def _amazon_with_repeated_reviews(folder: Path) -> Path:
    """Amazon 2023 reviews where a crawl repeated review lines (same user, item, time), not adjacent."""
    folder.mkdir()
    rows = []
    for u in range(6):
        for j in range(5):
            rows.append({"user_id": f"U{u}", "parent_asin": f"P{(u + j) % 30}", "timestamp": 1000 * j})
    rows.append(dict(rows[4]))  # U0's last review again, at the end of the file
    rows.insert(7, dict(rows[9]))  # U1's last review again, in the middle
    (folder / "Cat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "meta_Cat.jsonl").write_text("".join(json.dumps({"parent_asin": f"P{i}", "title": f"T{i}"}) + "\n"
                                                   for i in range(30)))
    return folder


def test_exact_duplicates_dropped_by_default_for_raw_amazon(tmp_path):
    src = _amazon_with_repeated_reviews(tmp_path / "amz")
    p = prepare(cfg_for(src, tmp_path / "cache", n_candidates=5))  # data.drop_duplicates = auto
    s = p.stats()
    assert s["exact_duplicates_dropped"] == 2 and s["interactions"] == 30
    assert "exact_duplicates_dropped" in format_stats(s)
    last_hist = p.test.histories[np.arange(len(p.test)), p.test.lengths - 1]
    assert not (last_hist == p.test.targets).any()  # no test target repeats the last history item
    off = prepare(cfg_for(src, tmp_path / "cache", n_candidates=5, drop_duplicates="off"))
    assert off.stats()["exact_duplicates_dropped"] == 0 and off.stats()["interactions"] == 32
    assert off.cache_dir != p.cache_dir
    last_hist = off.test.histories[np.arange(len(off.test)), off.test.lengths - 1]
    assert (last_hist == off.test.targets).sum() == 2  # what the option prevents


def test_drop_duplicates_auto_is_off_for_atomic_files(tmp_path):
    src = write_synthetic(tmp_path / "src")
    rows = (src / "syn.inter").read_text().splitlines()
    (src / "syn.inter").write_text("\n".join(rows + [rows[1]]) + "\n")  # an exact repeat of user0's first event
    auto = prepare(cfg_for(src, tmp_path / "cache"))
    assert auto.stats()["exact_duplicates_dropped"] == 0
    on = prepare(cfg_for(src, tmp_path / "cache", drop_duplicates="on"))
    assert on.stats()["exact_duplicates_dropped"] == 1
    assert on.stats()["interactions"] == auto.stats()["interactions"] - 1
