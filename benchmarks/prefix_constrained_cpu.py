"""Prefix KV cache on/off and constrained vs plain generation, same model, same batches, same run.

Builds the default components (SmolLM2-135M fp32, MovieLens-100K, text modality only: no SASRec) for
``--mode`` (``score``, ``item`` or ``generate``) and ``--paradigm``, then times ``--batches``
validation batches of ``--batch`` users after ``--warmup`` untimed ones, the variants interleaved
batch by batch (a shared machine's load drifts alike for all of them):

* score / item: ``model.score`` with ``eval.prefix_cache`` off and on (+ the static scorer with
  ``--static``); the largest score difference to the uncached path is printed;
* generate: plain greedy decoding (``eval.constrained=false``, ``--max-new-tokens``) and constrained
  decoding, each with the prefix cache off and on; mean decoded tokens and the plain ValidRatio;
* ``--train-step`` (item mode): one forward + backward of a training batch with ``train.prefix_share``
  off / on.

Prints median ms per batch and writes the numbers as JSON with ``--out``. Untrained weights (the
cost does not depend on them, except the plain decoder's length: it runs to the cap). E.g.

    python benchmarks/prefix_constrained_cpu.py --threads 2 --mode item --batch 16
    python benchmarks/prefix_constrained_cpu.py --threads 2 --mode generate --paradigm titles --max-new-tokens 16
    python benchmarks/prefix_constrained_cpu.py --threads 2 --mode item --train-step
    python benchmarks/prefix_constrained_cpu.py --set model.llm=DIR --set data.max_users=40   # any config key
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any, Callable

import numpy as np
import torch


def _timed(fns: dict[str, Callable[[Any], Any]], batches: list, warmup: int) -> dict[str, list[float]]:
    """Run every fn on every batch, interleaved; seconds per timed batch for each fn."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for i, x in enumerate(batches):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn(x)
            if i >= warmup:
                times[name].append(time.perf_counter() - t)
    return times


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--mode", choices=["score", "item", "generate"], default="item", help="prompt.answer_mode")
    ap.add_argument("--paradigm", choices=["speeder", "titles", "verbose"], default="speeder")
    ap.add_argument("--batch", type=int, default=16, help="users per batch")
    ap.add_argument("--batches", type=int, default=6, help="timed batches")
    ap.add_argument("--warmup", type=int, default=1, help="untimed batches first")
    ap.add_argument("--max-new-tokens", type=int, default=16, help="plain generation cap")
    ap.add_argument("--static", action="store_true", help="also time StaticScorer(static) with the cache on/off")
    ap.add_argument("--train-step", action="store_true", help="time forward+backward with train.prefix_share off/on")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)
    if args.train_step and args.mode != "item":
        ap.error("--train-step needs --mode item (its training prompts need no sampled candidates)")

    from speeder_fast.config import Config, set_override
    from speeder_fast.model.decoding import greedy_decode
    from speeder_fast.model.llm import match_generated
    from speeder_fast.model.static import StaticScorer
    from speeder_fast.training.run import build_components

    torch.set_num_threads(args.threads)
    cfg = Config()
    cfg.features.modalities = ["text"]
    cfg.prompt.paradigm, cfg.prompt.answer_mode = args.paradigm, args.mode
    for a in args.set:
        set_override(cfg, a)
    comp = build_components(cfg, progress=False)
    model, builder, p = comp.model, comp.builder, comp.prepared
    model.eval()
    v, cands = p.valid, p.valid_candidates
    B, n = args.batch, args.batches + args.warmup
    side = "left" if args.mode == "generate" else "right"
    batches = [builder.build(v.histories[s:s + B], v.lengths[s:s + B], None if builder.item_mode else cands[s:s + B],
                             v.targets[s:s + B], with_answer=False, padding_side=side) for s in range(0, n * B, B)]
    P = len(builder.prefix_ids)
    ptok = float(np.mean([float(x.prompt_tokens.float().mean()) for x in batches]))
    head = (f"cpu, {args.threads} threads, {cfg.model.llm} {cfg.model.precision}, {args.paradigm}/{args.mode}, "
            f"batch {B}, prefix {P} tokens of {ptok:.1f} per prompt ({100 * P / ptok:.0f}%)")
    print(head)
    res: dict[str, Any] = {"setup": head, "prefix_tokens": P, "prompt_tokens_mean": ptok, "ms_per_batch": {}}

    def cache(on: bool, fn: Callable[[Any], Any]) -> Callable[[Any], Any]:
        def run(x: Any) -> Any:
            model.prefix_cache = on
            with torch.no_grad():
                return fn(x)
        return run

    extra: dict[str, Any] = {}
    if args.mode in ("score", "item"):
        fns = {"score, prefix cache off": cache(False, model.score), "score, prefix cache on": cache(True, model.score)}
        if args.static:
            st = StaticScorer(model, B, cfg.eval.length_multiple, "static", pad_id=builder.pad_id)
            fns.update({"static, prefix cache off": cache(False, st), "static, prefix cache on": cache(True, st)})
        ref = cache(False, model.score)(batches[0])
        extra["max_abs_diff_cached"] = float((cache(True, model.score)(batches[0]) - ref).abs().max())
    else:
        eos, pad = builder.eos_id, builder.pad_id

        def plain(x: Any) -> Any:
            return greedy_decode(model, x, args.max_new_tokens, eos, pad)

        def constrained(x: Any) -> Any:
            return greedy_decode(model, x, 0, eos, pad, torch.from_numpy(builder.answer_sequences(x.candidates)))

        fns = {f"plain (cap {args.max_new_tokens}), prefix cache off": cache(False, plain),
               f"plain (cap {args.max_new_tokens}), prefix cache on": cache(True, plain),
               "constrained, prefix cache off": cache(False, constrained),
               "constrained, prefix cache on": cache(True, constrained)}
        pl = [cache(True, plain)(x) for x in batches]
        co = [cache(True, constrained)(x) for x in batches]
        extra["decoded_tokens_mean_plain"] = float(torch.cat([r.n_decoded for r in pl]).float().mean())
        extra["decoded_tokens_mean_constrained"] = float(torch.cat([r.n_decoded for r in co]).float().mean())
        extra["valid_ratio_plain"] = float(np.mean([float((match_generated(builder, r.tokens, x.candidates)[1] >= 0)
                                                          .float().mean()) for r, x in zip(pl, batches)]))
    times = _timed(fns, batches, args.warmup)
    if args.train_step:
        tb = [builder.build(p.train.histories[s:s + B], p.train.lengths[s:s + B], None, p.train.targets[s:s + B])
              for s in range(0, n * B, B)]

        def step(on: bool) -> Callable[[Any], Any]:
            def run(x: Any) -> Any:
                model.prefix_train = on
                model.train()
                model.zero_grad(set_to_none=True)
                model(x).backward()
            return run

        times.update(_timed({"train step, prefix_share off": step(False), "train step, prefix_share on": step(True)},
                            tb, args.warmup))
        model.eval()
    for name, ts in times.items():
        ms = 1000 * float(np.median(ts))
        res["ms_per_batch"][name] = ms
        print(f"{name:42s} median {ms:9.1f} ms/batch  ({len(ts)} batches)")
    for k, val in extra.items():
        print(f"{k}: {val:.4g}")
    res.update(extra)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
