"""Evaluate a trained run on the persisted validation/test candidates.

    python -m speeder_fast.evaluate --run runs/DIR [--split test] [--mode score|generate|item]
                                    [--max-examples N] [--batch-size B] [--checkpoint final]
                                    [--compile off|auto|static|default|reduce-overhead|max-autotune]
                                    [--constrained on|off] [--prefix-cache on|off]

Metrics (every example has ``N`` persisted candidates that contain the target once):

* ``VHR@1``: correct answers / all examples (an invalid answer is a miss) -- the Speeder metric.
* ``ValidRatio``: valid answers / all examples. Score mode always answers validly (the argmax over
  the candidate label tokens); in generate mode with ``eval.constrained`` (default) decoding is
  restricted to the candidates' titles (:mod:`speeder_fast.model.decoding`), so every answer is
  valid; with ``eval.constrained=false`` (the plain LLaRA protocol) an answer is valid iff the free
  greedy continuation equals exactly one candidate's title.
* ``decoded_tokens_mean`` (generate mode): tokens decoded per example (constrained: up to the first
  prefix that names one candidate; plain: up to and including eos, at most
  ``eval.generate_max_tokens``); ``constrained_ties``: constrained answers that ended with several
  candidates of identical titles (the first was taken).
* ``HR@1``: correct / valid answers (LLaRA's convention).
* ``HR@5``, ``HR@10``, ``NDCG@5``, ``NDCG@10``: from the ranking of the candidates (score mode: the
  label-token logits; item mode: the next-item head's scores of the candidates).
* ``full_HR@{1,10,20}``, ``full_NDCG@{10,20}`` (item mode, and always for the SASRec / popularity
  rows): the target ranked among **all** items, the user's history items excluded (RecBole's
  full-ranking protocol, :func:`speeder_fast.metrics.full_ranks`); comparable with the published
  sequential-recommendation literature.

Results are broken down by history length, written to ``eval_<split>_<mode>.json`` (+ ``.md``)
in the run folder, and printed as a markdown table. A SASRec row (the collaborative encoder
ranking the same persisted candidates) is added when the run trained one (``sasrec.safetensors``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from speeder_fast.data.dataset import PreparedData
from speeder_fast.distributed import gather_tensor, get_rank, get_world_size, shard_indices_for_eval
from speeder_fast.config import ANSWER_MODES, COMPILE_MODES, PRECISIONS, SPLITS
from speeder_fast.metrics import FULL_HR_KS, FULL_NDCG_KS, full_ranks, hit_rate, ndcg, rank_of_target
from speeder_fast.errors import UsageError
from speeder_fast.utils import atomic_write_json, atomic_write_text, get_logger

log = get_logger("speeder_fast.evaluate")

#: history-length buckets (inclusive bounds) for the breakdown
BUCKETS = ((1, 3), (4, 6), (7, 9), (10, 10**9))


def bucket_name(lo: int, hi: int) -> str:
    return f"{lo}+" if hi >= 10**9 else f"{lo}-{hi}"


def select_examples(n: int, max_examples: int, seed: int = 0) -> np.ndarray:
    """Indices of the evaluated examples: all, or a seeded random subset of ``max_examples`` (sorted)."""
    if max_examples <= 0 or max_examples >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, max_examples, replace=False))


def summarize(correct: np.ndarray, valid: np.ndarray, ranks: np.ndarray | None,
              full: np.ndarray | None = None) -> dict[str, Any]:
    """Metric dict of one group of examples (see module docstring). ``ranks``: 0-based target ranks
    among the candidates; ``full``: among all items, history excluded (``full_HR@k``, ``full_NDCG@k``)."""
    n = int(len(correct))
    out: dict[str, Any] = {"n": n}
    if n == 0:
        return out
    nv = int(valid.sum())
    out["VHR@1"] = float(correct.sum() / n)
    out["ValidRatio"] = float(nv / n)
    out["HR@1"] = float(correct.sum() / nv) if nv else 0.0
    if ranks is not None:
        r = torch.from_numpy(ranks)
        for k in (5, 10):
            out[f"HR@{k}"] = hit_rate(r, k)
        for k in (5, 10):
            out[f"NDCG@{k}"] = ndcg(r, k)
    if full is not None:
        f = torch.from_numpy(full)
        out.update({f"full_HR@{k}": hit_rate(f, k) for k in FULL_HR_KS})
        out.update({f"full_NDCG@{k}": ndcg(f, k) for k in FULL_NDCG_KS})
    return out


def split_histories(prepared: PreparedData, split: str, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(rows, items)``: every item of the *whole* history of the examples ``idx`` of ``split``
    (the user's sequence before the held-out target, not only the prompt's last ``max_history``
    items), as pairs for :func:`speeder_fast.metrics.full_ranks` (row = position in ``idx``)."""
    seqs = prepared.dataset.sequences
    cut = 2 if split == "valid" else 1
    hists = [seqs[int(u)][: len(seqs[int(u)]) - cut] for u in prepared.split(split).users[idx]]
    rows = np.repeat(np.arange(len(hists), dtype=np.int64), [len(h) for h in hists])
    items = np.concatenate(hists).astype(np.int64) if hists else np.zeros(0, np.int64)
    return rows, items


def ranks_from_scores(scores: torch.Tensor, cands: np.ndarray, targets: np.ndarray,
                      hist: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Candidate ranks and full-ranking ranks of ``targets`` from catalogue ``scores [n, n_items]``.

    ``cands [n, N]`` are the persisted candidates (the target exactly once), ``hist`` the
    :func:`split_histories` pairs of these rows. Pessimistic ties in both.
    """
    c = torch.from_numpy(np.ascontiguousarray(cands)).to(scores.device)
    t = torch.from_numpy(np.ascontiguousarray(targets)).to(scores.device)
    cr = rank_of_target(scores.gather(1, c), (c == t[:, None]).long().argmax(1), check=False)
    fr = full_ranks(scores, t, hist[0], hist[1])
    return cr.cpu().numpy(), fr.cpu().numpy()


@torch.no_grad()
def evaluate_split(
    model: Any,
    builder: Any,
    prepared: PreparedData,
    split: str,
    mode: str = "score",
    max_examples: int = 0,
    batch_size: int = 16,
    generate_max_tokens: int = 48,
    device: torch.device | str = "cpu",
    seed: int = 0,
    progress: bool = True,
    compile_mode: str = "off",
    length_multiple: int = 16,
    constrained: bool = True,
) -> dict[str, Any]:
    """Score or generate answers for ``split`` with ``model`` and return the metric dict.

    ``compile_mode`` / ``length_multiple`` (config ``eval.compile`` / ``eval.length_multiple``):
    score mode on static shapes through :class:`~speeder_fast.model.static.StaticScorer` (same
    scores; compiled and, with ``reduce-overhead`` on CUDA, replayed as CUDA graphs).
    ``constrained`` (config ``eval.constrained``): generate mode decodes only candidate titles and
    stops at the first prefix naming one candidate (else free greedy text, string-matched). The
    prefix KV cache follows ``model.prefix_cache`` (config ``eval.prefix_cache``); the result
    records both (``constrained``, ``prefix_cache_tokens``: the cached prefix length, 0 = off).

    Under ``torchrun`` every rank must call it: each scores a contiguous shard of the selected
    examples (:func:`~speeder_fast.distributed.shard_indices_for_eval`) and the per-example results
    are gathered, so every rank returns the metrics over all examples. A cross-fitted model
    (``features.sasrec_crossfit``) scores each user through its own collab fold
    (:func:`~speeder_fast.features.crossfit.fold_batches`).
    """
    from tqdm.auto import tqdm

    from speeder_fast.model.llm import match_generated

    if mode not in ANSWER_MODES:
        raise UsageError(f"mode must be one of {', '.join(ANSWER_MODES)}, got {mode!r}")
    if (mode == "item") != bool(getattr(builder, "item_mode", False)):
        raise UsageError(f"--mode {mode}: does not fit a run trained with prompt.answer_mode={builder.answer_mode} "
                         "(the next-item head is item mode only)")
    sa = prepared.split(split)
    cands = prepared.candidates(split)
    idx = select_examples(len(sa), max_examples, seed)
    n_selected = len(idx)
    world = get_world_size()
    if world > 1:
        shard = shard_indices_for_eval(len(idx), world, get_rank())
        idx = idx[shard.start:shard.stop]
    from speeder_fast.model.static import resolve_compile, score_function

    was_training = model.training
    model.eval()
    if mode in ("score", "item"):
        score_fn = score_function(model, compile_mode, device, batch_size, length_multiple, builder.pad_id)
    elif resolve_compile(compile_mode, device) != "off":
        log.info("eval.compile=%s applies to score mode only; generating eagerly", compile_mode)
    t0 = time.perf_counter()
    correct, valid, ranks, fulls, ptoks, hlen, texts, decoded = [], [], [], [], [], [], [], []
    ties = 0
    prefix_tokens = 0
    from speeder_fast.features.crossfit import fold_batches, row_folds

    # cross-fitted runs: one collab fold per batch, each user read through the table blind to them
    # (the metrics are means over examples, so the order within the split does not matter)
    plan = fold_batches(idx, row_folds(model, sa.users[idx]), batch_size)
    bar = tqdm(plan, desc=f"eval {split}/{mode}", unit="batch", disable=not progress, leave=False)
    for rows, fold in bar:
        batch = builder.build(
            sa.histories[rows], sa.lengths[rows], cands[rows], sa.targets[rows], with_answer=False,
            padding_side="left" if mode == "generate" else "right",
        )
        batch.fold = fold
        ptoks.append(batch.prompt_tokens.numpy())
        hlen.append(batch.history_lengths.numpy())
        if getattr(model, "prefix_cache", False) and batch.prefix:
            prefix_tokens = len(batch.prefix)
        tgt = batch.target_idx
        b = batch.to(device)
        if mode == "item":  # the whole catalogue: candidate ranks and full ranks from one score matrix
            r, f = ranks_from_scores(score_fn(b).float(), cands[rows], sa.targets[rows],
                                     split_histories(prepared, split, rows))
            ranks.append(r)
            fulls.append(f)
            correct.append(r == 0)
            valid.append(np.ones(len(rows), dtype=bool))
        elif mode == "score":
            scores = score_fn(b).float().cpu()
            r = rank_of_target(scores, tgt, check=False).numpy()
            ranks.append(r)
            correct.append(r == 0)
            valid.append(np.ones(len(rows), dtype=bool))
        elif constrained:  # decode inside the candidates' titles only; every answer names one candidate
            seqs = torch.from_numpy(builder.answer_sequences(batch.candidates)).to(device)
            res = model.generate_constrained(b, seqs, builder.eos_id, builder.pad_id)
            pred = res.choice.cpu()
            texts.extend(builder.decode_answer(row) for row in res.tokens.cpu().tolist())
            decoded.append(res.n_decoded.cpu().numpy())
            ties += int(res.ties.sum())
            correct.append((pred == tgt).numpy())
            valid.append(np.ones(len(rows), dtype=bool))
        else:
            from speeder_fast.model.decoding import greedy_decode

            res = greedy_decode(model, b, generate_max_tokens, builder.eos_id, builder.pad_id)
            txt, pred = match_generated(builder, res.tokens, batch.candidates)
            texts.extend(txt)
            decoded.append(res.n_decoded.cpu().numpy())
            correct.append((pred == tgt).numpy())
            valid.append((pred >= 0).numpy())
    if was_training:
        model.train()
    seconds = time.perf_counter() - t0
    correct_a = np.concatenate(correct) if correct else np.zeros(0, bool)
    valid_a = np.concatenate(valid) if valid else np.zeros(0, bool)
    ranks_a = np.concatenate(ranks) if ranks else None
    full_a = np.concatenate(fulls) if fulls else None
    hlen_a = np.concatenate(hlen) if hlen else np.zeros(0, np.int64)
    ptok_a = np.concatenate(ptoks) if ptoks else np.zeros(0, np.int64)
    dec_a = np.concatenate(decoded) if decoded else np.zeros(0, np.int64)
    if world > 1:  # gather per-example results in rank order (= the original order)
        def _g(a: np.ndarray) -> np.ndarray:
            return gather_tensor(torch.from_numpy(np.ascontiguousarray(a))).numpy()

        correct_a = _g(correct_a.astype(np.uint8)).astype(bool)
        valid_a = _g(valid_a.astype(np.uint8)).astype(bool)
        hlen_a = _g(hlen_a.astype(np.int64))
        ptok_a = _g(ptok_a.astype(np.int64))
        if mode == "generate":
            dec_a = _g(dec_a.astype(np.int64))
            ties = int(gather_tensor(torch.tensor([ties], dtype=torch.int64)).sum())
        if mode in ("score", "item"):
            ranks_a = _g((ranks_a if ranks_a is not None else np.zeros(0, np.int64)).astype(np.int64))
        if mode == "item":
            full_a = _g((full_a if full_a is not None else np.zeros(0, np.int64)).astype(np.int64))
    out = summarize(correct_a, valid_a, ranks_a, full_a)
    out.update(
        split=split,
        mode=mode,
        n_candidates=int(cands.shape[1]),
        prompt_tokens_mean=float(ptok_a.mean()) if len(ptok_a) else 0.0,
        seconds=seconds,
        examples_per_s=n_selected / seconds if seconds > 0 else 0.0,
        random_hr1=1.0 / cands.shape[1],
        prefix_cache_tokens=prefix_tokens,
    )
    fu = getattr(model, "fusion", None)
    if mode == "item" and fu is not None and fu.weight > 0:  # scores fused with SASRec (model.sasrec_fusion)
        out["sasrec_fusion_weight"] = float(fu.weight)
    if mode == "generate":
        out.update(constrained=bool(constrained), decoded_tokens_mean=float(dec_a.mean()) if len(dec_a) else 0.0)
        if constrained:
            out["constrained_ties"] = ties
    buckets = {}
    for lo, hi in BUCKETS:
        m = (hlen_a >= lo) & (hlen_a <= hi)
        if m.any():
            buckets[bucket_name(lo, hi)] = summarize(correct_a[m], valid_a[m], None if ranks_a is None else ranks_a[m],
                                                     None if full_a is None else full_a[m])
    out["by_history_length"] = buckets
    if texts:
        out["generated_examples"] = texts[:5]
    return out


# ---------------------------------------------------------------------------------- reference rows
def _reference_row(prepared: PreparedData, split: str, max_examples: int, seed: int, mode: str,
                   score_rows: Any, chunk: int = 512) -> dict:
    """Metrics of a reference ranker on the same persisted candidates and examples as the LLM row.

    ``score_rows(idx) -> [len(idx), n_items]`` fp32 scores of the examples ``idx`` of ``split``
    (called on chunks of ``chunk`` rows, so memory stays ``chunk x n_items``). Candidate and
    full-ranking (history excluded) metrics, pessimistic ties; labelled with ``split`` and ``mode``.
    """
    sa = prepared.split(split)
    cands = prepared.candidates(split)
    idx = select_examples(len(sa), max_examples, seed)
    cr, fr = [], []
    for s in range(0, len(idx), chunk):
        rows = idx[s: s + chunk]
        r, f = ranks_from_scores(score_rows(rows), cands[rows], sa.targets[rows], split_histories(prepared, split, rows))
        cr.append(r)
        fr.append(f)
    r = np.concatenate(cr) if cr else np.zeros(0, np.int64)
    out = summarize(r == 0, np.ones(len(r), bool), r, np.concatenate(fr) if fr else np.zeros(0, np.int64))
    out.update(split=split, mode=mode)
    return out


def sasrec_reference(run_dir: Path, prepared: PreparedData, split: str, max_examples: int, seed: int = 0) -> dict | None:
    """SASRec metrics on the same persisted candidates and examples (and the full ranking), or None
    when the run has no SASRec (``RUN/sasrec.safetensors``)."""
    path = Path(run_dir) / "sasrec.safetensors"
    if not path.is_file():
        return None
    from speeder_fast.features.sasrec import load_sasrec

    model = load_sasrec(path, "cpu")
    sa = prepared.split(split)
    seqs = prepared.dataset.sequences
    cut = 2 if split == "valid" else 1
    L = model.max_len

    @torch.no_grad()
    def scores(rows: np.ndarray) -> torch.Tensor:
        x = np.zeros((len(rows), L), np.int64)  # left-padded, ids shifted by +1 (0 = padding)
        for i, r in enumerate(rows):
            u = sa.users[r]
            h = seqs[u][: len(seqs[u]) - cut][-L:]
            if len(h):
                x[i, L - len(h):] = h + 1
        return model.score_all(model(torch.from_numpy(x))[:, -1]).float()

    return _reference_row(prepared, split, max_examples, seed, "sasrec", scores)


def item_popularity(prepared: PreparedData) -> np.ndarray:
    """float64 ``[n_items]``: how often each item occurs in the training part of the sequences (every
    user's sequence without its last two events, the valid and test targets), so no target leaks."""
    items, offsets = prepared.dataset.flat()
    lens = np.diff(offsets)
    pos = np.arange(len(items)) - np.repeat(offsets[:-1], lens)  # position within its user's sequence
    train_part = pos < np.repeat(lens - 2, lens)
    return np.bincount(items[train_part], minlength=prepared.dataset.n_items).astype(np.float64)


def popularity_reference(prepared: PreparedData, split: str, max_examples: int, seed: int = 0) -> dict:
    """Most-popular-first ranking of the same persisted candidates and examples, and of the whole
    catalogue (history excluded): a non-personalised floor; a recommender that does not beat it has
    learned nothing about the user. Ties are pessimistic, like every other row."""
    pop = torch.from_numpy(item_popularity(prepared)).float()
    return _reference_row(prepared, split, max_examples, seed, "popularity",
                          lambda rows: pop.expand(len(rows), -1))


# ---------------------------------------------------------------------------------- tables
COLUMNS = ("VHR@1", "ValidRatio", "HR@1", "HR@5", "HR@10", "NDCG@5", "NDCG@10",
           "full_HR@1", "full_HR@10", "full_HR@20", "full_NDCG@10", "full_NDCG@20")


def _fmt(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, float) else ("n/a" if v is None else str(v))


def format_table(rows: list[tuple[str, dict | None]]) -> str:
    """Markdown table of named metric dicts (None -> an n/a row)."""
    head = "| model | n | " + " | ".join(COLUMNS) + " | tokens/prompt |"
    sep = "|" + "---|" * (len(COLUMNS) + 3)
    lines = [head, sep]
    for name, m in rows:
        if m is None:
            lines.append(f"| {name} | n/a | " + " | ".join("n/a" for _ in COLUMNS) + " | n/a |")
            continue
        vals = [_fmt(m.get(c)) for c in COLUMNS]
        pt = m.get("prompt_tokens_mean")
        lines.append(f"| {name} | {m.get('n', 'n/a')} | " + " | ".join(vals) + f" | {f'{pt:.1f}' if pt else 'n/a'} |")
    return "\n".join(lines)


def format_buckets(result: dict) -> str:
    """Markdown table of the history-length breakdown."""
    cols = ("VHR@1", "ValidRatio", "HR@1", "NDCG@10", "full_NDCG@10")
    lines = ["| history length | n | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
    for name, m in result.get("by_history_length", {}).items():
        lines.append(f"| {name} | {m['n']} | " + " | ".join(_fmt(m.get(c)) for c in cols) + " |")
    return "\n".join(lines)


def report_stem(split: str, mode: str, tag: str = "") -> str:
    """File stem of an evaluation report: ``eval_<split>_<mode>`` (the train CLI's own evaluation) or
    ``eval_<split>_<mode>_<tag>`` (another checkpoint or subset, see :func:`evaluate_run`)."""
    return f"eval_{split}_{mode}" + (f"_{tag}" if tag else "")


def write_report(run_dir: Path, result: dict, sasrec: dict | None, label: str, popularity: dict | None = None,
                 tag: str = "") -> str:
    """Write ``<report_stem>.json`` and ``.md``; return the markdown. ``sasrec`` and ``popularity``
    are the reference rows on the same candidates (None: n/a / left out)."""
    split, mode = result["split"], result["mode"]
    md = (
        f"## {label}: {split} split, {mode} mode, {result['n']} examples, {result['n_candidates']} candidates "
        f"(random HR@1 = {result['random_hr1']:.4f}); full_* columns rank all items, history excluded\n\n"
        + format_table([(label, result), ("SASRec (same candidates)", sasrec)]
                       + ([("Popularity (training counts, same candidates)", popularity)] if popularity else []))
        + "\n\nBy history length:\n\n"
        + format_buckets(result)
        + "\n"
    )
    stem = report_stem(split, mode, tag)
    atomic_write_json(Path(run_dir) / f"{stem}.json", {"result": result, "sasrec": sasrec, "popularity": popularity})
    atomic_write_text(Path(run_dir) / f"{stem}.md", md)
    return md


# ---------------------------------------------------------------------------------- run level
def evaluated_checkpoint(cfg: Any, run_dir: str | Path) -> str:
    """The checkpoint a run's test evaluation scores: ``best`` when ``cfg.eval.checkpoint`` is
    ``best`` and the run saved one (the best validation metric, RecBole's convention), else ``final``."""
    best = Path(run_dir) / "checkpoints" / "best"
    return "best" if cfg.eval.checkpoint == "best" and best.is_dir() else "final"


def run_checkpoint(run_dir: str | Path) -> str:
    """:func:`evaluated_checkpoint` of a run folder, read from its ``config.toml`` (``final`` when the
    folder has none: loading the run then raises the clear error)."""
    from speeder_fast.config import load_run_config

    cfg_path = Path(run_dir) / "config.toml"
    if not cfg_path.is_file():
        return "final"
    return evaluated_checkpoint(load_run_config(cfg_path), run_dir)


def evaluate_run(
    run_dir: str | Path,
    split: str | None = None,
    mode: str | None = None,
    max_examples: int | None = None,
    batch_size: int | None = None,
    checkpoint: str | None = None,
    device: str | None = None,
    progress: bool = True,
    prepared: PreparedData | None = None,
    compile_mode: str | None = None,
    constrained: bool | None = None,
    prefix_cache: bool | None = None,
    precision: str | None = None,
    sasrec_fusion: str | None = None,
) -> tuple[dict, dict | None, str]:
    """Load a run (config + trainable weights) and evaluate it; returns (result, sasrec, markdown).
    ``constrained`` / ``prefix_cache``: override ``eval.constrained`` / ``eval.prefix_cache``.

    The report goes to ``eval_<split>_<mode>.json/.md`` when the checkpoint and the number of
    examples are those of the train CLI's own evaluation (``eval.checkpoint``, ``eval.max_examples``),
    so re-evaluating reproduces that file; any other checkpoint or subset gets its own file,
    ``eval_<split>_<mode>_<checkpoint>_n<N>`` (``_all`` for every example; ``result["report"]`` holds
    the stem), and never replaces the run's evaluation. ``precision`` serves the run at another
    ``model.precision`` (:func:`~speeder_fast.training.run.load_run`); a precision other than the
    run's adds ``_<precision>`` to that file name. ``sasrec_fusion`` (``off`` | ``auto`` | a weight >= 0)
    overrides ``model.sasrec_fusion`` (:mod:`speeder_fast.model.fusion`; ``auto`` picks the weight on the
    validation split now and writes nothing to the run folder); the report then gets ``_fusion-<spec>``."""
    from speeder_fast.training.run import load_run

    default_ckpt = run_checkpoint(run_dir)
    checkpoint = checkpoint or default_ckpt
    comp = load_run(run_dir, checkpoint=checkpoint, device=device, prepared=prepared, precision=precision,
                    sasrec_fusion=sasrec_fusion)
    cfg = comp.cfg
    if prefix_cache is not None:
        comp.model.prefix_cache = bool(prefix_cache)
    split = split or cfg.eval.split
    mode = mode or cfg.prompt.answer_mode
    n_max = cfg.eval.max_examples if max_examples is None else max_examples
    result = evaluate_split(
        comp.model, comp.builder, comp.prepared, split, mode, n_max, batch_size or cfg.eval.batch_size,
        cfg.eval.generate_max_tokens, comp.device, seed=cfg.seed, progress=progress,
        compile_mode=compile_mode or cfg.eval.compile, length_multiple=cfg.eval.length_multiple,
        constrained=cfg.eval.constrained if constrained is None else bool(constrained),
    )
    result["checkpoint"] = checkpoint
    if comp.fusion_info is not None:  # model.sasrec_fusion / --sasrec-fusion: the weight and where it came from
        result["sasrec_fusion"] = comp.fusion_info
    other_precision = precision is not None and comp.trained_precision != precision
    own = (checkpoint == default_ckpt and n_max == cfg.eval.max_examples and split == cfg.eval.split
           and mode == cfg.prompt.answer_mode and not other_precision and sasrec_fusion is None)
    tag = "" if own else (f"{checkpoint}_n{n_max if n_max > 0 else 'all'}"
                          + (f"_{cfg.model.precision}" if other_precision else "")
                          + (f"_fusion-{sasrec_fusion}" if sasrec_fusion is not None else ""))
    result["report"] = report_stem(split, mode, tag)
    sas, md = report_with_references(Path(run_dir), cfg, comp.prepared, result, n_max, tag)
    return result, sas, md


def written_line(result: dict, run_dir: str | Path) -> str:
    """The evaluate CLI's last line: the checkpoint scored (the resolved name, also when
    ``--checkpoint`` was left to its default), the number of examples and the report written."""
    return (f"checkpoint {result['checkpoint']} evaluated on {result['n']} examples; {result['report']}.json/.md "
            f"written to {Path(run_dir).resolve()}")


def report_with_references(run_dir: Path, cfg: Any, prepared: PreparedData, result: dict, max_examples: int,
                           tag: str = "") -> tuple[dict | None, str]:
    """SASRec and popularity rows on the result's split/examples, written with :func:`write_report`
    (file stem :func:`report_stem` with ``tag``); returns ``(sasrec, markdown)``."""
    split = result["split"]
    sas = sasrec_reference(Path(run_dir), prepared, split, max_examples, seed=cfg.seed)
    pop = popularity_reference(prepared, split, max_examples, seed=cfg.seed)
    label = f"{cfg.prompt.paradigm} ({Path(cfg.model.llm).name}, {cfg.model.precision})"
    if result.get("sasrec_fusion_weight"):
        label += f" + SASRec fusion (w = {result['sasrec_fusion_weight']:g})"
    return sas, write_report(Path(run_dir), result, sas, label, pop, tag)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m speeder_fast.evaluate", description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", required=True, help="run folder written by speeder_fast.train")
    ap.add_argument("--split", choices=SPLITS, default=None, help="default: eval.split of the run")
    ap.add_argument("--mode", choices=ANSWER_MODES, default=None,
                    help="default: prompt.answer_mode of the run (item runs evaluate in item mode only)")
    ap.add_argument("--max-examples", type=int, default=None, help="0 = all (default: eval.max_examples of the run)")
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--checkpoint", default=None,
                    help="checkpoint folder name under RUN/checkpoints (final, best, stage1, ...); default: "
                         "eval.checkpoint of the run (best unless set), the one its own test evaluation scored")
    ap.add_argument("--device", default=None, help="auto | cpu | cuda (default: the run's device setting)")
    ap.add_argument("--compile", choices=COMPILE_MODES, default=None,
                    help="score mode on static shapes, compiled (reduce-overhead = CUDA graphs); "
                         "default: eval.compile of the run (off unless set)")
    ap.add_argument("--constrained", choices=["on", "off"], default=None,
                    help="generate mode: decode only candidate titles, stop at the first unique prefix (on), or "
                         "free greedy text string-matched to titles, the plain LLaRA protocol (off); "
                         "default: eval.constrained of the run (on unless set)")
    ap.add_argument("--prefix-cache", choices=["on", "off"], default=None,
                    help="serve the fixed instruction prefix from its cached keys/values (on) or recompute it for "
                         "every example (off); default: eval.prefix_cache of the run (on unless set)")
    ap.add_argument("--precision", choices=PRECISIONS, default=None,
                    help="serve the run at this model.precision instead of the one it was trained at (bf16: "
                         "faster on CPUs with AVX512-BF16/AMX; the report gets its own file); default: the run's")
    ap.add_argument("--sasrec-fusion", default=None, metavar="off|auto|W",
                    help="item mode: score fused with the run's SASRec, log_softmax(head) + W x log_softmax(SASRec) "
                         "(off, auto = W picked on the validation split now, or a weight W >= 0; the report gets its "
                         "own file); default: model.sasrec_fusion of the run (off unless set)")
    args = ap.parse_args(argv)
    from speeder_fast.errors import UsageError, run_cli

    def body() -> int:
        if not Path(args.run).is_dir():
            raise UsageError(f"--run {args.run}: run folder does not exist")
        if args.sasrec_fusion is not None:
            from speeder_fast.training.fusion import parse_fusion_spec

            parse_fusion_spec(args.sasrec_fusion)  # a bad value fails before the model loads
        onoff = {"on": True, "off": False, None: None}
        result, _, md = evaluate_run(args.run, args.split, args.mode, args.max_examples, args.batch_size, args.checkpoint,
                                args.device, compile_mode=args.compile, constrained=onoff[args.constrained],
                                prefix_cache=onoff[args.prefix_cache], precision=args.precision,
                                sasrec_fusion=args.sasrec_fusion)
        if result.get("mode") == "item":
            from speeder_fast.training.fusion import fusion_line

            print(fusion_line(result.get("sasrec_fusion")))
        print(md)
        print(written_line(result, args.run))
        return 0

    return run_cli(body)  # one error: line; 2 bad input, 3 out of memory


if __name__ == "__main__":
    sys.exit(main())
