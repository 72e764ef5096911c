"""Serving an fp32-trained item run at fp32 and at bf16 on CPU: speed, agreement and quality.

    python benchmarks/serve_precision_cpu.py --run RUN [--batch-size 64] [--top-k 10] [--out FILE.json]

For each precision (``load_run(..., precision=P)``: the base model loaded at P, the trained weights
cast) this times the real ``recommend`` loop over every user of the dataset (whole catalogue,
history masked, top-k; the same function the CLI runs, without the JSONL writing) and the test
evaluation over every test user (``evaluate_split``: 20 persisted candidates + full catalogue).
It reports users/s, the top-1 / top-k agreement of the two rankings and both evaluations. bf16
matmuls are only fast on CPUs with AVX512-BF16 or AMX (the log names the CPU's capability); run it
on a quiet machine, one process.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> int:
    from speeder_fast.evaluate import evaluate_split, run_checkpoint
    from speeder_fast.recommend import recommend
    from speeder_fast.training.run import load_run

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", required=True)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--top-k", type=int, default=10)
    ap.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    ckpt = run_checkpoint(args.run)
    rec: dict = {"run": str(Path(args.run).resolve()), "checkpoint": ckpt, "batch_size": args.batch_size,
                 "top_k": args.top_k, "torch_threads": torch.get_num_threads(),
                 "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                 "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores, torch {torch.__version__}",
                 "load_1min": os.getloadavg()[0], "precisions": {}}
    tops = {}
    for prec in args.precisions:
        t0 = time.perf_counter()
        comp = load_run(args.run, checkpoint=ckpt, precision=prec)
        load_s = time.perf_counter() - t0
        ds = comp.prepared.dataset
        users = [(None, ds.user_ids[u], u) for u in range(ds.n_users)]
        t0 = time.perf_counter()
        out = list(recommend(comp, users, args.top_k, batch_size=args.batch_size, progress=False))
        rank_s = time.perf_counter() - t0
        tops[prec] = [[r["item"] for r in o["recommendations"]] for o in out]
        t0 = time.perf_counter()
        ev = evaluate_split(comp.model, comp.builder, comp.prepared, "test", "item", 0, args.batch_size,
                            device=comp.device, seed=comp.cfg.seed, progress=False)
        eval_s = time.perf_counter() - t0
        rec["precisions"][prec] = {
            "load_s": round(load_s, 2), "recommend_s": round(rank_s, 2), "users": len(users),
            "users_per_s": round(len(users) / rank_s, 2), "evaluate_s": round(eval_s, 2),
            "test": {k: ev[k] for k in ("n", "HR@1", "NDCG@10", "full_HR@10", "full_NDCG@10")}}
        print(prec, json.dumps(rec["precisions"][prec]), flush=True)
        del comp
    if len(tops) == 2:
        a, b = tops.values()
        rec["top1_agreement"] = float(np.mean([x[:1] == y[:1] for x, y in zip(a, b)]))
        rec["topk_overlap"] = float(np.mean([len(set(x) & set(y)) / max(1, len(x)) for x, y in zip(a, b)]))
        print(f"top-1 agreement {rec['top1_agreement']:.4f}, top-{args.top_k} overlap {rec['topk_overlap']:.4f}")
    rec["load_1min_after"] = os.getloadavg()[0]
    if args.out:
        Path(args.out).write_text(json.dumps(rec, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
