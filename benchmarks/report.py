"""Benchmark report: pytest-benchmark / collector JSON -> markdown rows + PNG plots.

    python benchmarks/report.py --json runs/bench/cpu.json [--json runs/bench/paradigms_summary.json] \\
        [--json kernels.json --json fastpath.json] --out-md runs/bench/RESULTS_cpu.md --plots runs/bench/plots

Inputs (any mix, any order; the kind of each file is detected from its content):

* pytest-benchmark JSON (``--benchmark-json``): paradigm records come from each benchmark's
  ``extra_info`` (``bench == "paradigm"``), with the machine/commit info of the run; other
  benchmarks (kernels) are listed with their median time.
* the paradigm collector JSON (``kind == "speeder_paradigm_bench"``, written at the end of a
  ``benchmarks/test_bench_paradigms.py`` session): records, skipped cases, environment, ratios.
* ``benchmarks/bench_kernels.py --out`` JSON (``rows`` + ``copy_gbs``) and
  ``benchmarks/fastpath_check.py --out`` JSON (``markdown``): included as they are.

Ratios are always recomputed here from the records of ONE file (:func:`compute_ratios`): speedup of
``speeder`` over ``verbose`` / ``titles`` = their ``samples_per_s`` ratio for the same model,
device, phase, batch and history length, i.e. measured in the same run. Plots (matplotlib, Agg):
``history_scaling.png`` (time per sample vs history length per paradigm) and ``speedups.png``
(speedup bars with the paper's 2.5x training / 4x inference lines). This module needs no torch.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable

#: the paper's bars (Speeder vs the verbose baseline), asserted for the protocols this project
#: recommends: training, scoring (label and next-item head) and constrained generation (the evaluation
#: default). Plain free-text generation (``generate``, the original LLaRA protocol, ``eval.constrained=
#: false``) is measured and reported but not asserted: its time is dominated by the decode-token cap,
#: the same for every paradigm, and it is not a protocol this project recommends.
BARS = {"train": 2.5, "score": 4.0, "score_compiled": 4.0, "generate_constrained": 4.0}
PARADIGM_ORDER = ("verbose", "titles", "speeder", "titles-item", "speeder-item")
COLORS = {"verbose": "tab:blue", "titles": "tab:green", "speeder": "tab:orange", "titles-item": "tab:olive",
          "speeder-item": "tab:red"}
#: (speeder paradigm, baseline, protocol) pairs that are compared; the bars (:data:`BARS`) are asserted on
#: the pairs against ``verbose`` (the paper's baseline). ``label``: both rank 20 candidates listed in the
#: prompt (LLaRA); ``item``: both use the next-item head (full catalogue); ``item vs label``: the
#: recommended path (next-item head, no candidates in the prompt) against the verbose label protocol --
#: each side does its own job of recommending the next item
PAIRS = (("speeder", "verbose", "label"), ("speeder", "titles", "label"),
         ("speeder-item", "verbose", "item vs label"), ("speeder-item", "titles-item", "item"))


# ----------------------------------------------------------------------------------------------
# ratios (shared with the pytest collector)
# ----------------------------------------------------------------------------------------------
def _group_key(r: dict) -> tuple:
    return (r["model"], r["device"], r.get("card", ""), r["phase"], r.get("batch_kind", "fixed"),
            r["batch"] if r.get("batch_kind", "fixed") == "fixed" else "max", r.get("history"))


def compute_ratios(records: Iterable[dict]) -> dict[str, Any]:
    """Speeder speedups over ``verbose`` and ``titles`` from records of one run.

    Returns ``{"pairs": [...], "bar_checks": [...]}``. Each pair (one of :data:`PAIRS`): model, device,
    card, phase, batch (``"max"`` for the largest-batch case: then each paradigm has its own batch),
    history, ``speeder`` (``speeder`` or ``speeder-item``), baseline, ``protocol``, ``speedup`` (speeder
    samples/s / baseline samples/s), ``token_ratio`` (baseline mean prompt tokens / speeder's).
    ``bar_checks``: the pairs the paper's bars (:data:`BARS`) are asserted on, per protocol --
    baseline ``verbose``, real histories, fixed batch; training at every batch;
    inference (score, generate) at the model's largest fixed inference batch only (on a GPU a
    batch of 1 is launch-bound). Smoke records never carry checks.
    """
    records = [r for r in records if r.get("bench", "paradigm") == "paradigm"]
    groups: dict[tuple, dict[str, dict]] = {}
    for r in records:
        groups.setdefault(_group_key(r), {})[r["paradigm"]] = r
    # largest fixed inference batch per (model, device, card, phase)
    infer_batch: dict[tuple, int] = {}
    for r in records:
        if r["phase"] != "train" and r.get("batch_kind", "fixed") == "fixed" and r.get("history") is None:
            k = (r["model"], r["device"], r.get("card", ""), r["phase"])
            infer_batch[k] = max(infer_batch.get(k, 0), int(r["batch"]))
    pairs, checks = [], []
    for key, by_p in sorted(groups.items(), key=lambda kv: tuple(str(x) for x in kv[0])):
        model, device, card, phase, kind, batch, history = key
        for sp_name, base, protocol in PAIRS:
            sp, b = by_p.get(sp_name), by_p.get(base)
            if sp is None or b is None or not b.get("samples_per_s") or not sp.get("samples_per_s"):
                continue
            speed = sp["samples_per_s"] / b["samples_per_s"]
            tok = (b.get("prompt_tokens_mean") or 0) / sp["prompt_tokens_mean"] if sp.get("prompt_tokens_mean") else None
            pair = {"model": model, "device": device, "card": card, "phase": phase, "batch": batch,
                    "batch_speeder": sp["batch"], "batch_baseline": b["batch"], "history": history, "baseline": base,
                    "speeder": sp_name, "protocol": protocol,
                    "speedup": speed, "token_ratio": tok, "speeder_samples_per_s": sp["samples_per_s"],
                    "baseline_samples_per_s": b["samples_per_s"], "smoke": bool(sp.get("smoke") or b.get("smoke"))}
            pairs.append(pair)
            if base != "verbose" or history is not None or kind != "fixed" or pair["smoke"]:
                continue
            if phase not in BARS:
                continue
            if phase != "train" and int(batch) != infer_batch.get((model, device, card, phase)):
                continue
            bar = BARS[phase]
            checks.append({**pair, "bar": bar, "passes": speed >= bar})
    return {"pairs": pairs, "bar_checks": checks}


# ----------------------------------------------------------------------------------------------
# loading
# ----------------------------------------------------------------------------------------------
def load_inputs(paths: Iterable[str | Path]) -> dict[str, Any]:
    """Read every JSON and sort its content into records / skipped / meta / other sections."""
    out: dict[str, Any] = {"records": [], "skipped": [], "meta": [], "other": [], "kernels": [], "fastpath": [],
                           "token_summary": {}}
    seen: dict[tuple, int] = {}
    for path in paths:
        p = Path(path)
        try:
            d = json.loads(p.read_text())
        except FileNotFoundError as e:
            raise SystemExit(f"report: {p} does not exist") from e
        except json.JSONDecodeError as e:
            raise SystemExit(f"report: {p} is not valid JSON (line {e.lineno}: {e.msg})") from e
        if not isinstance(d, dict):
            raise SystemExit(f"report: {p}: expected a JSON object at the top level")
        recs: list[dict] = []
        if "benchmarks" in d:  # pytest-benchmark
            mi = d.get("machine_info", {})
            out["meta"].append({"source": str(p), "kind": "pytest-benchmark", "date": d.get("datetime"),
                                "machine": {k: mi.get(k) for k in ("node", "processor", "machine", "python_version")},
                                "cpu": (mi.get("cpu") or {}).get("brand_raw"),
                                "commit": (d.get("commit_info") or {}).get("id"),
                                "pytest_benchmark": d.get("version")})
            for b in d["benchmarks"]:
                ei = b.get("extra_info") or {}
                if ei.get("bench") == "paradigm":
                    recs.append(dict(ei))
                elif ei.get("bench") == "paradigm_tokens":
                    out["token_summary"].update(ei.get("token_summary") or {})
                elif ei.get("bench") == "paradigm_ratios":
                    continue
                else:
                    st = b.get("stats") or {}
                    out["other"].append({"name": b.get("name"), "group": b.get("group"), "median_ms": 1000 * st.get("median", float("nan")),
                                         "rounds": st.get("rounds"), "extra": {k: v for k, v in ei.items() if not isinstance(v, (dict, list))}})
        elif d.get("kind") == "speeder_paradigm_bench":
            recs = list(d.get("records", []))
            out["skipped"].extend(d.get("skipped", []))
            out["meta"].append({"source": str(p), "kind": "collector", **(d.get("meta") or {})})
            out["token_summary"].update(d.get("token_summary") or {})
        elif "rows" in d and "copy_gbs" in d:
            out["kernels"].append(d)
        elif "results" in d and "markdown" in d:
            out["fastpath"].append(d)
        elif d.get("skipped") and len(d) == 1:
            out["other"].append({"name": p.name, "group": "skipped", "median_ms": float("nan"), "rounds": 0,
                                 "extra": {"why": d["skipped"]}})
        else:
            raise SystemExit(f"report: {p}: unknown JSON (not pytest-benchmark, collector, kernels or fastpath output)")
        for r in recs:
            missing = [k for k in ("case_id", "model", "device", "phase", "paradigm", "batch", "samples_per_s") if k not in r]
            if missing:
                raise SystemExit(f"report: {p}: record {r.get('case_id', '?')} lacks {missing}")
            key = (r["case_id"], r["device"], r.get("card", ""))
            if key in seen:  # same measurement in two files (collector + pytest-benchmark): keep the first
                continue
            seen[key] = len(out["records"])
            out["records"].append(r)
    return out


# ----------------------------------------------------------------------------------------------
# markdown
# ----------------------------------------------------------------------------------------------
def _f(x: Any, nd: int = 1) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    if isinstance(x, (int,)) and not isinstance(x, bool):
        return str(x)
    return f"{x:.{nd}f}"


def _sig(x: Any) -> str:
    """3 significant digits (times from 0.1 ms to minutes)."""
    if x is None or not isinstance(x, (int, float)) or not math.isfinite(x):
        return "-"
    if x == 0:
        return "0"
    return f"{x:.{max(0, 2 - int(math.floor(math.log10(abs(x)))))}f}"


def _mem(r: dict) -> str:
    if r.get("peak_mem_mb") is None:
        return "-"
    if r.get("mem_kind") == "cuda_max_allocated":
        return f"{r['peak_mem_mb'] / 1024:.2f} GB"
    return f"{r['peak_mem_mb']:.0f} MB RSS (+{r.get('step_mem_mb', 0):.0f})"


def _sort(records: list[dict]) -> list[dict]:
    def key(r: dict) -> tuple:
        b = r["batch"] if isinstance(r["batch"], int) else 10**9
        return (r["model"], r["device"], r["phase"], r.get("batch_kind", "fixed"), b, r.get("history") or 0,
                PARADIGM_ORDER.index(r["paradigm"]) if r["paradigm"] in PARADIGM_ORDER else 9)
    return sorted(records, key=key)


def environment_lines(meta: list[dict], records: list[dict]) -> list[str]:
    lines = []
    cards = sorted({(r["device"], r.get("card", "")) for r in records})
    for dev, card in cards:
        lines.append(f"- device: **{card}** ({dev})")
    dtypes = sorted({f"{r['model']}: {r.get('dtype', r.get('precision', '?'))}, weights {r.get('weights', '?')}" for r in records})
    if dtypes:
        lines.append("- models: " + "; ".join(dtypes))
    fast = sorted({(r["model"], str(r.get("packing")), str(r.get("attn_impl")), str(r.get("liger"))) for r in records
                   if "attn_impl" in r})
    for model, packing, attn, liger in fast:
        lines.append(f"- fast path ({model}, as the model set it up): packing {packing}, attention {attn}, liger {liger}")
    for m in meta:
        if m.get("kind") == "collector":
            v = m.get("versions") or {}
            lines.append("- versions: " + ", ".join(f"{k} {val}" for k, val in v.items() if val))
            lines.append(f"- date: {m.get('date')}; python {m.get('python')}; smoke mode: {m.get('smoke')}")
            if m.get("torch_threads") is not None:
                lines.append(f"- torch CPU threads: {m.get('torch_threads')}")
            if m.get("loadavg_start") is not None:
                la = m.get("loadavg_start")
                le = m.get("loadavg_end") or la
                lines.append(f"- load average at start / end: {la[0]:.2f} / {le[0]:.2f} (1-min; >cores = shared machine)")
            if m.get("gpu_memory_gb"):
                lines.append(f"- GPU memory: {m['gpu_memory_gb']} GB")
            if m.get("data"):
                lines.append(f"- data: {m.get('data')}")
        elif m.get("kind") == "pytest-benchmark":
            lines.append(f"- pytest-benchmark run {m.get('date')} (commit {str(m.get('commit'))[:10]}), CPU {m.get('cpu')}")
    return lines


def markdown(data: dict[str, Any], title: str = "Paradigm benchmarks") -> str:
    recs = _sort(data["records"])
    out = [f"### {title}", "", f"Generated {time.strftime('%Y-%m-%d %H:%M')} by `benchmarks/report.py`.", ""]
    out += environment_lines(data["meta"], recs)
    out.append("")
    ts = data.get("token_summary") or {}
    if ts:
        out += ["#### Prompt tokens over all test users (persisted candidates, real histories <= 10)", "",
                "| paradigm | users | mean | p50 | p90 | max |", "|---|---|---|---|---|---|"]
        for p in PARADIGM_ORDER:
            s = ts.get(p)
            if s:
                out.append(f"| {p} | {s.get('users')} | {_f(s.get('mean'))} | {_f(s.get('p50'), 0)} | {_f(s.get('p90'), 0)} | {s.get('max')} |")
        out.append("")
    train = [r for r in recs if r["phase"] == "train" and r.get("history") is None]
    if train:
        out += ["#### Training (one optimizer step: prompt build + forward + backward + AdamW)", "",
                "| model | dtype | paradigm | batch | prompt tokens mean / max | padded len | ms / step (median) | samples/s | peak memory | rounds |",
                "|---|---|---|---|---|---|---|---|---|---|"]
        for r in train:
            b = f"{r['batch']} (max fit)" if r.get("batch_kind") == "max" else str(r["batch"])
            out.append(f"| {r['model']} | {r.get('dtype')} | {r['paradigm']} | {b} | {_f(r.get('prompt_tokens_mean'))} / "
                       f"{r.get('prompt_tokens_max')} | {r.get('padded_len')} | {_sig(1000 * r['median_s'])} | "
                       f"{_sig(r['samples_per_s'])} | {_mem(r)} | {r.get('rounds')} |")
        out.append("")
    inf = [r for r in recs if r["phase"] != "train" and r.get("history") is None]
    if inf:
        out += ["#### Inference (per user: build + forward (+ greedy decode) + answer)", "",
                "| model | dtype | mode | paradigm | batch | prompt tokens mean / max | ms / batch | ms / user | users/s | new tokens | peak memory |",
                "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in inf:
            gen = f"{_f(r.get('gen_new_tokens_mean'))} (cap {r.get('max_new_tokens')})" if r["phase"].startswith("generate") else "-"
            out.append(f"| {r['model']} | {r.get('dtype')} | {r['phase']} | {r['paradigm']} | {r['batch']} | "
                       f"{_f(r.get('prompt_tokens_mean'))} / {r.get('prompt_tokens_max')} | {_sig(1000 * r['median_s'])} | "
                       f"{_sig(r['ms_per_sample'])} | {_sig(r['samples_per_s'])} | {gen} | {_mem(r)} |")
        out.append("")
    longh = [r for r in recs if r.get("history") is not None]
    if longh:
        out += ["#### Long histories (real catalogue items pad the real history to H)", "",
                "| model | phase | batch | history | paradigm | prompt tokens mean | ms / step | ms / sample | peak memory |",
                "|---|---|---|---|---|---|---|---|---|"]
        for r in sorted(longh, key=lambda r: (r["model"], r["phase"], r["batch"], r["history"], r["paradigm"])):
            out.append(f"| {r['model']} | {r['phase']} | {r['batch']} | {r['history']} | {r['paradigm']} | "
                       f"{_f(r.get('prompt_tokens_mean'))} | {_sig(1000 * r['median_s'])} | {_sig(r['ms_per_sample'])} | {_mem(r)} |")
        out.append("")
    ratios = compute_ratios(recs)
    if ratios["pairs"]:
        def k(c: dict) -> tuple:
            return (c["model"], c["device"], c["phase"], str(c["batch"]), c["history"], c.get("speeder", "speeder"),
                    c["baseline"])

        asserted = {k(c): c for c in ratios["bar_checks"]}
        out += ["#### Speeder speedups (samples/s ratio, same run)", "",
                "| model | device | phase | batch | history | speeder | vs | protocol | speedup | prompt-token ratio | "
                "paper bar | result |",
                "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for p in ratios["pairs"]:
            c = asserted.get(k(p))
            if c is not None:
                res = "**pass**" if c["passes"] else "**FAIL**"
                bar = f">= {c['bar']}x"
            else:
                res, bar = "reported", "-"
            batch = p["batch"] if p["batch"] != "max" else f"max ({p['batch_speeder']} vs {p['batch_baseline']})"
            hist = p["history"] if p["history"] is not None else "real"
            out.append(f"| {p['model']} | {p['device']} | {p['phase']} | {batch} | {hist} | "
                       f"{p.get('speeder', 'speeder')} | {p['baseline']} | {p.get('protocol', 'label')} | "
                       f"{p['speedup']:.2f}x | {_f(p['token_ratio'], 2)}x | {bar} | {res} |")
        out.append("")
    if data["skipped"]:
        out += ["#### Skipped cases", ""]
        by_why: dict[str, list[str]] = {}
        for s in data["skipped"]:
            by_why.setdefault(str(s.get("why")), []).append(str(s.get("case_id")))
        for why, ids in by_why.items():
            shown = ", ".join(f"`{i}`" for i in ids[:3]) + (f" and {len(ids) - 3} more" if len(ids) > 3 else "")
            out.append(f"- {shown}: {why}")
        out.append("")
    for k in data["kernels"]:
        out += [f"#### Kernels ({k.get('card')}, copy bandwidth {_f(k.get('copy_gbs'), 0)} GB/s)", "",
                "| case | mode | Triton ms | eager ms | compile ms | vs eager | vs compile | Triton GB/s | % copy BW |",
                "|---|---|---|---|---|---|---|---|---|"]
        for r in k["rows"]:
            out.append(f"| {r.get('case')} | {r.get('mode')} | {_f(r.get('triton_ms'), 4)} | {_f(r.get('eager_ms'), 4)} | "
                       f"{_f(r.get('compile_ms'), 4)} | {_f(r.get('speedup_vs_eager'), 2)}x | {_f(r.get('speedup_vs_compile'), 2)}x | "
                       f"{_f(r.get('triton_gbs'), 0)} | {_f(r.get('pct_of_copy_bw'), 0)}% |")
        out.append("")
    for fp in data["fastpath"]:
        out += ["#### Fast path (benchmarks/fastpath_check.py)", "", fp["markdown"], ""]
    if data["other"]:
        out += ["#### Other benchmarks (pytest-benchmark median)", "", "| benchmark | group | median ms | rounds | info |",
                "|---|---|---|---|---|"]
        for o in data["other"]:
            info = ", ".join(f"{k}={v}" for k, v in sorted(o["extra"].items()) if k not in ("card",))
            out.append(f"| {o['name']} | {o.get('group')} | {_sig(o['median_ms'])} | {o.get('rounds')} | {info} |")
        out.append("")
    return "\n".join(out).rstrip() + "\n"


# ----------------------------------------------------------------------------------------------
# plots
# ----------------------------------------------------------------------------------------------
def _atomic_savefig(fig: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=110, bbox_inches="tight")
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def plots(data: dict[str, Any], out_dir: str | Path) -> list[Path]:
    """Write ``history_scaling.png`` and ``speedups.png`` (when there is something to plot)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    written: list[Path] = []
    recs = data["records"]
    card = ", ".join(sorted({r.get("card", r["device"]) for r in recs}))[:90]
    longh = [r for r in recs if r.get("history") is not None]
    panels = sorted({(r["model"], r["device"], r["phase"], r["batch"]) for r in longh})
    if panels:
        n = len(panels)
        fig, axes = plt.subplots(1, n, figsize=(4.6 * n, 3.8), squeeze=False)
        for ax, (model, dev, phase, batch) in zip(axes[0], panels):
            for p in PARADIGM_ORDER:
                pts = sorted((r["history"], r["ms_per_sample"]) for r in longh
                             if (r["model"], r["device"], r["phase"], r["batch"], r["paradigm"]) == (model, dev, phase, batch, p))
                if pts:
                    ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=p, color=COLORS.get(p))
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("history length (items)")
            ax.set_ylabel("ms per sample")
            ax.set_title(f"{model} {phase} B={batch} ({dev})", fontsize=9)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
        fig.suptitle(f"Time vs history length - {card}", fontsize=9)
        path = out_dir / "history_scaling.png"
        _atomic_savefig(fig, path)
        plt.close(fig)
        written.append(path)
    pairs = compute_ratios(recs)["pairs"]
    if pairs:
        labels = [f"{p['model']}\n{p['phase']} B={p['batch']}" + (f" H={p['history']}" if p["history"] is not None else "")
                  + f"\n{p.get('speeder', 'speeder')} vs {p['baseline']}" for p in pairs]
        vals = [p["speedup"] for p in pairs]
        colors = [COLORS.get(p["baseline"], "tab:gray") for p in pairs]
        fig, ax = plt.subplots(figsize=(max(6.0, 0.75 * len(pairs) + 2), 4.2))
        ax.bar(range(len(pairs)), vals, color=colors)
        for i, v in enumerate(vals):
            ax.text(i, v, f"{v:.1f}x", ha="center", va="bottom", fontsize=7)
        ax.axhline(BARS["train"], color="tab:red", ls="--", lw=1, label="paper bar: train 2.5x")
        ax.axhline(BARS["score"], color="tab:purple", ls=":", lw=1, label="paper bar: inference 4x")
        ax.axhline(1.0, color="black", lw=0.6)
        ax.set_xticks(range(len(pairs)))
        ax.set_xticklabels(labels, fontsize=6, rotation=90)
        ax.set_ylabel("speeder speedup (samples/s ratio)")
        ax.set_title(f"Speeder vs verbose (blue) / titles (green) - {card}", fontsize=9)
        ax.legend(fontsize=7)
        path = out_dir / "speedups.png"
        _atomic_savefig(fig, path)
        plt.close(fig)
        written.append(path)
    return written


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--json", action="append", required=True, help="input JSON (repeatable)")
    ap.add_argument("--out-md", default="", help="markdown output file (default: stdout only)")
    ap.add_argument("--plots", default="", help="folder for PNG plots (none if empty)")
    ap.add_argument("--title", default="Paradigm benchmarks")
    ap.add_argument("--paradigms-only", action="store_true", help="leave out kernel / other benchmark rows")
    args = ap.parse_args(argv)
    data = load_inputs(args.json)
    if args.paradigms_only:
        data.update(other=[], kernels=[], fastpath=[])
    md = markdown(data, args.title)
    print(md)
    if args.out_md:
        out = Path(args.out_md)
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
        with os.fdopen(fd, "w") as f:
            f.write(md)
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
        print(f"wrote {out}", file=sys.stderr)
    if args.plots:
        for p in plots(data, args.plots):
            print(f"wrote {p}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
