"""Train (and then evaluate) a recommender: ``python -m speeder_fast.train [options]``.

Configuration is resolved in this order (later wins):

1. the preset (``--preset``; default ``quick`` when neither ``--config`` nor ``--prepare-only`` is
   given, else ``none``),
2. ``--config FILE.toml``,
3. the shortcuts (``--data``, ``--model``, ``--paradigm``, ``--precision``, ``--mode``,
   ``--output-dir``, ``--device``),
4. ``--set a.b=c`` overrides (repeatable).

With no arguments it runs the ``quick`` preset: SmolLM2-135M-Instruct (offline asset) on
MovieLens-100K (300 users), paradigm ``speeder`` (MiniLM text + SASRec collab, one stage of 150
steps x 16), the next-item head (``prompt.answer_mode=item``), sized to train AND evaluate within
10 minutes on 2 CPU cores (see ``config.PRESETS`` and docs/speeder.md). The resolved config is printed and saved as ``RUN/config.toml``; at the end the
metrics table and the run folder are printed.

Production use (docs/production.md): ``torchrun --standalone --nproc_per_node=N -m
speeder_fast.train ...`` trains data-parallel (``train.batch_size`` is per process); ``--resume
RUN_DIR`` continues an interrupted run from its newest valid checkpoint (exits 0 at once when the run
had finished; a checkpoint folder such as ``RUN/checkpoints/final`` is refused, naming RUN). Config,
data and checkpoint problems print one ``error:`` line and exit 2; running out of GPU memory prints
the settings to change and exits 3; a NaN/Inf loss exits 4 (``speeder_fast.errors.run_cli``).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path


from speeder_fast.config import (ANSWER_MODES, DEVICES, PARADIGMS, PRECISIONS, PRESETS, Config, ConfigError,
                                 describe_fields, load_run_config, resolve, set_override, to_toml, validate)

__all__ = ["PRESETS", "RESUME_SAFE", "build_parser", "main", "resolve_config", "resolve_resume_config"]


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m speeder_fast.train", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--config", help="TOML config file")
    ap.add_argument("--preset", choices=sorted(PRESETS), default=None,
                    help="named preset applied first (default: quick without --config, none with it or with --prepare-only)")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE", help="override a config key (repeatable)")
    ap.add_argument("--data", help="data.source (ml-100k, a RecBole folder, raw Amazon folder)")
    ap.add_argument("--model", help="model.llm (HF id/local path; smollm2-135m = offline asset)")
    ap.add_argument("--paradigm", choices=PARADIGMS, help="prompt.paradigm")
    ap.add_argument("--precision", choices=PRECISIONS, help="model.precision")
    ap.add_argument("--mode", choices=ANSWER_MODES, help="prompt.answer_mode")
    ap.add_argument("--output-dir", help="output_dir")
    ap.add_argument("--run-name", help="run_name")
    ap.add_argument("--device", choices=DEVICES, help="device")
    ap.add_argument("--prepare-only", action="store_true", help="prepare the data, print its statistics, exit")
    ap.add_argument("--help-config", action="store_true", help="print every config key with default and help, exit")
    ap.add_argument("--no-eval", action="store_true", help="skip the final test evaluation")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")
    ap.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR (its config.toml; only "
                    "eval.*, train.log_every/eval_every/checkpoint_every/keep_checkpoints and device may be --set)")
    return ap


def resolve_config(args: argparse.Namespace) -> Config:
    """Preset -> config file -> shortcuts -> --set (see module docstring), through :func:`config.resolve`."""
    # --prepare-only shows the whole dataset unless a preset is asked for explicitly
    preset = args.preset or ("none" if args.config or args.prepare_only else "quick")
    shortcuts = []
    for flag, key in (("data", "data.source"), ("model", "model.llm"), ("paradigm", "prompt.paradigm"),
                      ("precision", "model.precision"), ("mode", "prompt.answer_mode"), ("output_dir", "output_dir"),
                      ("run_name", "run_name"), ("device", "device")):
        v = getattr(args, flag)
        if v is not None:
            shortcuts.append(f"{key}={v}")
    return resolve(preset, args.config, shortcuts + list(args.sets))


#: ``--set`` keys allowed with ``--resume`` (they change neither the model, the data nor the schedule).
RESUME_SAFE = ("eval.", "train.log_every", "train.eval_every", "train.checkpoint_every", "train.keep_checkpoints",
               "train.eval_max_examples", "train.report_to", "device")


def resolve_resume_config(args: argparse.Namespace) -> Config:
    """The config of run ``args.resume`` (its ``config.toml``) plus the harmless ``--set`` overrides."""
    run = Path(args.resume)
    if not (run / "config.toml").is_file():
        raise ConfigError(f"--resume {run}: no config.toml there (not a speeder_fast run folder)")
    cfg = load_run_config(run / "config.toml")
    if args.config or any(getattr(args, f) is not None for f in ("data", "model", "paradigm", "precision", "mode",
                                                                 "output_dir", "run_name")):
        raise ConfigError("--resume takes the run's own config.toml; --config and the data/model/paradigm/precision/"
                          "mode/output-dir/run-name shortcuts cannot be combined with it")
    sets = list(args.sets) + ([f"device={args.device}"] if args.device else [])
    for s in sets:
        key = s.split("=", 1)[0].strip()
        if not key.startswith(RESUME_SAFE):
            raise ConfigError(f"--set {s}: {key} cannot change when resuming (it would change the model, data or "
                              f"schedule); allowed: {', '.join(RESUME_SAFE)}")
        set_override(cfg, s)
    validate(cfg)
    return cfg


def trained_lines(seconds: float, steps: int, epoch_seconds: float, n_train: int, epochs: float = 0.0) -> str:
    """The two timing lines printed after training, each saying what it counts: the measured step
    time of the run, and its rate per epoch of the training set (a rate, not a separate measurement)."""
    step_s = epoch_seconds * epochs
    measured = (f"{step_s:.1f} s for {steps} steps = {epochs:.2f} epochs, i.e. " if epochs > 0 and steps > 0 else "")
    return (f"trained: {steps} steps in {seconds:.1f} s wall time (setup, validation and checkpoints included)\n"
            f"training steps alone (validation excluded): {measured}{epoch_seconds:.1f} s per epoch of {n_train} "
            f"examples")


def finished_report(run_dir: str | Path) -> str:
    """What ``--resume`` prints for a finished run: the run folder, its timing lines and its metrics
    tables (the ``eval_<split>_<mode>.md`` files of its evaluations; without any, the last validation)."""
    from speeder_fast.checkpoint import finished_summary
    from speeder_fast.evaluate import format_table

    run = Path(run_dir).resolve()
    parts = [f"run {run} has already finished; nothing to resume."]
    summary = finished_summary(run) or {}
    if "steps" in summary:
        parts.append(trained_lines(float(summary.get("total_seconds") or 0.0), int(summary["steps"]),
                                   float(summary.get("epoch_seconds") or 0.0), int(summary.get("n_train") or 0),
                                   float(summary.get("epochs") or 0.0)))
    tables = sorted(run.glob("eval_*_*.md"))
    if tables:
        parts += [p.read_text(encoding="utf-8").strip() + f"\n\n({p.name})" for p in tables]
    elif isinstance(summary.get("valid"), dict):
        parts.append("last validation (train.eval_max_examples examples; no test evaluation was run):\n\n"
                     + format_table([("valid", summary["valid"])]))
    return "\n\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit status (0 ok, 2 bad input, 3 out of memory, 4 NaN/Inf loss).

    Errors follow the one contract of :func:`speeder_fast.errors.run_cli`: one ``error:`` (or
    ``config error:``) line on stderr, no traceback.
    """
    args = build_parser().parse_args(argv)
    from speeder_fast.errors import run_cli

    if args.help_config:
        def show() -> int:
            from speeder_fast.config import PRESETS

            print("# config defaults (--preset none); the no-argument run applies --preset quick first: "
                  + ", ".join(x for x in PRESETS["quick"] if not x.startswith("train.stages")) + ", one "
                  "[text, collab] stage of 150 steps at lr 1e-3")
            for key, default, help_ in describe_fields():
                print(f"{key} = {default}\n    {help_}")
            return 0

        return run_cli(show)
    from speeder_fast import distributed

    resolved: list[Config] = []

    def body() -> int:
        if args.resume:
            from speeder_fast.checkpoint import is_finished, refuse_checkpoint_dir

            refuse_checkpoint_dir(args.resume, "--resume")  # RUN/checkpoints/final is not a run folder
            if is_finished(args.resume):
                if int(os.environ.get("RANK", "0") or 0) == 0:
                    print(finished_report(args.resume))
                return 0
            resolved.append(resolve_resume_config(args))
        else:
            resolved.append(resolve_config(args))
        return _run(args, resolved[-1])

    try:
        return run_cli(body, config=lambda: resolved[-1] if resolved else None)
    finally:
        distributed.cleanup()


def _run(args: argparse.Namespace, cfg: Config) -> int:
    """Prepare / train / evaluate per the parsed arguments (errors are handled by :func:`main`)."""
    rank0 = int(os.environ.get("RANK", "0") or 0) == 0
    if args.prepare_only:
        from speeder_fast.data import compute_stats, format_stats, prepare

        prepared = prepare(cfg.data)
        print(format_stats(compute_stats(prepared)))
        return 0

    from speeder_fast.evaluate import evaluate_split, evaluated_checkpoint, report_with_references
    from speeder_fast.training import train

    if rank0:
        print("# resolved config\n" + to_toml(cfg))
    t0 = time.perf_counter()
    res = train(cfg, run_dir=Path(args.resume) if args.resume else None, progress=not args.no_progress,
                resume=bool(args.resume))
    comp = res.components
    if rank0:
        print(trained_lines(res.seconds, res.steps, res.epoch_seconds, len(comp.prepared.train), res.epochs))
    fusion = cfg.model.sasrec_fusion != "off"
    if not args.no_eval or fusion:
        ckpt = "final"
        if evaluated_checkpoint(cfg, res.run_dir) == "best":  # the weights with the best validation metric
            from speeder_fast.checkpoint import load_checkpoint
            from speeder_fast.training.run import load_weights

            loaded = load_checkpoint(res.run_dir / "checkpoints" / "best")
            load_weights(comp, loaded)
            ckpt = f"best (step {loaded.step})"
    if fusion:  # model.sasrec_fusion: the weight of the evaluated checkpoint (auto: picked on validation now)
        from speeder_fast.training.fusion import attach_fusion, fusion_weight_line

        info = comp.fusion_info = attach_fusion(comp, res.run_dir, tune=True, progress=not args.no_progress, write=rank0)
        if rank0 and info is not None and "grid" in info:
            print(fusion_weight_line(info))
    if not args.no_eval:
        result = evaluate_split(comp.model, comp.builder, comp.prepared, cfg.eval.split, cfg.prompt.answer_mode,
                                cfg.eval.max_examples, cfg.eval.batch_size, cfg.eval.generate_max_tokens, comp.device,
                                seed=cfg.seed, progress=not args.no_progress, compile_mode=cfg.eval.compile,
                                length_multiple=cfg.eval.length_multiple, constrained=cfg.eval.constrained)
        result["checkpoint"] = ckpt
        if comp.fusion_info is not None:
            result["sasrec_fusion"] = comp.fusion_info
        if rank0:
            print(f"test evaluation of checkpoint {ckpt} (eval.checkpoint={cfg.eval.checkpoint})")
            print(report_with_references(res.run_dir, cfg, comp.prepared, result, cfg.eval.max_examples)[1])
    if rank0:
        print(f"total {time.perf_counter() - t0:.1f} s; run folder: {res.run_dir.resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
