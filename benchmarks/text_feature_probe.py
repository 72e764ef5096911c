"""How much next-item signal do the text features carry? A cheap proxy, no LLM training.

For each data set and each text encoder, the item text features (``features.text_template``,
``features.text_max_tokens``) are built through the feature store and probed on the leave-one-out
split of ``speeder_fast.data.prepare`` (``DataConfig`` defaults: history <= 10, 20 persisted
candidates):

* **kNN** (no training): features centred on the catalogue mean and L2-normalised; the query is
  the last history item's feature; every item is scored by cosine similarity. Full ranking over
  all items with the user's earlier items excluded (the target never; the SASRec convention of
  ``speeder_fast.features.sasrec``), and the target's rank among its 20 persisted candidates.
  ``knn_decay`` in the JSON: the same with a recency-weighted mean of the history (weight
  ``0.5 ** age``) as the query; ``knn_raw``: last item, uncentred cosine.
* **Trained linear probe**: user vector = a learned softmax-over-ages weighted mean of the
  history's (centred, normalised) features, mapped by a learned ``d x d`` matrix (identity at
  start) and a temperature; score = dot product with every item's feature; no item bias (an item
  bias would learn popularity, not text). Softmax cross-entropy over all items (history items
  other than the target masked) on ``prepared.train``; Adam, early stopping on validation
  full-ranking NDCG@10; test metrics of the best epoch.
* Controls: ``random`` (Gaussian features of dimension 384, seed 0: the probe's capacity to learn
  item transitions without any text) and ``popularity`` (training-prefix counts, no features).

Encoders: ``llm`` (input-embedding mean), ``minilm``, ``llm-hidden`` (a sweep: one forward pass
gives every layer, mean and last-token pooling; kNN on every layer, the trained probe on
``--probe-layers`` (mean pooling) and on each pooling's best kNN layer; the reported layer is
the one with the best *validation* NDCG@10 of the trained probe), ``llm-hidden:N`` (one fixed
layer). Encode time is measured separately on ``--time-items`` random items with a fresh call
(one thread unless ``--threads``), as wall and process-CPU time.

    python benchmarks/text_feature_probe.py --data ml-100k ../shared/data/amazon-office \\
        --encoders llm llm-hidden minilm random popularity --out runs/text_probe

Outputs under ``--out``: ``results.json`` (every number), ``results.md`` (the tables),
``features/`` (the feature store used, unless ``--store-root``), ``sweep/`` (all-layer
``llm-hidden`` features, float16, reused by later runs).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

KS_FULL = dict(hr_ks=(1, 5, 10, 20), ndcg_ks=(5, 10, 20))
KS_CAND = dict(hr_ks=(1, 5), ndcg_ks=(5, 10))


# ----------------------------------------------------------------------------------- evaluation
@dataclasses.dataclass
class Split:
    """One evaluation split as arrays: histories (-1 padded), targets, candidates, exclusions."""

    hist: torch.Tensor  # int64 [n, H], oldest -> newest, -1 padded on the right
    lens: torch.Tensor  # int64 [n]
    targets: torch.Tensor  # int64 [n]
    cands: torch.Tensor | None  # int64 [n, C]
    excl_rows: torch.Tensor  # int64 [m]: (row, item) pairs excluded from the full ranking
    excl_items: torch.Tensor  # int64 [m]


def make_split(prepared, name: str) -> Split:
    """Arrays of ``prepared.<name>``; excluded = the user's items before the target (target kept)."""
    sa = prepared.split(name)
    cut = {"valid": 2, "test": 1}.get(name)
    rows, items = [], []
    for r, u in enumerate(sa.users):
        if cut is None:  # train windows: exclude the window's history
            prev = sa.histories[r, : sa.lengths[r]]
        else:
            seq = prepared.dataset.sequences[u]
            if int(seq[len(seq) - cut]) != int(sa.targets[r]):
                raise ValueError(f"{name} target of user {u} is not sequences[u][-{cut}]")
            prev = seq[: len(seq) - cut]
        prev = np.unique(prev[prev != sa.targets[r]])
        rows.append(np.full(len(prev), r, np.int64))
        items.append(prev.astype(np.int64))
    cands = torch.from_numpy(prepared.candidates(name)) if name in ("valid", "test") else None
    return Split(torch.from_numpy(sa.histories), torch.from_numpy(sa.lengths), torch.from_numpy(sa.targets),
                 cands, torch.from_numpy(np.concatenate(rows)), torch.from_numpy(np.concatenate(items)))


def evaluate(score_fn, split: Split, chunk: int = 1024) -> dict:
    """Full-ranking (history excluded) and candidate metrics of ``score_fn(hist, lens) -> [b, n_items]``."""
    from speeder_fast.metrics import rank_of_target, ranking_metrics

    n = len(split.targets)
    full_r, cand_r = [], []
    order = torch.argsort(split.excl_rows, stable=True)
    ex_rows, ex_items = split.excl_rows[order], split.excl_items[order]
    bounds = torch.searchsorted(ex_rows, torch.arange(0, n + chunk, chunk).clamp_max(n))
    for k, s in enumerate(range(0, n, chunk)):
        e = min(n, s + chunk)
        with torch.no_grad():
            sc = score_fn(split.hist[s:e], split.lens[s:e]).float()
        tg = split.targets[s:e]
        if split.cands is not None:
            cs = sc.gather(1, split.cands[s:e])
            pos = (split.cands[s:e] == tg[:, None]).int().argmax(1)
            cand_r.append(rank_of_target(cs, pos))
        lo, hi = int(bounds[k]), int(bounds[k + 1])
        sc[ex_rows[lo:hi] - s, ex_items[lo:hi]] = -math.inf
        full_r.append(rank_of_target(sc, tg))
    out = {"full": ranking_metrics(torch.cat(full_r), **KS_FULL)}
    if cand_r:
        out["cand"] = ranking_metrics(torch.cat(cand_r), **KS_CAND)
    return out


def center_normalize(x: torch.Tensor, mask: torch.Tensor, center: bool = True) -> torch.Tensor:
    """float32 rows centred on the mean of the present rows and L2-normalised; absent rows zero."""
    x = x.float().clone()
    if center and bool(mask.any()):
        x -= x[mask].mean(0)
    x[~mask] = 0.0
    return F.normalize(x, dim=1)


def history_query(xn: torch.Tensor, hist: torch.Tensor, lens: torch.Tensor, decay: float | None) -> torch.Tensor:
    """Last history item's row (``decay=None``) or the ``decay**age``-weighted mean of the history."""
    b, h = hist.shape
    if decay is None:
        return xn[hist[torch.arange(b), (lens - 1).clamp_min(0)].clamp_min(0)]
    age = (lens[:, None] - 1 - torch.arange(h)[None]).float()
    w = torch.where(age >= 0, decay ** age.clamp_min(0), torch.zeros_like(age))
    return (w[..., None] * xn[hist.clamp_min(0)]).sum(1)


def knn_metrics(x: torch.Tensor, mask: torch.Tensor, split: Split) -> dict:
    xc = center_normalize(x, mask)
    xr = center_normalize(x, mask, center=False)
    return {
        "knn": evaluate(lambda hh, ll: history_query(xc, hh, ll, None) @ xc.T, split),
        "knn_decay": evaluate(lambda hh, ll: F.normalize(history_query(xc, hh, ll, 0.5), dim=1) @ xc.T, split),
        "knn_raw": evaluate(lambda hh, ll: history_query(xr, hh, ll, None) @ xr.T, split),
    }


class LinearProbe(torch.nn.Module):
    """score(user, i) = tau * (sum_j softmax(a)[age_j] x_{h_j}) W . x_i  over the history's rows."""

    def __init__(self, x: torch.Tensor, max_history: int) -> None:
        super().__init__()
        self.register_buffer("x", x)
        self.W = torch.nn.Parameter(torch.eye(x.shape[1]))
        self.age_logits = torch.nn.Parameter(torch.zeros(max_history))
        self.log_tau = torch.nn.Parameter(torch.tensor(math.log(10.0)))

    def forward(self, hist: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
        b, h = hist.shape
        age = lens[:, None] - 1 - torch.arange(h)[None]
        logits = self.age_logits[age.clamp(0, h - 1)].masked_fill(age < 0, -math.inf)
        w = torch.softmax(logits, dim=1)
        u = (w[..., None] * self.x[hist.clamp_min(0)]).sum(1) @ self.W
        return self.log_tau.exp() * (u @ self.x.T)


def train_probe(x: torch.Tensor, mask: torch.Tensor, train: Split, valid: Split, test: Split, epochs: int,
                patience: int, lr: float, batch: int, seed: int) -> dict:
    """Train :class:`LinearProbe`; returns valid/test metrics of the best epoch (valid full NDCG@10)."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    probe = LinearProbe(center_normalize(x, mask), train.hist.shape[1])
    opt = torch.optim.Adam(probe.parameters(), lr=lr)
    n = len(train.targets)
    order = torch.argsort(train.excl_rows, stable=True)
    ex_rows, ex_items = train.excl_rows[order], train.excl_items[order]
    best, best_state, bad, log = -1.0, None, 0, []
    t0 = time.perf_counter()
    for ep in range(epochs):
        probe.train()
        perm = torch.from_numpy(rng.permutation(n))
        tot = 0.0
        for s in range(0, n, batch):
            idx = perm[s:s + batch]
            sc = probe(train.hist[idx], train.lens[idx])
            # mask each example's history items (the target excepted), as in the evaluation
            lo = torch.searchsorted(ex_rows, idx)
            hi = torch.searchsorted(ex_rows, idx, right=True)
            cnt = hi - lo
            if int(cnt.sum()):
                r = torch.repeat_interleave(torch.arange(len(idx)), cnt)
                off = torch.arange(int(cnt.sum())) - torch.repeat_interleave(torch.cumsum(cnt, 0) - cnt, cnt)
                sc = sc.index_put((r, ex_items[torch.repeat_interleave(lo, cnt) + off]),
                                  torch.tensor(-math.inf))
            loss = F.cross_entropy(sc, train.targets[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            tot += float(loss.detach()) * len(idx)
        probe.eval()
        v = evaluate(probe, valid)
        log.append({"epoch": ep + 1, "loss": tot / n, "valid_ndcg10": v["full"]["NDCG@10"]})
        if v["full"]["NDCG@10"] > best:
            best, bad = v["full"]["NDCG@10"], 0
            best_state = {k: t.detach().clone() for k, t in probe.state_dict().items()}
            best_valid = v
        else:
            bad += 1
            if bad >= patience:
                break
    probe.load_state_dict(best_state)
    probe.eval()
    return {"valid": best_valid, "test": evaluate(probe, test), "epochs": log,
            "best_epoch": max(log, key=lambda r: r["valid_ndcg10"])["epoch"], "seconds": time.perf_counter() - t0}


def popularity_metrics(prepared, split: Split) -> dict:
    counts = np.zeros(prepared.dataset.n_items, np.float64)
    for s in prepared.dataset.sequences:
        np.add.at(counts, s[:-2], 1.0)  # training prefixes only
    c = torch.from_numpy(counts).float()
    return evaluate(lambda hh, ll: c.expand(len(hh), -1).clone(), split)


# ----------------------------------------------------------------------------------- encoders
def time_encoder(enc, texts: list[str], n_items: int, max_tokens: int, seed: int) -> dict:
    """Wall and process-CPU seconds per 1k items on ``n_items`` random non-empty texts (after a
    16-item warm-up); on a shared machine the CPU time is the steadier number."""
    rng = np.random.default_rng(seed)
    pool = [t for t in texts if t.strip()]
    sample = [pool[i] for i in rng.choice(len(pool), size=min(n_items, len(pool)), replace=False)]
    enc.encode(sample[:16], max_tokens=max_tokens, batch_size=16, progress=False)
    t0, c0 = time.perf_counter(), time.process_time()
    enc.encode(sample, max_tokens=max_tokens, batch_size=32, progress=False)
    dt, dc = time.perf_counter() - t0, time.process_time() - c0
    return {"items": len(sample), "seconds": dt, "cpu_seconds": dc, "s_per_1k_items": dt / len(sample) * 1000,
            "cpu_s_per_1k_items": dc / len(sample) * 1000}


def sweep_features(enc, ds, texts: list[str], fcfg, out: Path, batch: int) -> tuple[dict, torch.Tensor, float | None]:
    """All layers x {mean, last} of an LLMHiddenTextEncoder, cached under ``out/sweep`` (float16)."""
    from safetensors.torch import load_file, save_file

    from speeder_fast.features.store import item_table_hash

    key = hashlib.blake2b(json.dumps([enc.encoder_id, item_table_hash(ds), fcfg.text_template,
                                      fcfg.text_max_tokens]).encode(), digest_size=8).hexdigest()
    path = out / "sweep" / f"{ds.name}-{key}.safetensors"
    if path.is_file():
        t = load_file(str(path))
        feats = {(k.split(".")[0], int(k.split(".l")[1])): v.float() for k, v in t.items() if k != "mask"}
        return feats, t["mask"].bool(), None
    t0 = time.perf_counter()
    feats, mask = enc.encode_layers(texts, None, ["mean", "last"], fcfg.text_max_tokens, batch)
    dt = time.perf_counter() - t0
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({**{f"{p}.l{ly}": v.half() for (p, ly), v in feats.items()}, "mask": mask}, str(path))
    return {k: v.half().float() for k, v in feats.items()}, mask, dt


# ----------------------------------------------------------------------------------- main
def fmt(x: float | None) -> str:
    return "" if x is None else f"{x:.4f}"


def row_cells(r: dict) -> list[str]:
    k, p = r.get("knn", {}), r.get("probe", {}).get("test", {})
    return [fmt(k.get("full", {}).get("HR@10")), fmt(k.get("full", {}).get("NDCG@10")),
            fmt(k.get("cand", {}).get("HR@1")), fmt(k.get("cand", {}).get("NDCG@10")),
            fmt(p.get("full", {}).get("HR@10")), fmt(p.get("full", {}).get("NDCG@10")),
            fmt(p.get("cand", {}).get("HR@1")), fmt(p.get("cand", {}).get("NDCG@10"))]


def render(results: dict) -> str:
    lines = []
    for ds, d in results["datasets"].items():
        lines += [f"### {ds} ({d['n_items']} items, {d['n_test']} test users, {d['n_candidates']} candidates)", "",
                  "| encoder | dim | CPU s / 1k items (wall) | kNN HR@10 | kNN NDCG@10 | kNN cand HR@1 | kNN cand NDCG@10 "
                  "| probe HR@10 | probe NDCG@10 | probe cand HR@1 | probe cand NDCG@10 |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for name, r in d["encoders"].items():
            t, c = r.get("time", {}).get("s_per_1k_items"), r.get("time", {}).get("cpu_s_per_1k_items")
            lines.append(f"| {name} | {r.get('dim', '')} | {'' if t is None else f'{c:.1f} ({t:.1f})'} | "
                         + " | ".join(row_cells(r)) + " |")
        sw = d.get("sweep")
        if sw:
            lines += ["", f"`llm-hidden` layer sweep on {ds} (test kNN NDCG@10 / valid probe NDCG@10 where trained):", "",
                      "| layer | mean: kNN NDCG@10 | mean: kNN cand HR@1 | mean: probe valid NDCG@10 | last: kNN NDCG@10 "
                      "| last: kNN cand HR@1 | last: probe valid NDCG@10 |",
                      "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
            for ly in sorted({int(k.split(":")[1]) for k in sw}):
                cells = []
                for p in ("mean", "last"):
                    r = sw.get(f"{p}:{ly}", {})
                    pv = r.get("probe", {}).get("valid", {}).get("full", {}).get("NDCG@10")
                    cells += [fmt(r.get("knn", {}).get("full", {}).get("NDCG@10")),
                              fmt(r.get("knn", {}).get("cand", {}).get("HR@1")), fmt(pv)]
                lines.append(f"| {ly} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--data", nargs="+", default=["ml-100k", "../shared/data/amazon-office"],
                    help="data.source values ('ml-100k' or a RecBole folder)")
    ap.add_argument("--encoders", nargs="+", default=["llm", "llm-hidden", "minilm", "random", "popularity"],
                    help="llm | llm-hidden | llm-hidden:N | minilm | <sentence-encoder folder> | random | popularity")
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--store-root", default="", help="feature store root (default OUT/features)")
    ap.add_argument("--template", default=None, help="features.text_template (default: the config default)")
    ap.add_argument("--max-tokens", type=int, default=None, help="features.text_max_tokens (default: config)")
    ap.add_argument("--probe-layers", default="0,4,8,12,16,20,24,28,30",
                    help="llm-hidden sweep: layers whose mean pooling also gets the trained probe (comma list or "
                         "'all'); each pooling's best kNN layer (validation) gets it too")
    ap.add_argument("--probe-epochs", type=int, default=30)
    ap.add_argument("--probe-patience", type=int, default=3)
    ap.add_argument("--probe-lr", type=float, default=1e-3)
    ap.add_argument("--probe-batch", type=int, default=256)
    ap.add_argument("--time-items", type=int, default=512, help="items encoded for the timing (0 = skip)")
    ap.add_argument("--batch-size", type=int, default=16, help="encoding batch size (LLM forward passes)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    from speeder_fast.assets import resolve_model
    from speeder_fast.config import DataConfig, FeatureConfig
    from speeder_fast.data.prepare import prepare
    from speeder_fast.features.build import text_store_entry
    from speeder_fast.features.store import FeatureStore
    from speeder_fast.features.text import LLMHiddenTextEncoder, encode_item_texts, make_text_encoder, render_item_texts

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    store = FeatureStore(args.store_root or out / "features")
    fcfg = FeatureConfig()
    if args.template is not None:
        fcfg.text_template = args.template
    if args.max_tokens is not None:
        fcfg.text_max_tokens = args.max_tokens
    llm_dir = resolve_model("smollm2-135m")
    results = {"command": " ".join([Path(sys.executable).name] + sys.argv), "threads": args.threads,
               "torch": torch.__version__, "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
               "cpus": os.cpu_count(), "template": fcfg.text_template, "max_tokens": fcfg.text_max_tokens,
               "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "datasets": {}}
    probe_kw = dict(epochs=args.probe_epochs, patience=args.probe_patience, lr=args.probe_lr,
                    batch=args.probe_batch, seed=args.seed)
    hidden = None  # one LLMHiddenTextEncoder (model loaded once) for every data set

    for src in args.data:
        prepared = prepare(DataConfig(source=src))
        ds = prepared.dataset
        texts, present = render_item_texts(ds, fcfg.text_template)
        train, valid, test = make_split(prepared, "train"), make_split(prepared, "valid"), make_split(prepared, "test")
        dres = {"source": src, "n_items": ds.n_items, "n_test": len(test.targets),
                "n_candidates": int(prepared.test_candidates.shape[1]), "n_with_text": int(present.sum()),
                "encoders": {}}
        results["datasets"][ds.name] = dres
        print(f"== {ds.name}: {ds.n_items} items, {len(train.targets)} train windows, {len(test.targets)} test users",
              flush=True)

        def probe_all(x, mask, with_probe=True):
            r = knn_metrics(x, mask, test)
            r["knn_valid"] = knn_metrics(x, mask, valid)["knn"]
            if with_probe:
                r["probe"] = train_probe(x, mask, train, valid, test, **probe_kw)
            return r

        for spec in args.encoders:
            t0 = time.perf_counter()
            if spec == "popularity":
                dres["encoders"][spec] = {"knn": popularity_metrics(prepared, test), "dim": 0}
                continue
            if spec == "random":
                g = torch.Generator().manual_seed(args.seed)
                x = torch.randn(ds.n_items, 384, generator=g)
                r = probe_all(x, torch.ones(ds.n_items, dtype=torch.bool))
                r["dim"] = 384
                dres["encoders"][spec] = r
                print(f"   {spec}: {json.dumps(row_cells(r))}", flush=True)
                continue
            if spec.startswith("llm-hidden"):
                if hidden is None:
                    hidden = LLMHiddenTextEncoder.from_pretrained(llm_dir, -1)
                if spec == "llm-hidden":
                    feats, mask, dt = sweep_features(hidden, ds, texts, fcfg, out, args.batch_size)
                    mask = mask & torch.from_numpy(present)
                    wanted = (range(hidden.n_layers + 1) if args.probe_layers == "all"
                              else [int(v) for v in args.probe_layers.split(",") if v.strip()])
                    sweep = {f"{pool}:{ly}": probe_all(x, mask, with_probe=False) for (pool, ly), x in feats.items()}
                    # the trained probe: mean pooling at --probe-layers, plus each pooling's best kNN layer
                    chosen = {f"mean:{ly}" for ly in wanted}
                    for pool in ("mean", "last"):
                        chosen.add(max((k for k in sweep if k.startswith(pool)),
                                       key=lambda k: sweep[k]["knn_valid"]["full"]["NDCG@10"]))
                    for k in sorted(chosen, key=lambda k: (k.split(":")[0], int(k.split(":")[1]))):
                        pool, ly = k.split(":")
                        sweep[k]["probe"] = train_probe(feats[(pool, int(ly))], mask, train, valid, test, **probe_kw)
                        print(f"   sweep {k} kNN {fmt(sweep[k]['knn']['full']['NDCG@10'])} probe valid "
                              f"{fmt(sweep[k]['probe']['valid']['full']['NDCG@10'])}", flush=True)
                    dres["sweep"] = sweep
                    dres["sweep_encode_seconds"] = dt
                    best = max((k for k in sweep if "probe" in sweep[k]),
                               key=lambda k: sweep[k]["probe"]["valid"]["full"]["NDCG@10"])
                    best_knn = max(sweep, key=lambda k: sweep[k]["knn_valid"]["full"]["NDCG@10"])
                    pool, layer = best.split(":")[0], int(best.split(":")[1])
                    dres["llm_hidden_selected"] = {"by_probe_valid": best, "by_knn_valid": best_knn}
                    enc = LLMHiddenTextEncoder(hidden.tokenizer, hidden.model, layer, name=hidden.name, pooling=pool)
                    name = f"llm-hidden (layer {layer}, {pool})"
                    x_sweep = feats[(pool, layer)]
                    build = lambda enc=enc, xs=x_sweep, m=mask: (xs, m)  # noqa: E731 - same values as encode()
                else:
                    layer = int(spec.split(":")[1])
                    enc = LLMHiddenTextEncoder(hidden.tokenizer, hidden.model, layer, name=hidden.name)
                    name = f"llm-hidden (layer {enc.layer}, mean)"
                    build = None
            elif spec == "llm":
                enc, name, build = make_text_encoder("llm", llm_dir), "llm (input-embedding mean)", None
            else:
                enc = make_text_encoder(spec, None)
                name, build = ("minilm (all-MiniLM-L6-v2)" if spec == "minilm" else spec), None
            enc_id, opts = text_store_entry(enc, fcfg)
            built = {}

            def build_fn(enc=enc, build=build):
                t1 = time.perf_counter()
                res = build() if build else encode_item_texts(ds, enc, fcfg.text_template, fcfg.text_max_tokens,
                                                              args.batch_size if spec.startswith("llm-hidden") else 64)
                built["seconds"] = time.perf_counter() - t1
                return res

            x, mask = store.get_or_build(ds, "text", enc_id, opts, build_fn, fcfg.store_dtype)
            r = probe_all(x, mask)
            r.update({"dim": int(x.shape[1]), "encoder_id": enc_id, "options": opts,
                      "build_seconds": built.get("seconds"), "n_with_text": int(mask.sum())})
            if args.time_items:
                r["time"] = time_encoder(enc, texts, args.time_items, fcfg.text_max_tokens, args.seed)
            dres["encoders"][name] = r
            print(f"   {name}: {json.dumps(row_cells(r))} ({time.perf_counter() - t0:.0f} s)", flush=True)
        (out / "results.json").write_text(json.dumps(results, indent=1, sort_keys=True))
        (out / "results.md").write_text(render(results))
    results["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    (out / "results.json").write_text(json.dumps(results, indent=1, sort_keys=True))
    (out / "results.md").write_text(render(results))
    print(render(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
