"""Top-k recommendations for given users from a trained run.

    python -m speeder_fast.recommend --run runs/DIR --users users.txt [--top-k 5] [--split test]
                                     [--candidates catalogue | persisted | all-unseen N] [--seed 0]
                                     [--out recs.jsonl] [--batch-size B] [--checkpoint best] [--device cpu]
                                     [--compile MODE] [--prefix-cache on|off] [--precision bf16]

``--users FILE``: one raw user id per line (blank lines and lines starting with ``#`` are
skipped), or the word ``all`` for every user with a row in the split.

Which history and which items are ranked:

* ``--candidates catalogue`` (the default for runs with the next-item head, ``answer_mode=item``): a
  real next-item query over the **whole catalogue**. History = the user's full interaction sequence
  (the prompt holds its most recent ``data.max_history`` items); every item the user interacted
  with is excluded; the top ``--top-k`` of all other items are returned (fewer when fewer remain). One forward per batch of
  users plus one matmul against the cached item vectors.
* ``--candidates persisted`` (the default for label-scoring runs): the persisted candidates of
  ``--split`` for that user (the same list :mod:`speeder_fast.evaluate` ranks; it contains the
  held-out item), and the history is the user's interactions *before* that held-out item (its most
  recent ``data.max_history`` items). The top-1 here is exactly evaluate's answer for that example.
* ``--candidates all-unseen N``: history = the user's full sequence; candidates = ``N`` items the
  user never interacted with, sampled uniformly with ``numpy.random.default_rng([seed, user_index])``
  (reproducible per user). For label-scoring runs ``N`` must equal the run's ``data.n_candidates``
  (the prompt has that many label tokens); item-mode runs take any ``N``.

Ranking: item-mode runs rank by the next-item head's scores (with ``model.sasrec_fusion``, the
fused ``log_softmax(head) + w * log_softmax(SASRec)``, :mod:`speeder_fast.model.fusion`); label-scoring runs by the candidate
label-token logits at the answer position (``SpeederRecModel.score``: one forward per batch of
users, MRC item tokens from the cached catalogue). Each output line is a JSON object: ``user``,
``line`` (in the users file; null for ``all``), ``history`` (``[{item, title}]``, oldest first:
the items the prompt shows), ``recommendations`` = ``[{rank, item, title, score, prob}]``
(``prob`` = softmax over the ranked items). Runs trained with ``prompt.answer_mode=generate`` are
ranked by label logits too (a warning is logged: their label tokens were not trained).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from speeder_fast.config import COMPILE_MODES, PRECISIONS, SPLITS
from speeder_fast.data.readers import iter_text_lines
from speeder_fast.errors import DataError, DataFormatError, UsageError, run_cli
from speeder_fast.utils import atomic_write_text, get_logger

log = get_logger("speeder_fast.recommend")


class UsersFileError(DataFormatError):
    """A bad line in the users file (message names the file and line)."""


def read_users(path: str | Path, known: dict[str, int]) -> list[tuple[int, str, int]]:
    """Parse a users file (UTF-8, byte-order mark allowed) into ``[(line_no, raw_id, user_index)]``.

    Raises:
        FileNotFoundError: no such file.
        UsersFileError: an unknown id or no id at all; DataFormatError: bytes that are not UTF-8
            (both name the file and line).
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"users file {p} does not exist")
    out = []
    for no, raw in iter_text_lines(p):
        uid = raw.strip()
        if not uid or uid.startswith("#"):
            continue
        if uid not in known:
            raise UsersFileError(f"{p}:{no}: unknown user id {uid!r} (not in the run's dataset)")
        out.append((no, uid, known[uid]))
    if not out:
        raise UsersFileError(f"{p}: no user ids (one raw user id per line)")
    return out


def unseen_candidates(seq: np.ndarray, n_items: int, n: int, seed: int, user: int) -> np.ndarray:
    """``n`` distinct items never in ``seq``, seeded by ``(seed, user)``."""
    pool = np.setdiff1d(np.arange(n_items), seq)
    if len(pool) < n:
        raise DataError(f"user index {user}: only {len(pool)} unseen items, {n} candidates requested")
    return np.random.default_rng([seed, user]).choice(pool, n, replace=False).astype(np.int64)


def build_queries(comp: Any, users: list[tuple[int | None, str, int]], split: str, candidates: str, n_unseen: int,
                  seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, list[np.ndarray]]:
    """Histories [n, H] (-1 padded), lengths [n], candidates [n, N] (None for ``catalogue``) and each
    user's excluded items (the whole history before the ranked position) for ``users``."""
    prepared, cfg = comp.prepared, comp.cfg
    H = cfg.data.max_history
    n = len(users)
    hist = np.full((n, H), -1, np.int64)
    lens = np.zeros(n, np.int64)
    ds = prepared.dataset
    if candidates == "persisted":
        sa = prepared.split(split)
        cands_all = prepared.candidates(split)
        row_of = {int(u): r for r, u in enumerate(sa.users)}
        cands = np.zeros((n, cands_all.shape[1]), np.int64)
        cut = 2 if split == "valid" else 1
        seen = []
        for i, (no, uid, u) in enumerate(users):
            r = row_of.get(u)
            if r is None:
                where = f"line {no}: " if no is not None else ""
                raise UsersFileError(f"{where}user {uid!r} has no {split} example (too few interactions)")
            L = int(sa.lengths[r])
            hist[i, : min(L, H)] = sa.histories[r, max(0, L - H) : L]
            lens[i] = min(L, H)
            cands[i] = cands_all[r]
            seen.append(np.asarray(ds.sequences[u][: len(ds.sequences[u]) - cut], np.int64))
        return hist, lens, cands, seen
    item_mode = comp.builder.item_mode
    N = cfg.data.n_candidates
    if candidates == "all-unseen" and not item_mode and n_unseen != N:
        raise UsageError(f"--candidates all-unseen {n_unseen}: this run's prompts have {N} candidate labels "
                         f"(data.n_candidates); use all-unseen {N}")
    if candidates == "catalogue" and not item_mode:
        raise UsageError("--candidates catalogue needs a run with the next-item head (prompt.answer_mode=item); "
                         "label-scoring runs rank a candidate list: use persisted or all-unseen N")
    cands = None if candidates == "catalogue" else np.zeros((n, n_unseen), np.int64)
    seen = []
    for i, (_, _, u) in enumerate(users):
        seq = np.asarray(ds.sequences[u], np.int64)
        h = seq[-H:]
        hist[i, : len(h)] = h
        lens[i] = len(h)
        seen.append(seq)
        if cands is not None:
            cands[i] = unseen_candidates(seq, ds.n_items, n_unseen, seed, u)
    return hist, lens, cands, seen


@torch.no_grad()
def recommend(comp: Any, users: list[tuple[int | None, str, int]], top_k: int = 5, split: str = "test",
              candidates: str | None = None, n_unseen: int = 0, seed: int = 0, batch_size: int = 16,
              progress: bool = True, compile_mode: str = "off") -> Iterator[dict]:
    """Yield one recommendation record per user, in the order of ``users`` (see the module docstring
    for the fields). Users are scored in batches of ``batch_size`` sorted by history length (less
    padding), with a tqdm progress bar unless ``progress`` is False.

    ``candidates``: ``catalogue`` | ``persisted`` | ``all-unseen`` (None: ``catalogue`` for item-mode
    runs, ``persisted`` otherwise). ``compile_mode`` (``eval.compile``): score on static shapes
    through :class:`~speeder_fast.model.static.StaticScorer` (same ranking; CUDA graphs with
    reduce-overhead). Raises ValueError for a ``top_k`` larger than the ranked set.
    """
    from tqdm.auto import tqdm

    from speeder_fast.metrics import exclude_items

    model, builder, ds = comp.model, comp.builder, comp.prepared.dataset
    candidates = candidates or ("catalogue" if builder.item_mode else "persisted")
    if comp.cfg.prompt.answer_mode == "generate":
        log.warning("this run was trained with answer_mode=generate: ranking by label-token logits, which it did not train")
    hist, lens, cands, seen = build_queries(comp, users, split, candidates, n_unseen, seed)
    n_ranked = ds.n_items if cands is None else cands.shape[1]
    if not 1 <= top_k <= n_ranked:
        raise UsageError(f"--top-k must be in 1..{n_ranked} (the number of ranked items), got {top_k}")
    from speeder_fast.model.static import score_function

    model.eval()
    score_fn = score_function(model, compile_mode, comp.device, batch_size, comp.cfg.eval.length_multiple,
                              builder.pad_id)
    # users in order of history length, so that a batch pads to similar lengths (the records still
    # come out in the order of ``users``)
    order = np.argsort(lens, kind="stable")
    from speeder_fast.features.crossfit import fold_batches, row_folds

    # cross-fitted runs: one collab fold per batch, each user read through the table blind to them
    folds = row_folds(model, np.asarray([-1 if u is None else u for _, _, u in users], np.int64)[order])
    out: list[dict | None] = [None] * len(users)
    for idx, fold in tqdm(fold_batches(order, folds, batch_size), desc="recommend", unit="batch",
                          disable=not progress, leave=False):
        batch = builder.build(hist[idx], lens[idx], None if cands is None else cands[idx], None, with_answer=False)
        batch.fold = fold
        scores = score_fn(batch.to(comp.device)).float().cpu()
        if builder.item_mode:
            if cands is None:  # the whole catalogue, the user's own items excluded
                own = [seen[i] for i in idx]
                exclude_items(scores, np.repeat(np.arange(len(idx)), [len(x) for x in own]), np.concatenate(own))
            else:
                scores = scores.gather(1, torch.from_numpy(cands[idx]))
        probs = scores.softmax(1)
        top = scores.topk(top_k, dim=1)
        for j, i in enumerate(idx):
            no, uid, u = users[i]
            recs = []
            for rank, (v, c) in enumerate(zip(top.values[j].tolist(), top.indices[j].tolist()), 1):
                if v == float("-inf"):  # an excluded (already interacted) item: the ranking ends here
                    break
                item = int(c) if cands is None else int(cands[i, c])
                recs.append({"rank": rank, "item": ds.item_ids[item], "title": builder.titles[item],
                             "score": round(float(v), 6), "prob": round(float(probs[j, c]), 6)})
            h = hist[i, : lens[i]]
            out[i] = {"user": uid, "line": no,
                      "history": [{"item": ds.item_ids[int(t)], "title": builder.titles[int(t)]} for t in h],
                      "recommendations": recs}
    yield from out  # type: ignore[misc]


def peak_memory(device: torch.device) -> str:
    """The process's peak memory so far: CUDA ``max_memory_allocated`` or the CPU peak RSS (``ru_maxrss``)."""
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 2**20:.0f} MB CUDA allocated"
    try:
        import resource

        return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB RSS"
    except ImportError:  # pragma: no cover - non-POSIX
        return "n/a"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m speeder_fast.recommend", description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", required=True, help="run folder written by speeder_fast.train")
    ap.add_argument("--users", required=True, help="file with one raw user id per line, or 'all'")
    ap.add_argument("--top-k", type=int, default=5)
    ap.add_argument("--split", choices=SPLITS, default="test", help="persisted candidates of this split")
    ap.add_argument("--candidates", nargs="+", default=None, metavar="MODE",
                    help="'catalogue' (every item the user has not interacted with; the default for item-mode "
                         "runs), 'persisted' (the split's persisted candidates; the default otherwise) or "
                         "'all-unseen N'")
    ap.add_argument("--seed", type=int, default=0, help="seed of the all-unseen candidate sampling")
    ap.add_argument("--out", default=None, help="write JSONL here (atomically); default: print to stdout")
    ap.add_argument("--batch-size", type=int, default=None, help="users per forward (default: eval.batch_size)")
    ap.add_argument("--checkpoint", default=None,
                    help="checkpoint folder name under RUN/checkpoints (best, final, stage1, ...); default: the one "
                         "the run's own test evaluation scored (best when eval.checkpoint=best and it exists, else final)")
    ap.add_argument("--device", default=None, help="auto | cpu | cuda (default: the run's device setting)")
    ap.add_argument("--compile", choices=COMPILE_MODES, default=None,
                    help="score on static shapes, compiled (reduce-overhead = CUDA graphs, pays for many "
                         "batches of one shape); default: eval.compile of the run (off unless set)")
    ap.add_argument("--prefix-cache", choices=["on", "off"], default=None,
                    help="serve the fixed instruction prefix from its cached keys/values (on) or recompute it for "
                         "every user (off); default: eval.prefix_cache of the run (on unless set)")
    ap.add_argument("--precision", choices=PRECISIONS, default=None,
                    help="serve the run at this model.precision instead of the one it was trained at (bf16 ranks "
                         "about 1.5x faster on CPUs with AVX512-BF16/AMX, docs/fastpath.md); default: the run's")
    ap.add_argument("--sasrec-fusion", default=None, metavar="off|auto|W",
                    help="item mode: rank by the scores fused with the run's SASRec, log_softmax(head) + W x "
                         "log_softmax(SASRec) (off, auto = W picked on the validation split now, or a weight W >= 0); "
                         "default: model.sasrec_fusion of the run (off unless set)")
    args = ap.parse_args(argv)

    def body() -> int:
        mode = args.candidates[0] if args.candidates else None
        n_unseen = 0
        if mode == "all-unseen" and len(args.candidates) == 2 and args.candidates[1].isdigit():
            n_unseen = int(args.candidates[1])
        elif not (mode is None or (mode in ("persisted", "catalogue") and len(args.candidates) == 1)):
            raise UsageError(f"--candidates must be 'catalogue', 'persisted' or 'all-unseen N', got "
                             f"{' '.join(args.candidates)!r}")
        if not Path(args.run).is_dir():
            raise UsageError(f"--run {args.run}: run folder does not exist")
        from speeder_fast.evaluate import run_checkpoint
        from speeder_fast.training.run import load_run

        if args.sasrec_fusion is not None:
            from speeder_fast.training.fusion import parse_fusion_spec

            parse_fusion_spec(args.sasrec_fusion)  # a bad value fails before the model loads
        comp = load_run(args.run, checkpoint=args.checkpoint or run_checkpoint(args.run), device=args.device,
                        precision=args.precision, sasrec_fusion=args.sasrec_fusion)  # train.packing applied (one log line)
        if comp.builder.item_mode:
            from speeder_fast.training.fusion import fusion_line

            log.info(fusion_line(comp.fusion_info))
        if args.prefix_cache is not None:
            comp.model.prefix_cache = args.prefix_cache == "on"
        ds = comp.prepared.dataset
        mode = mode or ("catalogue" if comp.builder.item_mode else "persisted")
        if args.users == "all":
            rows = comp.prepared.split(args.split).users if mode == "persisted" else np.arange(ds.n_users)
            users: list[tuple[int | None, str, int]] = [(None, ds.user_ids[int(u)], int(u)) for u in rows]
        else:
            users = read_users(args.users, {u: i for i, u in enumerate(ds.user_ids)})
        t0 = time.perf_counter()
        records = list(recommend(comp, users, args.top_k, args.split, mode, n_unseen, args.seed,
                                 args.batch_size or comp.cfg.eval.batch_size,
                                 compile_mode=args.compile or comp.cfg.eval.compile))
        dt = time.perf_counter() - t0
        log.info("ranked %s for %d users in %.1f s (%.1f users/s, batch %d, %s, %d torch threads); peak memory %s",
                 "the whole catalogue" if mode == "catalogue" else f"{mode} candidates", len(records), dt,
                 len(records) / max(dt, 1e-9), args.batch_size or comp.cfg.eval.batch_size,
                 comp.cfg.model.precision, torch.get_num_threads(), peak_memory(comp.device))
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        if args.out:
            atomic_write_text(args.out, text)
            print(f"{len(records)} users written to {Path(args.out).resolve()}")
        else:
            sys.stdout.write(text)
        return 0

    return run_cli(body)  # one error: line; 2 bad input (SpeederError only, not any ValueError), 3 out of memory


if __name__ == "__main__":
    sys.exit(main())
