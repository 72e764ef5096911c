"""Cross-fitted collab features (``features.sasrec_crossfit = K``): honest features for every window.

Why: a SASRec item table remembers the transitions it trained on (on amazon-office its training
transitions rank 3.6x better than unseen ones; ``benchmarks/sasrec_leakage_check.py``). When the
LLM trains on those same transitions over that table, the collab modality looks far more
predictive in training than at test time, and the LLM learns to copy it. ``features.sasrec_holdout``
fixes this for one target per user; cross-fitting fixes it for every training window:

1. users are split into ``K`` seeded folds (:func:`user_folds`);
2. SASRec ``k`` trains on every user outside fold ``k``
   (:meth:`~speeder_fast.data.dataset.PreparedData.without_users`), so no transition of a fold-``k``
   user is in its item table;
3. each fold table is mapped into the reference SASRec's space by orthogonal Procrustes over the
   items both trained on (:func:`procrustes_align`), so that one MoME collab expert reads them all;
4. every training batch holds one fold's windows and reads that fold's table
   (:class:`~speeder_fast.model.mome.MoME` ``using_fold``), and so does every scoring batch
   (validation, test, the fusion weight search, ``recommend``: :func:`fold_batches`): each user is
   always read through the table that never saw them, in training and at test time alike. (Reading
   the reference table at test time instead is worse: the fold tables agree with it only up to a
   Procrustes residual of 0.4-0.8, so the collab expert would meet features unlike its training
   ones; measured in docs/speeder.md.)

This is the cross-fitting of double machine learning (Chernozhukov et al., Econometrics Journal
2018) and the out-of-fold predictions of stacking (Wolpert, Neural Networks 1992), applied to the
features of a second-stage model.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from ..utils import get_logger

log = get_logger("speeder_fast.features")


def user_folds(n_users: int, k: int, seed: int) -> np.ndarray:
    """int64 ``[n_users]``: each user's fold in ``0..k-1``, balanced (fold sizes differ by at most
    one) and a function of ``(n_users, k, seed)`` only.

    Raises:
        ValueError: ``k < 2`` or ``k > n_users``.
    """
    if k < 2 or k > n_users:
        raise ValueError(f"cross-fitting needs 2 <= K <= n_users ({n_users}), got K={k}")
    folds = np.empty(n_users, np.int64)
    folds[np.random.default_rng([int(seed), 0x5A5]).permutation(n_users)] = np.arange(n_users) % k
    return folds


def fold_batches(rows: np.ndarray, folds: np.ndarray | None, batch_size: int) -> list[tuple[np.ndarray, int | None]]:
    """``rows`` cut into batches of at most ``batch_size`` that each hold one collab fold:
    ``[(rows of the batch, fold), ...]``. Rows keep their order within a fold; folds come in
    increasing order, and rows of fold ``-1`` (users without one) come last with fold None. Without
    ``folds`` (None): consecutive batches of ``rows`` with fold None. The scoring loops use it so
    that every user is scored through the collab table that never saw them.

    Args:
        rows: int ``[n]`` row indices (of a split, or of a list of users).
        folds: int ``[n]``, the fold of each row (``-1``: none), or None.
    """
    rows = np.asarray(rows)
    if folds is None:
        return [(rows[s:s + batch_size], None) for s in range(0, len(rows), batch_size)]
    folds = np.asarray(folds, dtype=np.int64)
    out: list[tuple[np.ndarray, int | None]] = []
    for f in [f for f in np.unique(folds) if f >= 0] + ([-1] if (folds < 0).any() else []):
        sel = rows[folds == f]
        out.extend((sel[s:s + batch_size], None if f < 0 else int(f)) for s in range(0, len(sel), batch_size))
    return out


def row_folds(model: Any, users: np.ndarray) -> np.ndarray | None:
    """The collab fold of each of ``users`` (int ``[n]`` user indices, ``-1`` = unknown) under
    ``model``'s cross-fitting (:attr:`MoME.user_folds`), ``-1`` for unknown users; None when the
    model has no cross-fitted tables."""
    uf = getattr(getattr(model, "mome", None), "user_folds", None)
    if uf is None:
        return None
    users = np.asarray(users, dtype=np.int64)
    ok = (users >= 0) & (users < len(uf))
    return np.where(ok, uf[np.clip(users, 0, len(uf) - 1)], -1)


def procrustes_align(x: torch.Tensor, ref: torch.Tensor, common: torch.Tensor) -> tuple[torch.Tensor, float]:
    """``x`` rotated into ``ref``'s space: ``(x @ R, residual)``.

    ``R`` (``[d, d]``, orthogonal) minimises ``||x[common] @ R - ref[common]||_F`` (orthogonal
    Procrustes, Schoenemann 1966: ``R = U V^T`` for the SVD ``x^T ref = U S V^T``); ``residual`` is
    that minimum over ``||ref[common]||_F`` (0 = the tables agree up to a rotation, about 1.41 for
    unrelated ones).

    Args:
        x, ref: float ``[n_items, d]`` item tables.
        common: bool ``[n_items]``, the items both tables trained on (the fit uses only these rows;
            every row is rotated).

    Raises:
        ValueError: shapes differ, or fewer than ``d`` common items.
    """
    if x.shape != ref.shape or common.shape != x.shape[:1]:
        raise ValueError(f"procrustes_align: shapes {tuple(x.shape)}, {tuple(ref.shape)}, {tuple(common.shape)}")
    a, b = x[common].double(), ref[common].double()
    if a.shape[0] < x.shape[1]:
        raise ValueError(f"procrustes_align: {a.shape[0]} common items, need at least d={x.shape[1]}")
    u, _, vt = torch.linalg.svd(a.T @ b)
    r = u @ vt
    res = float(torch.linalg.norm(a @ r - b) / torch.linalg.norm(b).clamp_min(1e-12))
    return (x.double() @ r).to(x.dtype), res


def crossfit_tables(prepared: Any, scfg: Any, k: int, ref: torch.Tensor, ref_mask: torch.Tensor,
                    device: Any = "cpu", progress: bool = True) -> tuple[list[tuple[torch.Tensor, torch.Tensor]],
                                                                          np.ndarray, dict]:
    """Train the ``k`` fold SASRecs and align their item tables to ``ref``.

    Args:
        prepared: :class:`~speeder_fast.data.dataset.PreparedData` (all users).
        scfg: the :class:`~speeder_fast.features.sasrec.SASRecConfig` of the reference SASRec (every
            fold trains with the same settings and seed).
        k: folds (``features.sasrec_crossfit``).
        ref, ref_mask: the reference SASRec's item table ``[n_items, d]`` and trained-item mask.

    Returns:
        ``(tables, folds, info)``: per fold ``(features [n_items, d] float32, mask [n_items] bool)``
        in the reference space (items the fold never trained on: zero rows, mask False); each user's
        fold (:func:`user_folds`); per fold its users, best epoch, validation NDCG@10, Procrustes
        residual and seconds.
    """
    from .sasrec import sasrec_item_embeddings, train_sasrec

    folds = user_folds(prepared.dataset.n_users, k, scfg.seed)
    tables, info = [], {"k": k, "folds": []}
    for f in range(k):
        t0 = time.perf_counter()
        seen = prepared.without_users(folds == f)
        sas, metrics = train_sasrec(seen, scfg, device=device, progress=progress)
        x, mask = sasrec_item_embeddings(sas, seen)
        common = mask & ref_mask.bool()
        xa, res = procrustes_align(x.float(), ref.float(), common)
        xa[~mask] = 0.0
        tables.append((xa.float().cpu(), mask.cpu()))
        fi = {"fold": f, "users_left_out": int((folds == f).sum()), "best_epoch": metrics.get("best_epoch"),
              "valid_full_NDCG@10": (metrics.get("valid_full") or {}).get("NDCG@10"),
              "items_trained": int(mask.sum()), "procrustes_residual": res, "seconds": time.perf_counter() - t0}
        info["folds"].append(fi)
        log.info("cross-fit fold %d/%d: SASRec without %d users, best epoch %s, valid NDCG@10 %.4f, "
                 "Procrustes residual %.3f (%.0f s)", f + 1, k, fi["users_left_out"], fi["best_epoch"],
                 fi["valid_full_NDCG@10"] or float("nan"), res, fi["seconds"])
    return tables, folds, info
