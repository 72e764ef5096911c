"""Padding-free packing and token-budget batching."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from speeder_fast.model.packing import pack_padded, pack_sequences, token_budget_batches
from test_fastpath_helpers import var_batch


@pytest.mark.parametrize("left", [False, True])
def test_pack_padded_layout(left):
    lens = [5, 9, 1, 7]
    ids, mask, labels = var_batch(lens, left=left)
    pb = pack_padded(ids, mask, labels)
    t = sum(lens)
    assert pb.input_ids.shape == (1, t) and pb.position_ids.shape == (1, t)
    assert pb.cu_seqlens.dtype == torch.int32 and pb.cu_seqlens.tolist() == [0, 5, 14, 15, 22]
    assert pb.max_seqlen == 9 and isinstance(pb.max_seqlen, int)
    assert pb.seq_index.tolist() == sum(([i] * n for i, n in enumerate(lens)), [])
    expected_pos = sum((list(range(n)) for n in lens), [])
    assert pb.position_ids[0].tolist() == expected_pos
    # real tokens in order, extras packed the same way
    assert pb.input_ids[0].tolist() == ids[mask.bool()].tolist()
    assert pb.extras[0][0].tolist() == labels[mask.bool()].tolist()
    # unpack / pack_like round trip (padding filled)
    back = pb.unpack(pb.input_ids, fill=-7)
    assert torch.equal(back[mask.bool()], ids[mask.bool()]) and (back[~mask.bool()] == -7).all()
    emb = torch.randn(*ids.shape, 3)
    packed = pb.pack_like(emb)
    assert packed.shape == (1, t, 3)
    assert torch.equal(pb.unpack(packed)[mask.bool()], emb[mask.bool()])
    # per-example position -> packed index; last real token of every example
    first_real = mask.long().argmax(1)
    assert torch.equal(pb.padded_positions_to_packed(first_real), pb.cu_seqlens[:-1].long())
    assert torch.equal(pb.pack_positions(torch.tensor(lens) - 1), pb.last_positions())
    assert torch.equal(pb.input_ids[0, pb.last_positions()],
                       ids[torch.arange(4), first_real + torch.tensor(lens) - 1])
    assert (pb.padded_to_packed[~mask.bool()] == -1).all()


def test_pack_positions_2d_and_model_kwargs():
    ids, mask, _ = var_batch([3, 4])
    pb = pack_padded(ids, mask)
    idx = pb.pack_positions(torch.tensor([[0, 2], [1, 3]]))
    assert idx.tolist() == [[0, 2], [4, 6]]
    kw = pb.model_kwargs()
    assert set(kw) == {"position_ids", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k"}
    assert kw["max_length_q"] == 4 and kw["cu_seq_lens_q"] is pb.cu_seqlens


def test_pack_sequences_matches_pack_padded():
    seqs = [[4, 5, 6], [7], [8, 9]]
    lab = [[-100, 5, 6], [-100], [9, -100]]
    pb = pack_sequences(seqs, lab)
    assert pb.input_ids[0].tolist() == [4, 5, 6, 7, 8, 9]
    assert pb.extras[0][0].tolist() == [-100, 5, 6, -100, 9, -100]
    assert pb.position_ids[0].tolist() == [0, 1, 2, 0, 0, 1]
    with pytest.raises(ValueError, match="extra\\[0\\]\\[1\\] has length 2"):
        pack_sequences(seqs, [[1, 2, 3], [1, 2], [1, 2]])


def test_pack_padded_errors():
    ids, mask, _ = var_batch([3, 4])
    with pytest.raises(ValueError, match="no real token"):
        pack_padded(ids, torch.stack([mask[0], torch.zeros_like(mask[1])]))
    with pytest.raises(ValueError, match="must be 0/1"):
        pack_padded(ids, mask * 2)
    with pytest.raises(ValueError, match="extra\\[0\\] has shape"):
        pack_padded(ids, mask, ids[:, :2])
    with pytest.raises(ValueError, match="2-D"):
        pack_padded(ids[0], mask[0])


def test_to_keeps_host_int():
    ids, mask, _ = var_batch([3, 4])
    pb = pack_padded(ids, mask).to("cpu")
    assert isinstance(pb.max_seqlen, int) and pb.cu_seqlens.dtype == torch.int32


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("padded", [False, True])
def test_token_budget_batches_budget_and_coverage(shuffle, padded):
    rng = np.random.default_rng(3)
    lengths = rng.integers(20, 140, size=500)
    budget = 1000
    batches = token_budget_batches(lengths, budget, shuffle=shuffle, seed=7, padded=padded)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(500))  # every index exactly once
    for b in batches:
        cost = len(b) * max(lengths[b]) if padded else sum(lengths[b])
        assert cost <= budget
    # greedy: a batch is closed only when the next example would not fit
    for b, nxt in zip(batches[:-1], batches[1:]):
        cand = b + [nxt[0]]
        cost = len(cand) * max(lengths[cand]) if padded else sum(lengths[cand])
        assert cost > budget
    if shuffle:
        assert flat != list(range(500))
        assert batches == token_budget_batches(lengths, budget, shuffle=True, seed=7, padded=padded)
        assert batches != token_budget_batches(lengths, budget, shuffle=True, seed=8, padded=padded)
    else:
        assert flat == list(range(500))


def test_token_budget_batches_limits():
    lengths = [10, 50, 10, 10, 10]
    with pytest.raises(ValueError, match="example 1 has 50 tokens"):
        token_budget_batches(lengths, 40, shuffle=False)
    got = token_budget_batches(lengths, 40, shuffle=False, allow_oversize=True)
    assert got == [[0], [1], [2, 3, 4]]
    assert token_budget_batches([1] * 7, 100, shuffle=False, max_examples=3) == [[0, 1, 2], [3, 4, 5], [6]]
    with pytest.raises(ValueError, match="max_tokens"):
        token_budget_batches(lengths, 0)
    assert token_budget_batches([], 10) == []
