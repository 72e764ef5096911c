"""Eager vs static-shape vs inductor-compiled scoring (``eval.compile``) on the real default model.

Builds the default components (SmolLM2-135M fp32, MovieLens-100K quick preset, speeder prompts,
text modality only: no SASRec training), then scores ``--batches`` validation batches of ``--batch``
users with ``model.score``, ``StaticScorer(static)`` and ``StaticScorer(default)`` (inductor), each
after ``--warmup`` untimed batches (the compile happens there), and prints the median ms per batch
and the largest score difference to eager. The numbers in docs/fastpath.md come from

    python benchmarks/static_scoring_cpu.py --threads 2 --batch 16 --length-multiple 64
    python benchmarks/static_scoring_cpu.py --threads 2 --batch 16 --length-multiple 16
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--batch", type=int, default=16, help="users per batch")
    ap.add_argument("--batches", type=int, default=8, help="timed batches")
    ap.add_argument("--warmup", type=int, default=2, help="untimed batches first (compile)")
    ap.add_argument("--length-multiple", type=int, default=16, help="eval.length_multiple")
    args = ap.parse_args(argv)

    from speeder_fast.config import Config
    from speeder_fast.model.static import StaticScorer
    from speeder_fast.training.run import build_components

    torch.set_num_threads(args.threads)
    cfg = Config()
    cfg.features.modalities = ["text"]
    comp = build_components(cfg, progress=False)
    model, builder, p = comp.model, comp.builder, comp.prepared
    model.eval()
    v, cands = p.valid, p.valid_candidates
    B = args.batch
    batches = [builder.build(v.histories[s:s + B], v.lengths[s:s + B], cands[s:s + B], v.targets[s:s + B],
                             with_answer=False) for s in range(0, args.batches * B, B)]
    print(f"device cpu, threads {args.threads}, batch {B}, fp32, padded lengths "
          f"{sorted({int(x.input_ids.shape[1]) for x in batches})}, length multiple {args.length_multiple}")
    scorers = {
        "eager model.score": model.score,
        "static (eager)": StaticScorer(model, B, args.length_multiple, "static", pad_id=builder.pad_id),
        "inductor (default)": StaticScorer(model, B, args.length_multiple, "default", pad_id=builder.pad_id),
    }
    with torch.no_grad():
        ref = model.score(batches[0])
        for name, fn in scorers.items():
            t0 = time.perf_counter()
            for x in batches[:args.warmup]:
                fn(x)
            warm = time.perf_counter() - t0
            times = []
            for x in batches:
                t = time.perf_counter()
                fn(x)
                times.append(time.perf_counter() - t)
            diff = float((fn(batches[0]) - ref).abs().max())
            print(f"{name:20s} warm-up {warm:6.1f} s  median {1000 * np.median(times):8.1f} ms/batch  "
                  f"max |score - eager| {diff:.2e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
