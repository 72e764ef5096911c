"""Dataset statistics of a :class:`PreparedData` and a plain-text table of them."""

from __future__ import annotations

import numpy as np

from speeder_fast.data.dataset import PreparedData


def compute_stats(prepared: PreparedData) -> dict:
    """Users, items, interactions, density, sequence-length summary, split sizes, what filtering
    dropped, text coverage.

    ``exact_duplicates_dropped`` (same user, item and timestamp; ``data.drop_duplicates``) and
    ``consecutive_duplicates_dropped`` come from the filter report of the manifest (0 when absent);
    ``split`` says whether the split is leave-one-out or given by the source. ``text_coverage`` maps
    each item-text field to the fraction of items with a non-empty value.
    """
    ds = prepared.dataset
    lengths = np.fromiter((len(s) for s in ds.sequences), np.int64, ds.n_users)
    n_int = int(lengths.sum())
    denom = ds.n_users * ds.n_items
    cov = {f: (sum(1 for v in col if v) / len(col) if col else 0.0) for f, col in ds.item_text.items()}
    report = prepared.manifest.get("filter", {}) if isinstance(prepared.manifest, dict) else {}
    return {
        "name": ds.name,
        "users": ds.n_users,
        "items": ds.n_items,
        "interactions": n_int,
        "density": n_int / denom if denom else 0.0,
        "avg_seq_len": float(lengths.mean()) if lengths.size else 0.0,
        "median_seq_len": float(np.median(lengths)) if lengths.size else 0.0,
        "min_seq_len": int(lengths.min()) if lengths.size else 0,
        "max_seq_len": int(lengths.max()) if lengths.size else 0,
        "train_examples": len(prepared.train),
        "valid_examples": len(prepared.valid),
        "test_examples": len(prepared.test),
        "max_history": int(prepared.train.histories.shape[1]) if prepared.train.histories.ndim == 2 else 0,
        "n_candidates": int(prepared.valid_candidates.shape[1]) if prepared.valid_candidates.ndim == 2 else 0,
        "split": prepared.manifest.get("split", "leave-one-out") if isinstance(prepared.manifest, dict) else "",
        "exact_duplicates_dropped": int(report.get("exact_duplicates_dropped", 0)),
        "consecutive_duplicates_dropped": int(report.get("duplicates_dropped", 0)),
        "text_coverage": cov,
    }


def format_stats(stats: dict) -> str:
    """A two-column plain-text table; nested dicts (text coverage) are indented, ratios as %."""
    rows: list[tuple[str, str]] = []
    for k, v in stats.items():
        if isinstance(v, dict):
            rows.append((k, ""))
            for kk, vv in v.items():
                rows.append((f"  {kk}", f"{100 * vv:.1f}%" if isinstance(vv, float) else str(vv)))
        elif isinstance(v, float):
            rows.append((k, f"{v:.3e}" if k == "density" else f"{v:,.2f}"))
        elif isinstance(v, int):
            rows.append((k, f"{v:,}"))
        else:
            rows.append((k, str(v)))
    w = max(len(r[0]) for r in rows) if rows else 0
    v = max(len(r[1]) for r in rows) if rows else 0
    line = "+" + "-" * (w + 2) + "+" + "-" * (v + 2) + "+"
    body = [f"| {a.ljust(w)} | {b.rjust(v)} |" for a, b in rows]
    return "\n".join([line, *body, line])
