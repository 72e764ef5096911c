"""Padding-free packing (``pack_padded``, the builder's ``pack_numpy``) and token-budget batching
(``training.batches.plan_token_batches``, what ``train.max_tokens_per_batch`` runs)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from speeder_fast.model.packing import pack_padded
from speeder_fast.model.prompts import pack_numpy
from speeder_fast.training.batches import plan_token_batches
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


@pytest.mark.parametrize("side", ["right", "left"])
def test_pack_numpy_matches_pack_padded(side):
    """The builder packs on the host with numpy (``pack_numpy``); it equals ``pack_padded`` field by field."""
    lens = [5, 9, 1, 7]
    ids, mask, labels = var_batch(lens, left=side == "left")
    a = pack_padded(ids, mask, labels)
    b = pack_numpy(np.asarray(lens), ids.shape[1], side, ids.numpy(), labels.numpy())
    for f in ("input_ids", "position_ids", "cu_seqlens", "seq_index", "lengths", "flat_index", "padded_to_packed"):
        x, y = getattr(a, f), getattr(b, f)
        assert x.dtype == y.dtype and torch.equal(x, y), f
    assert torch.equal(a.extras[0], b.extras[0])
    assert a.max_seqlen == b.max_seqlen == 9 and a.padded_shape == b.padded_shape == (4, 9)


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


@pytest.mark.parametrize("padded", [False, True])
def test_plan_token_batches_budget_coverage_and_greedy(padded):
    rng = np.random.default_rng(3)
    lengths = rng.integers(20, 140, size=500)
    order = rng.permutation(500)
    budget = 1000
    batches, n_over = plan_token_batches(order, lengths, budget, 1, padded)
    assert n_over == 0
    np.testing.assert_array_equal(np.concatenate(batches), order)  # consecutive, every example once

    def cost(b):
        return len(b) * lengths[b].max() if padded else lengths[b].sum()

    assert all(cost(b) <= budget for b in batches)
    # greedy: a batch is closed only when the next example would not fit
    for b, nxt in zip(batches[:-1], batches[1:]):
        assert cost(np.append(b, nxt[0])) > budget


def test_plan_token_batches_limits():
    lengths = np.array([10, 50, 10, 10, 10])
    batches, n_over = plan_token_batches(np.arange(5), lengths, 40)
    assert [b.tolist() for b in batches] == [[0], [1], [2, 3, 4]] and n_over == 1  # oversize: a batch of its own
    with pytest.raises(ValueError, match="max_tokens_per_batch"):
        plan_token_batches(np.arange(5), lengths, 0)
    assert plan_token_batches(np.arange(0), lengths, 10) == ([], 0)
