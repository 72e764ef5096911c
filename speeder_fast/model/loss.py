"""Answer-token loss and label scoring without full-vocabulary logits at prompt positions.

A Speeder / LLaRA prompt is ~100 tokens of which a handful are the answer. The usual
``lm_head(hidden)`` over every position allocates ``[B, L, V]`` logits (64 x 110 x 32000 fp32 =
0.9 GB) only to ignore almost all of them. Here:

1. :func:`answer_indices` (collate time, CPU) lists the flat rows of the hidden states that predict
   an answer token (shift by one: position ``t`` predicts token ``t + 1``), never across the
   boundary of two packed examples;
2. :func:`gather_answer_hidden` picks those rows on the device with ``index_select`` (no sync when
   the indices were computed at collate time);
3. :func:`answer_token_loss` computes the mean cross-entropy from those rows and the ``lm_head``
   weight: with liger on CUDA, ``LigerFusedLinearCrossEntropyLoss`` (chunked; never holds the
   ``[n, V]`` fp32 logits at once); otherwise logits for the gathered rows only, CE in fp32;
4. :func:`label_logits` scores only the label-token rows of ``lm_head`` (score mode).
"""

from __future__ import annotations

import importlib

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
__all__ = ["IGNORE_INDEX", "answer_indices", "answer_token_loss", "gather_answer_hidden", "label_logits",
           "shift_labels"]


def shift_labels(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """``[B, L]`` labels -> labels aligned with the hidden state that predicts them:
    ``out[:, t] = labels[:, t + 1]``, last column ``ignore_index``. Apply per example before
    packing and the shift can never cross an example boundary."""
    out = torch.full_like(labels, ignore_index)
    out[:, :-1] = labels[:, 1:]
    return out


def answer_indices(labels: torch.Tensor, *, cu_seqlens: torch.Tensor | None = None, shifted: bool = False,
                   ignore_index: int = IGNORE_INDEX) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat row indices of the hidden states that predict answer tokens, and those tokens.

    Args:
        labels: ``[B, L]`` (padded) or ``[1, T]`` (packed) with ``ignore_index`` at non-answer
            positions.
        cu_seqlens: packed boundaries ``[B + 1]``; the last token of an example never predicts
            the first token of the next one.
        shifted: ``labels`` are already aligned with the predicting position (:func:`shift_labels`).
        ignore_index: the ignore value.

    Returns:
        ``(index [N] int64, targets [N] int64)``; ``index`` addresses ``hidden.reshape(-1, H)``.
        Call it at collate time on CPU tensors: on a GPU tensor the ``nonzero`` synchronises.
    """
    if labels.dim() != 2:
        raise ValueError(f"answer_indices: labels must be 2-D [B, L] or [1, T], got {tuple(labels.shape)}")
    tgt = labels if shifted else shift_labels(labels, ignore_index)
    keep = tgt != ignore_index
    if cu_seqlens is not None and not shifted:
        if labels.shape[0] != 1:
            raise ValueError("answer_indices: cu_seqlens given but labels are not one packed row [1, T]")
        ends = cu_seqlens[1:].long().to(labels.device) - 1  # last token of each example
        keep[0, ends] = False
    index = keep.reshape(-1).nonzero().squeeze(1)
    return index, tgt.reshape(-1).index_select(0, index).long()


def gather_answer_hidden(hidden: torch.Tensor, labels: torch.Tensor | None = None, *,
                         index: torch.Tensor | None = None, targets: torch.Tensor | None = None,
                         cu_seqlens: torch.Tensor | None = None, shifted: bool = False,
                         ignore_index: int = IGNORE_INDEX) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of ``hidden`` (``[B, L, H]`` or packed ``[1, T, H]``) that predict answer tokens.

    Pass ``index``/``targets`` from :func:`answer_indices` (computed at collate time) for a
    sync-free gather; or pass ``labels`` and they are computed here (one sync on GPU).

    Returns:
        ``(rows [N, H], targets [N])``.
    """
    if index is None:
        if labels is None:
            raise ValueError("gather_answer_hidden: pass labels, or index and targets")
        index, targets = answer_indices(labels, cu_seqlens=cu_seqlens, shifted=shifted, ignore_index=ignore_index)
    elif targets is None:
        raise ValueError("gather_answer_hidden: index given without targets")
    flat = hidden.reshape(-1, hidden.shape[-1])
    return flat.index_select(0, index.to(hidden.device)), targets.to(hidden.device)


def _liger_flce_cls():
    return importlib.import_module("liger_kernel.transformers").LigerFusedLinearCrossEntropyLoss


def answer_token_loss(hidden: torch.Tensor, lm_head_weight: torch.Tensor, targets: torch.Tensor,
                      use_liger: bool = False, *, lm_head_bias: torch.Tensor | None = None,
                      ignore_index: int = IGNORE_INDEX, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of ``targets`` given the rows that predict them.

    Args:
        hidden: ``[*, H]`` hidden states gathered at answer-predicting positions.
        lm_head_weight: ``[V, H]`` output-embedding weight.
        targets: ``[*]`` target token ids (``ignore_index`` rows are skipped).
        use_liger: on CUDA, use liger's chunked fused linear + cross-entropy (requires liger).
        lm_head_bias: optional ``[V]`` bias.
        ignore_index: target value to ignore.
        reduction: ``mean`` (over non-ignored rows) or ``sum``.

    Returns:
        Scalar loss (fp32). An empty selection gives 0 with a gradient path (not NaN).
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"answer_token_loss: reduction must be mean or sum, got {reduction!r}")
    h = hidden.reshape(-1, hidden.shape[-1])
    t = targets.reshape(-1).to(h.device).long()
    if h.shape[0] != t.shape[0]:
        raise ValueError(f"answer_token_loss: {h.shape[0]} hidden rows but {t.shape[0]} targets")
    if h.shape[0] == 0:
        return (h.sum() * 0.0 + lm_head_weight.sum() * 0.0).float()
    if use_liger:
        if not h.is_cuda:
            raise RuntimeError("answer_token_loss(use_liger=True) needs CUDA tensors (liger's kernels are Triton)")
        w = lm_head_weight if lm_head_weight.dtype == h.dtype else lm_head_weight.to(h.dtype)
        loss_fn = _liger_flce_cls()(ignore_index=ignore_index, reduction=reduction)
        return loss_fn(w, h.contiguous(), t, lm_head_bias).float()
    w = lm_head_weight if lm_head_weight.dtype == h.dtype else lm_head_weight.to(h.dtype)
    logits = F.linear(h, w, lm_head_bias)  # [n, V] for the answer rows only
    return F.cross_entropy(logits.float(), t, ignore_index=ignore_index, reduction=reduction)


def label_logits(hidden_at_answer: torch.Tensor, lm_head_weight: torch.Tensor, label_token_ids: torch.Tensor,
                 lm_head_bias: torch.Tensor | None = None) -> torch.Tensor:
    """Logits of only the label tokens: ``[B, H] x [N, H]^T -> [B, N]``, equal to the full
    ``lm_head`` logits indexed by ``label_token_ids`` (score mode ranks candidates by these)."""
    ids = label_token_ids.to(lm_head_weight.device).long()
    w = lm_head_weight.index_select(0, ids)
    if w.dtype != hidden_at_answer.dtype:
        w = w.to(hidden_at_answer.dtype)
    b = lm_head_bias.index_select(0, ids).to(w.dtype) if lm_head_bias is not None else None
    return F.linear(hidden_at_answer, w, b)
