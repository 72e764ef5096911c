"""The quality table: one recipe, several rows, the same users, candidates and seeds.

    python benchmarks/quality_table.py --dataset ml-100k --out runs/quality/ml [--rows ROW ...] [--list]
    python benchmarks/quality_table.py --dataset amazon-office --out runs/quality/office

Every row is one ``python -m speeder_fast.train`` run (a subprocess, so each row gets a fresh
process and its own wall time) with the dataset's preset (``ml-100k``: ``quick``, i.e. the default
run) and shared settings plus the row's own ``--set`` overrides; it trains, evaluates the test split on the same seeded users (``eval.max_examples``) and
the persisted candidates, and writes ``eval_test_<mode>.json`` into ``OUT/<row>/``. The reference
rows (SASRec, popularity) come from the first run that has them (same users, same candidates). The
table (``OUT/quality.md`` + ``quality.json``) lists: HR@1 on the persisted candidates, full-catalogue
HR@10 / NDCG@10 (history excluded), steps x batch, training / total wall time, tokens per prompt and
the machine. Rows that already have a finished run in ``OUT`` are not run again (``--force`` reruns).

Run nothing else heavy beside it: the wall times are only meaningful on a quiet machine. To use
both cores of a 2-core machine for the metrics, run two invocations with disjoint ``--rows`` and
``OMP_NUM_THREADS=1``, then one with every row (finished rows are only read) to write the table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OFFICE = str(ROOT.parent / "shared" / "data" / "amazon-office")


def _stages(*stages: tuple[list[str], int], lr: float | None = None) -> str:
    return "train.stages=" + json.dumps([{"modalities": m, "max_steps": n, "lr": lr or LR} for m, n in stages])


LR = 1e-3
#: settings every row shares on top of its dataset's preset (the quick preset's recipe for datasets
#: that do not start from it); nothing here is tuned per dataset
#: the head before late fusion became the default: keys from the MoME mixture, no per-modality loss
MIXTURE = ["model.head_keys=mixture", "train.item_modality_loss=0"]
#: the adapter lr multiplier before 1x became the default (second session of 2026-12-01)
LR5 = ["train.adapter_lr_scale=5"]
RECIPE = ["train.batch_size=16", "model.lora_dropout=0.0", "features.text_encoder=minilm", "eval.max_examples=200"]
#: the recipe before cross-fitting and fusion became the quick preset's (fifth session of 2026-12-01):
#: every row that does not choose them runs without them, so each row still means what was measured
#: (on datasets without the quick preset these are the defaults anyway)
PRE_CROSSFIT = ["features.sasrec_crossfit=0", "model.sasrec_fusion=off"]

#: per dataset: the source, the preset, the shared settings and the step budget of the main rows
DATASETS: dict[str, dict] = {
    # exactly the default run (``python -m speeder_fast.train``: the quick preset) and its variations
    "ml-100k": {"source": "ml-100k", "preset": "quick", "sets": [], "steps": 150},
    "ml-100k-large": {"source": "ml-100k", "preset": "none",
                      "sets": ["data.max_train_examples=0", "features.sasrec_epochs=200", "train.eval_every=100",
                               "train.eval_max_examples=200"], "steps": 600},
    # one epoch of the 3,329 windows at batch 16 (past it the validation metrics fall)
    "amazon-office": {"source": OFFICE, "preset": "none",
                      "sets": ["data.max_train_examples=0", "features.sasrec_epochs=200", "train.eval_every=100",
                               "train.eval_max_examples=200"], "steps": 209},
}


def rows_for(steps: int) -> dict[str, list[str]]:
    """Row name -> ``--set`` overrides (on top of the dataset settings and :data:`RECIPE`).

    ``speeder-item-crossfit-fusion`` is the recipe (the quick preset since the fifth session of
    2026-12-01): ``speeder-item`` (text + collab in one stage, late-fusion head with the per-modality
    loss, adapter lr 1x) with cross-fitted collab features and SASRec score fusion. Every row runs
    after :data:`PRE_CROSSFIT`, so rows that do not choose those two run without them. Rows measured under an earlier default pin what they ran
    with, so each row still means what was measured: the mixture head (:data:`MIXTURE`, the default
    until 2026-12-01; those rows change one thing from ``speeder-item-mixture``) and the 5x adapter
    lr (:data:`LR5`, the default until the second 2026-12-01 session; the ``-lf`` rows pinned to it
    change one thing from ``speeder-item-lr5``). ``speeder-item-mpo-lr1-lf`` and its ``-long``
    variant run at the 1x lr and change only the stages of ``speeder-item``.
    """
    half = steps // 2
    speeder = ["prompt.paradigm=speeder"]
    mix = speeder + MIXTURE + LR5
    lf5 = speeder + LR5
    joint = _stages((["text", "collab"], steps),)
    text_first = _stages((["text"], half), (["text", "collab"], steps - half))
    last2 = "train.stages=" + json.dumps([{"modalities": ["text", "collab"], "epochs": 2.0, "max_steps": 0, "lr": LR}])
    return {
        "speeder-item": speeder + [joint],
        # one change each from speeder-item: half the lr everywhere, LoRA dropout 0.1
        "speeder-item-half-lr": speeder + [_stages((["text", "collab"], steps), lr=LR / 2)],
        "speeder-item-lora-dropout": speeder + ["model.lora_dropout=0.1", joint],
        # SASRec's per-slot user state added to the history tokens (model.user_state=sasrec, A-LLMRec style)
        "speeder-item-user-state": speeder + ["model.user_state=sasrec", joint],
        # with a converged SASRec (ML-100K's quick preset trains it 20 epochs): the default, and the user state
        "speeder-item-sasrec200-lr1": speeder + ["features.sasrec_epochs=200", joint],
        "speeder-item-user-state-sasrec200": speeder + ["model.user_state=sasrec", "features.sasrec_epochs=200", joint],
        # one target per user, the last training transition, for 2 epochs of the users (404 steps on office):
        # with the usual collab encoder, and with one that never trained on that transition (sasrec_holdout=1)
        "speeder-item-last-transition": speeder + ["data.last_window_only=true", "train.item_all_positions=false",
                                                   last2],
        "speeder-item-holdout-last-transition": speeder + ["data.last_window_only=true", "features.sasrec_holdout=1",
                                                           "train.item_all_positions=false", last2],
        "speeder-item-holdout-last-transition-collab": speeder + [
            'features.modalities=["collab"]', "data.last_window_only=true", "features.sasrec_holdout=1",
            "train.item_all_positions=false",
            "train.stages=" + json.dumps([{"modalities": ["collab"], "epochs": 2.0, "max_steps": 0, "lr": LR}])],
        "speeder-item-holdout-last-transition-user-state": speeder + [
            "data.last_window_only=true", "features.sasrec_holdout=1", "model.user_state=sasrec",
            "train.item_all_positions=false", last2],
        # score fusion with the reference SASRec (model.sasrec_fusion=auto: weight picked on validation after
        # training; training itself is unchanged): on the holdout recipe, and on the default
        "speeder-item-holdout-last-transition-fusion": speeder + [
            "data.last_window_only=true", "features.sasrec_holdout=1", "model.sasrec_fusion=auto",
            "train.item_all_positions=false", last2],
        "speeder-item-fusion": speeder + ["model.sasrec_fusion=auto", joint],
        # cross-fitted collab features (4 user folds, each training batch reads the SASRec blind to its users),
        # every position trained, as the default; without and with score fusion
        "speeder-item-crossfit": speeder + ["features.sasrec_crossfit=4", joint],
        "speeder-item-crossfit-fusion": speeder + ["features.sasrec_crossfit=4", "model.sasrec_fusion=auto", joint],
        "speeder-item-crossfit-fusion-2ep": speeder + ["features.sasrec_crossfit=4", "model.sasrec_fusion=auto", last2],
        "speeder-item-crossfit-fusion-2ep-collab": speeder + [
            'features.modalities=["collab"]', "features.sasrec_crossfit=4", "model.sasrec_fusion=auto",
            "train.stages=" + json.dumps([{"modalities": ["collab"], "epochs": 2.0, "max_steps": 0, "lr": LR}])],
        # every position of each user's last window held out of the collab encoder (holdout = max_history)
        "speeder-item-holdout-window-fusion": speeder + [
            "data.last_window_only=true", "features.sasrec_holdout=10", "model.sasrec_fusion=auto", last2],
        # the raw SASRec item embeddings as one more head block (plain dot product), alone and with the user state
        "speeder-item-collab-dot": speeder + ["model.head_collab_dot=true", joint],
        "speeder-item-user-state-dot": speeder + ["model.user_state=sasrec", "model.head_collab_dot=true", joint],
        # collab alone at the same lr: does text add to collab?
        "speeder-item-collab-lr1": speeder + ['features.modalities=["collab"]', _stages((["collab"], steps),)],
        # MPO (the paper's order: text first), the stages of the mixture rows; then a whole budget of
        # joint steps after the text stage (1.5x the steps)
        "speeder-item-mpo-lr1-lf": speeder + [text_first],
        "speeder-item-mpo-lr1-long-lf": speeder + [_stages((["text"], half), (["text", "collab"], steps))],
        # late fusion at the 5x adapter lr (the default before) and its one-change ablations
        "speeder-item-lr5": lf5 + [joint],
        "speeder-item-moddrop": lf5 + ["model.modality_dropout=0.3", joint],
        "speeder-item-experts-no-aux": lf5 + ["train.item_modality_loss=0", joint],
        "speeder-item-mpo-collab-first-lf": lf5 + [_stages((["collab"], half), (["collab", "text"], steps - half))],
        "speeder-item-no-spae-lf": lf5 + ["model.spae_absolute=false", "model.spae_relative=false", joint],
        "speeder-item-k2-lf": lf5 + ["model.n_item_tokens=2", joint],
        "speeder-item-sasrec200-lf": lf5 + ["features.sasrec_epochs=200", joint],
        # the mixture head (the default before late fusion) and its one-change ablations
        "speeder-item-mixture": mix + [joint],
        # one modality: the head keys are that modality's (late fusion needs two)
        "speeder-item-collab": lf5 + ['features.modalities=["collab"]', _stages((["collab"], steps),)],
        "speeder-item-text": lf5 + ['features.modalities=["text"]', _stages((["text"], steps),)],
        "speeder-item-mpo": mix + [text_first],
        # the text-first collapse, isolated: the plain adapter lr, or the item bias starting at zero
        "speeder-item-mpo-lr1": speeder + MIXTURE + ["train.adapter_lr_scale=1", text_first],
        "speeder-item-mpo-zero-bias": mix + ["model.head_bias_init=zeros", text_first],
        "speeder-item-mpo-collab-first": mix + [_stages((["collab"], half), (["collab", "text"], steps - half))],
        "speeder-item-no-spae": mix + ["model.spae_absolute=false", "model.spae_relative=false", joint],
        "speeder-item-k2": mix + ["model.n_item_tokens=2", joint],
        "speeder-item-no-bias": mix + ["model.head_item_bias=false", joint],
        "speeder-item-mixture-moddrop": mix + ["model.modality_dropout=0.3", joint],
        # a converged collaborative encoder (SASRec 200 epochs with early stopping): the reference rows
        # of this run are the fair SASRec baseline for presets that train SASRec briefly
        "speeder-item-sasrec200": mix + ["features.sasrec_epochs=200", joint],
        # history <= 50: the same windows in 1 epoch (51 steps on ml-100k), and the same step budget
        "speeder-item-h50": mix + ["data.max_history=50", joint],
        "speeder-item-h50-steps": mix + ["data.max_history=50", "train.stages=" + json.dumps(
            [{"modalities": ["text", "collab"], "max_steps": steps, "epochs": 100.0, "lr": LR}])],
        "titles-item": ["prompt.paradigm=titles"] + LR5 + [_stages((["text"], steps),)],
        "speeder-label": speeder + ["prompt.answer_mode=score", joint],
        "titles-label": ["prompt.paradigm=titles", "prompt.answer_mode=score", _stages((["text"], steps),)],
        "verbose-label": ["prompt.paradigm=verbose", "prompt.answer_mode=score", "train.batch_size=4",
                          _stages((["text"], max(1, steps // 4)),)],
    }


def run_row(name: str, sets: list[str], source: str, out: Path, force: bool, preset: str = "none") -> dict:
    """Train + evaluate one row in a subprocess; returns its record (reads the run's JSON files)."""
    run = out / name
    if force or not (run / "FINISHED.json").is_file():
        cmd = [sys.executable, "-m", "speeder_fast.train", "--preset", preset, "--data", source, "--output-dir",
               str(out), "--run-name", name, "--no-progress"] + [a for s in sets for a in ("--set", s)]
        print("$ " + " ".join(cmd), flush=True)
        t0 = time.perf_counter()
        with open(out / f"{name}.log", "w") as log:
            rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        wall = time.perf_counter() - t0
        if rc != 0:
            return {"row": name, "error": f"exit {rc}, see {out / (name + '.log')}"}
        (run / "wall_seconds.json").write_text(json.dumps({"wall_s": wall, "cmd": cmd}))
    # the train CLI's own evaluation (eval_test_<mode>.json), not a re-evaluation of another subset
    ev = next(iter(sorted(p for p in run.glob("eval_test_*.json") if p.stem.count("_") == 2)), None)
    if ev is None:
        return {"row": name, "error": "no eval_test_*.json"}
    d = json.loads(ev.read_text())
    summary = json.loads((run / "train_summary.json").read_text())
    cfg_text = (run / "config.toml").read_text()
    wall = json.loads((run / "wall_seconds.json").read_text()) if (run / "wall_seconds.json").is_file() else {}
    batch = next((ln.split("=")[1].strip() for ln in cfg_text.splitlines() if ln.startswith("batch_size")), "?")
    return {"row": name, "result": d["result"], "sasrec": d.get("sasrec"), "popularity": d.get("popularity"),
            "steps": summary["steps"], "batch": batch, "train_s": summary["train_seconds"],
            "wall_s": wall.get("wall_s"), "cmd": wall.get("cmd"), "threads": summary.get("torch_threads")}


def _f(v: object) -> str:
    return f"{v:.4f}" if isinstance(v, float) else ("n/a" if v is None else str(v))


def table(records: list[dict], machine: str) -> str:
    head = ("| row | n | HR@1 (20 cand.) | NDCG@10 (20 cand.) | full HR@10 | full NDCG@10 | steps x batch | "
            "train s | wall s | torch threads | tokens/prompt |")
    lines = [head, "|" + "---|" * 11]
    ref = next((r for r in records if r.get("sasrec")), None)
    for r in records:
        if "error" in r:
            lines.append(f"| {r['row']} | error: {r['error']} |" + " |" * 9)
            continue
        m = r["result"]
        lines.append(f"| {r['row']} | {m['n']} | {_f(m.get('HR@1'))} | {_f(m.get('NDCG@10'))} | "
                     f"{_f(m.get('full_HR@10'))} | {_f(m.get('full_NDCG@10'))} | {r['steps']} x {r['batch']} | "
                     f"{r['train_s']:.0f} | {_f(round(r['wall_s'])) if r.get('wall_s') else 'n/a'} | "
                     f"{_f(r.get('threads'))} | {m.get('prompt_tokens_mean', 0):.1f} |")
    if ref is not None:
        for key, label in (("sasrec", "SASRec (collab encoder of the first row)"), ("popularity", "Popularity")):
            m = ref[key]
            lines.append(f"| {label} | {m['n']} | {_f(m.get('HR@1'))} | {_f(m.get('NDCG@10'))} | "
                         f"{_f(m.get('full_HR@10'))} | {_f(m.get('full_NDCG@10'))} | - | - | - | - | - |")
    return "\n".join(lines) + f"\n\nMachine: {machine}.\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dataset", choices=sorted(DATASETS), required=True)
    ap.add_argument("--out", required=True, help="folder for the runs and the table")
    ap.add_argument("--rows", nargs="*", default=None, help="row names (default: all; --list shows them)")
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps of the main rows (default per dataset)")
    ap.add_argument("--set", dest="sets", action="append", default=[], help="extra --set for every row")
    ap.add_argument("--force", action="store_true", help="rerun rows that already finished")
    ap.add_argument("--list", action="store_true", help="print the rows and their settings, exit")
    args = ap.parse_args(argv)
    ds = DATASETS[args.dataset]
    rows = rows_for(args.steps or ds["steps"])
    if args.list:
        for k, v in rows.items():
            print(k, " ".join(v))
        return 0
    names = args.rows or list(rows)
    unknown = [n for n in names if n not in rows]
    if unknown:
        print(f"error: unknown rows {unknown} (known: {', '.join(rows)})", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    records = [run_row(n, RECIPE + ds["sets"] + PRE_CROSSFIT + rows[n] + args.sets, ds["source"], out, args.force,
                       ds["preset"]) for n in names]
    import torch

    machine = f"{platform.machine()} CPU, {os.cpu_count()} cores, torch {torch.__version__}, {platform.node()}"
    md = table(records, machine)
    (out / "quality.md").write_text(md)
    (out / "quality.json").write_text(json.dumps(records, indent=1, default=str))
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
