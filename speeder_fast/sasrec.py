"""Train and evaluate SASRec (the collaborative item encoder) on a dataset.

Example::

    python -m speeder_fast.sasrec --data ../shared/data/amazon-beauty --out runs/sasrec-beauty

Writes into ``--out``: ``sasrec.safetensors`` (weights + architecture metadata),
``item_embeddings.safetensors`` (``features`` [n_items, dim] float32 + ``mask`` [n_items] bool:
items never seen in a training prefix are 0), ``metrics.json`` (full-ranking and candidate-set
metrics, per-epoch history, config, timings). All writes are atomic. The metrics are printed too.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from .utils import atomic_save_safetensors, atomic_write_json, get_logger, resolve_device

log = get_logger("speeder_fast.sasrec")


def build_parser() -> argparse.ArgumentParser:
    from .config import DataConfig
    from .features.sasrec import SASRecConfig, default_threads

    d, dc = SASRecConfig(), DataConfig()
    p = argparse.ArgumentParser(prog="python -m speeder_fast.sasrec", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True,
                   help="dataset: 'ml-100k', a RecBole atomic folder (NAME.inter[/NAME.item]) or raw Amazon folder "
                        "(passed to speeder_fast.data.prepare as DataConfig.source)")
    p.add_argument("--out", required=True, help="output folder (created; files in it are replaced atomically)")
    p.add_argument("--user-kcore", type=int, default=dc.user_kcore,
                   help=f"drop users with fewer interactions, iterated with --item-kcore (0 = off; default "
                        f"{dc.user_kcore} = DataConfig's, so the data match the LLM runs; amazon-beauty is "
                        "already 5-core, so 0 and 5 give the same data)")
    p.add_argument("--item-kcore", type=int, default=dc.item_kcore,
                   help=f"drop items with fewer interactions (0 = off; default {dc.item_kcore} = DataConfig's)")
    p.add_argument("--n-candidates", type=int, default=dc.n_candidates,
                   help=f"candidates per evaluation example in the persisted candidate sets (default {dc.n_candidates})")
    p.add_argument("--data-seed", type=int, default=dc.seed,
                   help=f"seed of the persisted candidate sampling (default {dc.seed})")
    p.add_argument("--cache-dir", default="", help="processed-data cache (default $SPEEDER_CACHE/data)")
    p.add_argument("--epochs", type=int, default=d.epochs, help=f"max training epochs (default {d.epochs})")
    p.add_argument("--patience", type=int, default=d.patience,
                   help=f"stop after this many epochs without a better validation NDCG@10 (0 = never; default {d.patience})")
    p.add_argument("--dim", type=int, default=d.dim, help=f"hidden size / item embedding size (default {d.dim})")
    p.add_argument("--layers", type=int, default=d.n_layers, help=f"transformer blocks (default {d.n_layers})")
    p.add_argument("--heads", type=int, default=d.n_heads, help=f"attention heads (default {d.n_heads})")
    p.add_argument("--dropout", type=float, default=d.dropout, help=f"dropout rate (default {d.dropout})")
    p.add_argument("--max-len", type=int, default=d.max_len, help=f"max items per input sequence (default {d.max_len})")
    p.add_argument("--lr", type=float, default=d.lr, help=f"Adam learning rate (default {d.lr})")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay, help=f"Adam weight decay (default {d.weight_decay})")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help=f"user sequences per step (default {d.batch_size})")
    p.add_argument("--loss", choices=("ce", "bce"), default=d.loss,
                   help="ce = full softmax cross-entropy over all items (default); bce = binary cross-entropy "
                        "with one sampled negative per position (original SASRec)")
    p.add_argument("--keep-history", action="store_true",
                   help="full ranking: keep the user's history items in the ranking (default: excluded, "
                        "as in RecBole / S3-Rec code; both variants are reported anyway)")
    p.add_argument("--seed", type=int, default=d.seed, help=f"training seed (default {d.seed})")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (default auto)")
    p.add_argument("--threads", type=int, default=0,
                   help=f"CPU threads for torch on CPU (0 = all cores available to this process, here {default_threads()})")
    p.add_argument("--no-progress", action="store_true", help="disable the tqdm progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    """CLI entry point: 0 ok, 2 bad input (one ``error:`` line), 3 out of memory
    (:func:`~speeder_fast.errors.run_cli`)."""
    args = build_parser().parse_args(argv)
    from .errors import run_cli

    return run_cli(lambda: _main(args))


def _main(args: argparse.Namespace) -> int:
    from .config import DataConfig
    from .data import prepare
    from .features.sasrec import SASRecConfig, default_threads, sasrec_item_embeddings, save_sasrec, train_sasrec

    device = resolve_device(args.device)
    cfg = SASRecConfig(dim=args.dim, n_layers=args.layers, n_heads=args.heads, dropout=args.dropout,
                       max_len=args.max_len, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                       weight_decay=args.weight_decay, loss=args.loss, patience=args.patience, seed=args.seed,
                       exclude_history=not args.keep_history,
                       threads=(args.threads or default_threads()) if device.type == "cpu" else 0)
    cfg.validate()
    dcfg = DataConfig(source=args.data, user_kcore=args.user_kcore, item_kcore=args.item_kcore,
                      n_candidates=args.n_candidates, seed=args.data_seed, cache_dir=args.cache_dir)
    t0 = time.perf_counter()
    prepared = prepare(dcfg)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model, metrics = train_sasrec(prepared, cfg, device=device, progress=not args.no_progress)
    metrics["dataset"] = prepared.dataset.name
    metrics["data_source"] = args.data
    metrics["data_config"] = {"user_kcore": args.user_kcore, "item_kcore": args.item_kcore,
                              "n_candidates": args.n_candidates, "seed": args.data_seed}
    metrics["total_seconds"] = time.perf_counter() - t0
    save_sasrec(model, out / "sasrec.safetensors", extra={"dataset": prepared.dataset.name})
    feats, mask = sasrec_item_embeddings(model, prepared)
    atomic_save_safetensors({"features": feats, "mask": mask}, out / "item_embeddings.safetensors",
                            metadata={"dataset": prepared.dataset.name, "encoder": "sasrec"})
    atomic_write_json(out / "metrics.json", metrics)
    print(format_metrics(metrics))
    print(f"wrote {out / 'sasrec.safetensors'}, {out / 'item_embeddings.safetensors'}, {out / 'metrics.json'}")
    return 0


def format_metrics(m: dict) -> str:
    """Human-readable summary of a :func:`train_sasrec` metrics dict."""
    lines = [f"SASRec on {m.get('dataset', '?')}: best epoch {m['best_epoch']} of {m['epochs_run']} "
             f"({m['epoch_seconds']:.2f} s/epoch wall, {m.get('epoch_cpu_seconds', 0.0):.2f} s CPU, on {m['device']}, "
             f"{m['torch_threads']} threads)"]
    for key in ("valid_full", "test_full", "test_full_with_history", "test_candidates"):
        if key in m:
            row = "  ".join(f"{k}={v:.4f}" for k, v in m[key].items() if k != "n")
            lines.append(f"  {key:<24} n={m[key]['n']}  {row}")
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
