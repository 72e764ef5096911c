"""Diagnostic: can the LLM learn to read a CLEAN signal from the MRC soft tokens?

Trains the default recommender with its only modality replaced by a one-hot code of each item's
training-popularity decile (10 dims), then scores the test split. Popularity alone ranks the
persisted candidates well, so a model that binds labels to soft tokens must beat random here; the
"clean popularity code" row of docs/speeder.md ("Learning within CPU budgets") comes from

    python benchmarks/popularity_code_probe.py --steps 200 --candidates 5 --lr 1e-3 --out /tmp/probe
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--candidates", type=int, default=5, help="data.n_candidates")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--train-examples", type=int, default=3200, help="data.max_train_examples")
    ap.add_argument("--test-users", type=int, default=200)
    ap.add_argument("--out", required=True, help="output folder for the run")
    args = ap.parse_args(argv)

    import speeder_fast.training.run as run
    from speeder_fast.config import Config, StageConfig
    from speeder_fast.evaluate import evaluate_split, item_popularity, popularity_reference
    from speeder_fast.training import train

    def popularity_code(cfg, prepared, *_args, **_kw):  # replaces run.compute_features
        pop = item_popularity(prepared)
        decile = np.minimum((pop.argsort().argsort() / max(1, len(pop) - 1) * 10).astype(int), 9)
        x = np.zeros((len(pop), 10), np.float32)
        x[np.arange(len(pop)), decile] = 1.0
        return {"collab": (torch.from_numpy(x), torch.ones(len(pop), dtype=torch.bool))}, {}

    run.compute_features = popularity_code
    cfg = Config()
    cfg.output_dir = args.out
    cfg.data.max_train_examples = args.train_examples
    cfg.data.n_candidates = args.candidates
    cfg.features.modalities = ["collab"]
    cfg.train.stages = [StageConfig(modalities=["collab"], max_steps=args.steps, lr=args.lr)]
    cfg.train.eval_every = max(50, args.steps // 4)
    cfg.train.eval_max_examples = 100
    comp = train(cfg, progress=False).components
    res = evaluate_split(comp.model, comp.builder, comp.prepared, "test", "score", args.test_users, 16,
                         device=comp.device, seed=cfg.seed, progress=False)
    pop = popularity_reference(comp.prepared, "test", args.test_users, seed=cfg.seed)
    keys = ("VHR@1", "NDCG@10")
    print(json.dumps({"llm": {k: res[k] for k in keys}, "popularity": {k: pop[k] for k in keys},
                      "random_hr1": 1.0 / args.candidates}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
