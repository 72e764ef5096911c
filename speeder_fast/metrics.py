"""Ranking metrics shared by SASRec and the LLM evaluation.

Every metric is computed from the **0-based rank** of the target item among the scored items:
rank 0 means the target scored highest. Two conventions are fixed here and used everywhere:

* **Ties are pessimistic.** An item whose score *equals* the target's is ranked above it, so a
  model that gives every item the same score gets the worst rank ``C - 1`` (not a lucky 0).
* **NaN target score = worst rank** (``C - 1``). NaN scores of *other* items are never counted
  as beating the target (comparisons with NaN are false).

``hit_rate(ranks, k)`` = fraction of examples with ``rank < k``;
``ndcg(ranks, k)`` = mean of ``1 / log2(rank + 2)`` over examples with ``rank < k`` (0 otherwise),
which is the usual single-relevant-item NDCG (the ideal DCG is 1).
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

DEFAULT_HR_KS = (1, 5, 10, 20)
DEFAULT_NDCG_KS = (5, 10, 20)


def _as_tensor(x, dtype=None) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x if dtype is None else x.to(dtype)
    return torch.as_tensor(np.asarray(x), dtype=dtype)


def rank_of_target(scores, target_idx, check: bool = True) -> torch.Tensor:
    """0-based rank of ``scores[i, target_idx[i]]`` within row ``i`` (pessimistic ties).

    Args:
        scores: ``[n, C]`` float scores (torch or numpy); higher = better. Excluded items may be
            set to ``-inf`` beforehand (they then never beat a finite target).
        target_idx: ``[n]`` integer column of the target in each row.
        check: validate ``target_idx`` range (one host sync; pass False inside GPU loops).

    Returns:
        ``[n]`` int64 tensor on ``scores``' device: number of *other* columns whose score is
        ``>=`` the target's (NaN target -> ``C - 1``).
    """
    s = _as_tensor(scores)
    if s.dim() != 2:
        raise ValueError(f"rank_of_target: scores must be 2-D [n, C], got shape {tuple(s.shape)}")
    t = _as_tensor(target_idx, torch.long).to(s.device)
    if t.dim() != 1 or t.shape[0] != s.shape[0]:
        raise ValueError(f"rank_of_target: target_idx must be [n={s.shape[0]}], got shape {tuple(t.shape)}")
    n, c = s.shape
    if check and n and (bool((t < 0).any()) or bool((t >= c).any())):
        raise ValueError(f"rank_of_target: target_idx out of range [0, {c})")
    tgt = s.gather(1, t[:, None])  # [n, 1]
    # >= counts the target itself once; subtract it. NaN target: every comparison is False.
    rank = (s >= tgt).sum(dim=1) - 1
    return torch.where(torch.isnan(tgt[:, 0]), torch.full_like(rank, c - 1), rank)


def exclude_items(scores: torch.Tensor, rows, items) -> torch.Tensor:
    """Set ``scores[rows[j], items[j]] = -inf`` in place (RecBole's history masking) and return ``scores``.

    Args:
        scores: ``[n, n_items]`` float tensor, modified in place.
        rows / items: ``[m]`` int pairs (tensors or arrays; any order, repeats allowed).
    """
    r = _as_tensor(rows, torch.long).to(scores.device)
    i = _as_tensor(items, torch.long).to(scores.device)
    scores.index_put_((r, i), torch.tensor(float("-inf"), dtype=scores.dtype, device=scores.device))
    return scores


def full_ranks(scores, target_items, hist_rows, hist_items) -> torch.Tensor:
    """0-based ranks of each row's target among **all** items, the row's history items excluded.

    This is the full-ranking protocol of RecBole (and of the SASRec / S3-Rec / DuoRec code): every
    item the user interacted with before the target gets ``-inf``, except the target itself when it
    is a repeat; ties stay pessimistic (:func:`rank_of_target`).

    Args:
        scores: ``[n, n_items]`` float scores (not modified).
        target_items: ``[n]`` target item ids.
        hist_rows / hist_items: ``[m]`` int pairs ``(row, item)``: item ``hist_items[j]`` is in the
            history of row ``hist_rows[j]`` (any order, repeats allowed).

    Returns:
        ``[n]`` int64 ranks on ``scores``' device.
    """
    s = _as_tensor(scores).float().clone()
    t = _as_tensor(target_items, torch.long).to(s.device)
    tscore = s.gather(1, t[:, None])
    exclude_items(s, hist_rows, hist_items)
    s.scatter_(1, t[:, None], tscore)  # the target is never excluded
    return rank_of_target(s, t, check=False)


#: the full-ranking metrics reported next to the candidate ones (keys ``full_HR@k`` / ``full_NDCG@k``)
FULL_HR_KS = (1, 10, 20)
FULL_NDCG_KS = (10, 20)


def _ranks(ranks) -> torch.Tensor:
    r = _as_tensor(ranks, torch.long)
    if r.dim() != 1:
        raise ValueError(f"ranks must be 1-D, got shape {tuple(r.shape)}")
    if r.numel() == 0:
        raise ValueError("ranking metric of an empty set of examples is undefined")
    if bool((r < 0).any()):
        raise ValueError("ranks must be >= 0 (0 = target ranked first)")
    return r


def hit_rate(ranks, k: int) -> float:
    """HR@k: fraction of examples whose 0-based target rank is ``< k``."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    r = _ranks(ranks)
    return float((r < k).double().mean())


def ndcg(ranks, k: int) -> float:
    """NDCG@k for one relevant item per example: ``mean(1/log2(rank+2) if rank < k else 0)``."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    r = _ranks(ranks).double()
    gain = torch.where(r < k, 1.0 / torch.log2(r + 2.0), torch.zeros_like(r))
    return float(gain.mean())


def mrr(ranks, k: int | None = None) -> float:
    """Mean reciprocal rank (``1/(rank+1)``), optionally truncated at ``k``."""
    r = _ranks(ranks).double()
    rr = 1.0 / (r + 1.0)
    if k is not None:
        rr = torch.where(r < k, rr, torch.zeros_like(rr))
    return float(rr.mean())


def ranking_metrics(ranks, hr_ks: Sequence[int] = DEFAULT_HR_KS,
                    ndcg_ks: Sequence[int] = DEFAULT_NDCG_KS) -> dict[str, float]:
    """``{"HR@k": ..., "NDCG@k": ..., "MRR": ..., "n": ...}`` from 0-based ranks."""
    r = _ranks(ranks)
    out: dict[str, float] = {f"HR@{k}": hit_rate(r, k) for k in hr_ks}
    out.update({f"NDCG@{k}": ndcg(r, k) for k in ndcg_ks})
    out["MRR"] = mrr(r)
    out["n"] = int(r.numel())
    return out


def dcg_weight(rank: int) -> float:
    """``1/log2(rank+2)``: the NDCG gain of a hit at 0-based ``rank`` (for hand checks/docs)."""
    return 1.0 / math.log2(rank + 2)
