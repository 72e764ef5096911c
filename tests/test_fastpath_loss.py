"""Answer-token loss, label scoring and the answer-row gather."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from speeder_fast.model.loss import (IGNORE_INDEX, answer_indices, answer_token_loss, gather_answer_hidden,
                                     label_logits, shift_labels)
from speeder_fast.model.packing import pack_padded
from test_fastpath_helpers import var_batch

CUDA = torch.cuda.is_available()


def _setup(seed=0, v=53, h=16):
    torch.manual_seed(seed)
    lens = [6, 9, 4]
    ids, mask, labels = var_batch(lens, answer_len=3)
    ids = ids % v
    labels = torch.where(labels == IGNORE_INDEX, labels, labels % v)
    hidden = torch.randn(len(lens), ids.shape[1], h, dtype=torch.float64)
    w = torch.randn(v, h, dtype=torch.float64)
    return ids, mask, labels, hidden, w


def test_answer_token_loss_equals_full_logits_ce():
    ids, mask, labels, hidden, w = _setup()
    logits = hidden @ w.T  # [B, L, V] full reference
    ref = F.cross_entropy(logits[:, :-1].reshape(-1, w.shape[0]), labels[:, 1:].reshape(-1), ignore_index=-100)
    rows, tgt = gather_answer_hidden(hidden, labels)
    assert rows.shape[0] == 3 * 3  # 3 answer tokens per example
    got = answer_token_loss(rows, w, tgt)
    torch.testing.assert_close(got, ref.float(), atol=1e-6, rtol=1e-6)
    s = answer_token_loss(rows, w, tgt, reduction="sum")
    torch.testing.assert_close(s, ref.float() * 9, atol=1e-5, rtol=1e-6)
    bias = torch.randn(w.shape[0], dtype=torch.float64)
    ref_b = F.cross_entropy((logits + bias)[:, :-1].reshape(-1, w.shape[0]), labels[:, 1:].reshape(-1))
    torch.testing.assert_close(answer_token_loss(rows, w, tgt, lm_head_bias=bias), ref_b.float(), atol=1e-6,
                               rtol=1e-6)


def test_answer_token_loss_gradients_match():
    ids, mask, labels, hidden, w = _setup(1)
    h1, w1 = hidden.clone().requires_grad_(True), w.clone().requires_grad_(True)
    h2, w2 = hidden.clone().requires_grad_(True), w.clone().requires_grad_(True)
    F.cross_entropy((h1 @ w1.T)[:, :-1].reshape(-1, w.shape[0]), labels[:, 1:].reshape(-1)).backward()
    rows, tgt = gather_answer_hidden(h2, labels)
    answer_token_loss(rows, w2, tgt).backward()
    torch.testing.assert_close(h2.grad, h1.grad)
    torch.testing.assert_close(w2.grad, w1.grad)


def test_packed_gather_respects_boundaries():
    ids, mask, labels, hidden, w = _setup(2)
    pb = pack_padded(ids, mask, labels)
    packed_hidden = pb.pack_like(hidden)
    rows_p, tgt_p = gather_answer_hidden(hidden, labels)
    rows_k, tgt_k = gather_answer_hidden(packed_hidden, pb.extras[0], cu_seqlens=pb.cu_seqlens)
    assert torch.equal(tgt_p, tgt_k) and torch.equal(rows_p, rows_k)
    # labels on the FIRST token of an example would be predicted by the previous example's last
    # token if the shift crossed a boundary: cu_seqlens must stop that
    lab = pb.extras[0].clone()
    lab[0, pb.cu_seqlens[1:-1].long()] = 5
    idx, _ = answer_indices(lab, cu_seqlens=pb.cu_seqlens)
    assert not set((pb.cu_seqlens[1:-1].long() - 1).tolist()) & set(idx.tolist())
    idx_naive, _ = answer_indices(lab)
    assert set((pb.cu_seqlens[1:-1].long() - 1).tolist()) <= set(idx_naive.tolist())
    # pre-shifted labels (shift per example before packing) give the same rows
    shifted = pack_padded(ids, mask, shift_labels(labels)).extras[0]
    idx_s, tgt_s = answer_indices(shifted, shifted=True)
    idx_c, tgt_c = answer_indices(pb.extras[0], cu_seqlens=pb.cu_seqlens)
    assert torch.equal(idx_s, idx_c) and torch.equal(tgt_s, tgt_c)


def test_label_logits_equals_indexed_full_logits():
    torch.manual_seed(3)
    h, w, b = torch.randn(5, 16), torch.randn(40, 16), torch.randn(40)
    label_ids = torch.tensor([7, 3, 39, 0, 3])
    full = h @ w.T + b
    torch.testing.assert_close(label_logits(h, w, label_ids, b), full[:, label_ids])
    torch.testing.assert_close(label_logits(h, w, label_ids), (h @ w.T)[:, label_ids])
    assert label_logits(h, w, label_ids).shape == (5, 5)


def test_empty_and_errors():
    w = torch.randn(10, 4, requires_grad=True)
    h = torch.zeros(0, 4, requires_grad=True)
    loss = answer_token_loss(h, w, torch.zeros(0, dtype=torch.long))
    assert loss.item() == 0.0
    loss.backward()
    with pytest.raises(ValueError, match="3 hidden rows but 2 targets"):
        answer_token_loss(torch.randn(3, 4), w, torch.tensor([1, 2]))
    with pytest.raises(RuntimeError, match="needs CUDA"):
        answer_token_loss(torch.randn(3, 4), w, torch.tensor([1, 2, 3]), use_liger=True)
    with pytest.raises(ValueError, match="pass labels"):
        gather_answer_hidden(torch.randn(1, 3, 4))
    with pytest.raises(ValueError, match="one packed row"):
        answer_indices(torch.zeros(2, 3, dtype=torch.long), cu_seqlens=torch.tensor([0, 3, 6]))


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA (liger fused linear cross-entropy)")
def test_gpu_liger_flce_matches_torch():
    from speeder_fast.model.liger import liger_available

    if not liger_available():
        pytest.skip("liger-kernel not installed")
    torch.manual_seed(4)
    n, h, v = 300, 256, 32000
    hid = (torch.randn(n, h, device="cuda") * 0.5).to(torch.bfloat16)
    w = (torch.randn(v, h, device="cuda") * 0.05).to(torch.bfloat16)
    tgt = torch.randint(0, v, (n,), device="cuda")
    tgt[::7] = IGNORE_INDEX
    h1, w1 = hid.clone().requires_grad_(True), w.clone().requires_grad_(True)
    h2, w2 = hid.clone().requires_grad_(True), w.clone().requires_grad_(True)
    ref = answer_token_loss(h1, w1, tgt, use_liger=False)
    got = answer_token_loss(h2, w2, tgt, use_liger=True)
    assert abs(got.item() - ref.item()) < 1e-2 * max(1.0, abs(ref.item()))
    ref.backward()
    got.backward()
    assert F.cosine_similarity(h1.grad.float().flatten(), h2.grad.float().flatten(), dim=0) > 0.99
    assert F.cosine_similarity(w1.grad.float().flatten(), w2.grad.float().flatten(), dim=0) > 0.99
