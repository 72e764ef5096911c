"""Cost of the late-fusion head: forward + backward of the real item loss, mixture vs late fusion.

    python benchmarks/item_head_cost_cpu.py [--threads 1] [--reps 5] [--batch 16]

Builds the quick preset's model twice with ``training.run.build_components`` (ML-100K, MiniLM
text + SASRec collab, SmolLM2-135M fp32). One uses ``model.head_keys=mixture
train.item_modality_loss=0`` (the default before 2026-12-01). The other uses the defaults: late
fusion + the per-modality loss. Both time ``loss = model(batch); loss.backward()`` on the same
first ``--batch`` training windows. The two models alternate within each repetition, and the
first repetition is a warm-up. The script prints the median milliseconds of each.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--batch", type=int, default=16)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from speeder_fast.config import resolve
    from speeder_fast.training.run import build_components

    variants = {"mixture": ["model.head_keys=mixture", "train.item_modality_loss=0"], "late fusion + per-modality loss": []}
    comps = {name: build_components(resolve("quick", None, sets), progress=False) for name, sets in variants.items()}
    times: dict[str, list[float]] = {name: [] for name in comps}
    for rep in range(args.reps + 1):
        for name, c in comps.items():
            c.model.train()
            tr = c.prepared.train
            b = c.builder.build(tr.histories[:args.batch], tr.lengths[:args.batch], None, tr.targets[:args.batch])
            t0 = time.perf_counter()
            c.model(b).backward()
            dt = time.perf_counter() - t0
            c.model.zero_grad(set_to_none=True)
            if rep:
                times[name].append(dt)
    for name, t in times.items():
        print(f"{name}: median {statistics.median(t) * 1000:.0f} ms per forward+backward of {args.batch} windows "
              f"({args.reps} reps, {torch.get_num_threads()} threads)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
