"""``model.sasrec_fusion``: attach the run's SASRec to a trained model for scoring, and pick its weight.

The fusion itself (``log_softmax(head) + w * log_softmax(SASRec)``) is :mod:`speeder_fast.model.fusion`.
Here: :func:`tune_fusion_weight` scores the validation split once, the head and SASRec apart, and
ranks every weight of :data:`~speeder_fast.model.fusion.FUSION_GRID` from those two score matrices
(batch by batch: memory stays ``batch x n_items``); :func:`attach_fusion` builds the fusion of a run
from ``RUN/sasrec.safetensors`` with the fixed weight, the weight in ``RUN/sasrec_fusion.json``, or
(``tune=True``) a weight picked now and written there. The train CLI calls it after training, on the
checkpoint it evaluates; ``load_run`` (evaluate, recommend) reads the file.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from speeder_fast.data.dataset import PreparedData
from speeder_fast.utils import atomic_write_json

#: the picked weight of ``model.sasrec_fusion=auto`` and the validation metrics of every weight tried
FUSION_FILE = "sasrec_fusion.json"
#: the validation metric ``auto`` maximises (ties: the smaller weight)
FUSION_METRIC = "full_NDCG@10"


@torch.no_grad()
def tune_fusion_weight(model: Any, builder: Any, prepared: PreparedData, split: str = "valid",
                       max_examples: int = 0, batch_size: int = 16, device: torch.device | str = "cpu",
                       seed: int = 0, grid: Sequence[float] | None = None, progress: bool = True) -> dict[str, Any]:
    """Pick the fusion weight ``w`` of ``model.fusion`` on ``split`` (default: validation).

    Args:
        model: an item-mode :class:`~speeder_fast.model.SpeederRecModel` with :attr:`fusion` set.
        builder, prepared: the run's prompt builder and data; the examples are those
            :func:`speeder_fast.evaluate.evaluate_split` scores (``max_examples``, ``seed``; 0 = all).
        grid: weights to try (default :data:`~speeder_fast.model.fusion.FUSION_GRID`).

    Returns:
        ``{"weight", "metric", "split", "n", "seconds", "grid": [{"weight", "HR@1", ..., "full_NDCG@10"}]}``:
        the weight with the best :data:`FUSION_METRIC` (ties: the smaller weight) and every weight's
        metrics (candidate and full-catalogue, as :func:`~speeder_fast.evaluate.summarize`).

    Raises:
        ValueError: the model has no fusion, or is not item mode; an empty or negative grid.

    Every rank of a ``torchrun`` job computes the same thing on all the examples (no sharding).
    """
    from tqdm.auto import tqdm

    from speeder_fast.evaluate import ranks_from_scores, select_examples, split_histories, summarize
    from speeder_fast.features.crossfit import fold_batches, row_folds
    from speeder_fast.model.fusion import FUSION_GRID, fuse_scores

    fu = getattr(model, "fusion", None)
    if fu is None or getattr(model, "item_head", None) is None:
        raise ValueError("tune_fusion_weight needs an item-mode model with a SASRec fusion (model.fusion)")
    ws = [float(w) for w in (FUSION_GRID if grid is None else grid)]
    if not ws or min(ws) < 0:
        raise ValueError(f"fusion grid must be non-empty and >= 0, got {ws}")
    sa = prepared.split(split)
    cands = prepared.candidates(split)
    idx = select_examples(len(sa), max_examples, seed)
    was_training, saved = model.training, fu.weight
    model.eval()
    t0 = time.perf_counter()
    cr: list[list[np.ndarray]] = [[] for _ in ws]
    fr: list[list[np.ndarray]] = [[] for _ in ws]
    try:
        fu.set_weight(0.0)  # model.score = the head alone
        plan = fold_batches(idx, row_folds(model, sa.users[idx]), batch_size)  # cross-fitting: one fold a batch
        for rows, fold in tqdm(plan, desc=f"fusion weight on {split}", unit="batch", disable=not progress,
                               leave=False):
            batch = builder.build(sa.histories[rows], sa.lengths[rows], cands[rows], sa.targets[rows],
                                  with_answer=False, padding_side="right").to(device)
            batch.fold = fold
            head = model.score(batch).float()
            lp = model.fusion_log_probs(batch.slot_item, batch.slot_abs, batch.unique_items)
            hist = split_histories(prepared, split, rows)
            for j, w in enumerate(ws):
                r, f = ranks_from_scores(fuse_scores(head, lp, w), cands[rows], sa.targets[rows], hist)
                cr[j].append(r)
                fr[j].append(f)
    finally:
        fu.set_weight(saved)
        if was_training:
            model.train()
    table = []
    for j, w in enumerate(ws):
        r = np.concatenate(cr[j]) if cr[j] else np.zeros(0, np.int64)
        f = np.concatenate(fr[j]) if fr[j] else np.zeros(0, np.int64)
        m = summarize(r == 0, np.ones(len(r), bool), r, f)
        m.pop("VHR@1", None)
        m.pop("ValidRatio", None)
        table.append({"weight": w, **m})
    best = max(table, key=lambda row: (row.get(FUSION_METRIC, 0.0), -row["weight"]))
    return {"weight": best["weight"], "metric": FUSION_METRIC, "split": split, "n": int(len(idx)),
            "seconds": time.perf_counter() - t0, "grid": table}


def parse_fusion_spec(spec: str) -> float | None:
    """The weight of a ``--sasrec-fusion`` value: None for ``off`` / ``auto``, else ``float(spec)``.

    Raises:
        UsageError: neither off, auto nor a number >= 0.
    """
    from speeder_fast.errors import UsageError

    if spec in ("off", "auto"):
        return None
    try:
        w = float(spec)
    except ValueError:
        w = -1.0
    if not w >= 0:  # also NaN
        raise UsageError(f"--sasrec-fusion must be off, auto or a weight >= 0, got {spec!r}")
    return w


def fusion_line(info: dict[str, Any] | None) -> str:
    """One line saying how a loaded run scores: the SASRec fusion weight and where it came from, or off."""
    if info is None:
        return "SASRec fusion: off (the next-item head alone)"
    if "grid" in info:
        return fusion_weight_line(info)
    return f"SASRec fusion: weight {info['weight']:g} ({info['source']})"


def fusion_weight_line(info: dict[str, Any]) -> str:
    """One log line: the picked weight and its validation metric against the head alone (weight 0)."""
    by_w = {row["weight"]: row for row in info["grid"]}
    m = info["metric"]
    base = by_w.get(0.0, {}).get(m)
    got = by_w[info["weight"]].get(m)
    vs = f" (head alone: {base:.4f})" if base is not None else ""
    return (f"SASRec fusion: weight {info['weight']:g} picked on {info['n']} {info['split']} examples, "
            f"{m} {got:.4f}{vs}")


def attach_fusion(comp: Any, run_dir: str | Path, tune: bool = False, progress: bool = True,
                  spec: str | None = None, write: bool | None = None) -> dict[str, Any] | None:
    """Set ``comp.model.fusion`` as ``model.sasrec_fusion`` (or ``spec``) says; returns the fusion info.

    Args:
        comp: the run's :class:`~speeder_fast.training.run.Components` (trained weights loaded).
        run_dir: the run folder (its ``sasrec.safetensors``, and ``sasrec_fusion.json`` for ``auto``).
        tune: ``auto`` picks the weight now (:func:`tune_fusion_weight` on the validation split,
            ``eval.max_examples`` examples) and writes ``RUN/sasrec_fusion.json`` (temp file + rename);
            without it, ``auto`` reads that file. ``write=False`` tunes without writing (the other ranks
            of a ``torchrun`` job: each tunes the same weight, rank 0 writes it); default: ``tune``.
        spec: overrides the config (the evaluate CLI's ``--sasrec-fusion``): ``off``, ``auto`` (tuned
            now, nothing written to the run folder) or a weight ``w >= 0``.

    Returns:
        None when off; else ``{"weight", "source", ...}`` (``source``: fixed | RUN/sasrec_fusion.json |
        tuned, plus the tuning record when tuned).

    Raises:
        FileNotFoundError: ``RUN/sasrec.safetensors`` is missing; ``auto`` without ``tune`` and without
            ``RUN/sasrec_fusion.json``.
        UsageError: a ``spec`` that is none of off / auto / a non-negative number; a run that is not
            item mode.
        CheckpointError: the SASRec's catalogue is not the run's.
    """
    import json

    from speeder_fast.errors import CheckpointError, UsageError
    from speeder_fast.features.sasrec import load_sasrec
    from speeder_fast.model.fusion import SasrecFusion
    from speeder_fast.training.run import SASREC_FILE

    cfg, model = comp.cfg, comp.model
    mode, weight = cfg.model.sasrec_fusion, cfg.model.sasrec_fusion_weight
    write = tune if write is None else bool(write)
    if spec is not None:
        write = False
        if spec in ("off", "auto"):
            mode, tune = spec, spec == "auto"
        else:
            weight = parse_fusion_spec(spec)
            mode = "fixed"
    if mode == "off":
        model.fusion = None
        return None
    if getattr(model, "item_head", None) is None or model.mome is None:
        raise UsageError("SASRec fusion scores the whole catalogue: it needs an item-mode run (prompt.answer_mode=item)")
    run_dir = Path(run_dir)
    sp = run_dir / SASREC_FILE
    if not sp.is_file():
        raise FileNotFoundError(f"{sp} missing: model.sasrec_fusion reads the run's reference SASRec from it")
    sas = load_sasrec(sp)
    if sas.n_items != model.mome.n_items:
        raise CheckpointError(f"{sp}: SASRec has {sas.n_items} items, the run's catalogue {model.mome.n_items}")
    model.fusion = SasrecFusion(sas).to(comp.device)
    if mode == "fixed":
        model.fusion.set_weight(weight)
        return {"weight": float(weight), "source": "fixed"}
    fp = run_dir / FUSION_FILE
    if not tune:
        if not fp.is_file():
            model.fusion = None
            raise FileNotFoundError(f"{fp} missing: model.sasrec_fusion=auto runs read their picked weight from it "
                                    "(the train CLI writes it after training)")
        info = json.loads(fp.read_text())
        model.fusion.set_weight(info["weight"])
        return {"weight": float(info["weight"]), "source": FUSION_FILE}
    info = tune_fusion_weight(model, comp.builder, comp.prepared, "valid", cfg.eval.max_examples, cfg.eval.batch_size,
                              comp.device, seed=cfg.seed, progress=progress)
    model.fusion.set_weight(info["weight"])
    if write:
        atomic_write_json(fp, info)
    return {**info, "source": "tuned"}
