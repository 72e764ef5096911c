"""Diagnostic: score the test split with the sum of two item-mode runs' log-softmax scores.

    python benchmarks/ensemble_check.py RUN_A RUN_B [--weight W] [--max-examples N] [--checkpoint best]

Both runs must be next-item-head runs (``prompt.answer_mode=item``) of the same data and prompt
settings (for example a text-only and a collab-only speeder run from ``quality_table.py``). Each
user's catalogue scores are ``log_softmax(A) + W * log_softmax(B)``; the metrics are computed by
``speeder_fast.evaluate.evaluate_split`` on the same persisted candidates and full catalogue as
the runs' own reports. This measures how complementary two runs are. It is not a
serving path: it costs two forward passes per user.
"""

from __future__ import annotations

import argparse
import sys

import torch


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_a")
    ap.add_argument("run_b")
    ap.add_argument("--weight", type=float, default=1.0, help="weight W of run B's log-softmax scores")
    ap.add_argument("--max-examples", type=int, default=0, help="0 = every test user (default)")
    ap.add_argument("--checkpoint", default="best")
    ap.add_argument("--batch-size", type=int, default=32)
    args = ap.parse_args(argv)
    from speeder_fast.evaluate import evaluate_split, format_table
    from speeder_fast.training.run import load_run

    a = load_run(args.run_a, checkpoint=args.checkpoint)
    b = load_run(args.run_b, checkpoint=args.checkpoint, prepared=a.prepared)
    for c in (a, b):
        if c.cfg.prompt.answer_mode != "item":
            print(f"error: {args.run_a if c is a else args.run_b}: prompt.answer_mode is "
                  f"{c.cfg.prompt.answer_mode!r}, not 'item'", file=sys.stderr)
            return 2

    class Ensemble:
        """The slice of the model interface ``evaluate_split`` uses in item mode."""

        training = False
        prefix_cache = False

        def eval(self) -> None:
            a.model.eval()
            b.model.eval()

        def train(self, mode: bool = True) -> None:
            pass

        @torch.no_grad()
        def score(self, batch) -> torch.Tensor:
            return (torch.log_softmax(a.model.score(batch).float(), -1)
                    + args.weight * torch.log_softmax(b.model.score(batch).float(), -1))

    res = evaluate_split(Ensemble(), a.builder, a.prepared, "test", "item", args.max_examples, args.batch_size,
                         48, "cpu", seed=a.cfg.seed, progress=True)
    print(format_table([(f"ensemble (B weight {args.weight:g})", res)]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
