"""Profiling entry point: ``python -m speeder_fast.profile <subcommand> [options]``.

Subcommands:

* ``kernels`` -- runs each custom kernel (``mome_combine``, ``inject_positions``; forward + backward)
  under ``torch.profiler``, prints the top ops, the Triton compiled metadata (registers, spills,
  shared memory, warps) when running compiled on CUDA, and writes a Chrome trace to ``--out``.
* ``train`` -- a few real training steps under ``torch.profiler``: ``MicroBatches`` (prompt build) ->
  :func:`speeder_fast.training.step.train_step`, the very step the training loop runs (the configured
  loss, parameter groups, weight decay, clipping and ``train.grad_accum``).
* ``infer`` -- a few real evaluation batches (``score`` or greedy ``generate``) under the profiler.

``train`` / ``infer`` write to ``--out DIR``: ``trace.json`` (Chrome trace: chrome://tracing or
ui.perfetto.dev), ``top_ops.txt`` (the top ops by self device time, CPU time on CPU) and
``summary.json`` (shapes, step times, tokens, achieved TFLOP/s and MFU), e.g.::

    python -m speeder_fast.profile train --paradigm speeder --data ../shared/data/amazon-office \
        --batch-size 4 --steps 3 --out runs/profile/train_speeder
    python -m speeder_fast.profile infer --paradigm verbose --mode generate --max-new-tokens 16 ...

FLOP accounting (stated in ``summary.json``): ``N`` = weights of every linear layer of the decoder
(LoRA adapters included, embeddings excluded: a lookup), ``T`` = real (non-padding) prompt tokens
of the profiled steps, ``V x H`` = the LM head, applied to the ``A`` answer rows only:

* training with a frozen base + LoRA: ``4 N T + 4 V H A`` (forward 2 + activation gradients 2;
  LoRA weight gradients and attention-score FLOPs ignored, ~1-2%; the issue's 4 x params x tokens).
  ``A x V`` is the head the configured loss applies: the answer tokens x the vocabulary
  (``train.score_loss=vocab``, generate mode), the answers x the ``N`` candidate labels (label loss,
  the score-mode default), the item positions x the catalogue (next-item loss);
* ``score`` inference: ``2 N T + 2 V H B``; ``generate``: ``2 N (T + G) + 2 V H (B + G)`` with ``G``
  the generated tokens of the batch (KV cache, so each new token costs one token's forward).

MFU = achieved / dense peak of the card for the compute dtype (``speeder_fast.hardware.PEAKS``, shared
with the benchmarks; fp32 on a GPU is reported against the card's TF32 dense peak); on CPU only
TFLOP/s is reported (MFU n/a).

Adding a subcommand: write ``_add_<name>_parser(sub)`` that creates
its subparser and calls ``set_defaults(func=_run_<name>)``, append it to ``SUBCOMMANDS``, and reuse
:func:`profile_steps`, :func:`print_top_ops` and :func:`export_trace`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

# torch's profiler backend (kineto) prints "USDT: ... profiler_start / profiler_stop" debug lines to
# stderr at every trace; its level is read once, when torch loads (set KINETO_LOG_LEVEL=4 or lower to
# see kineto's own messages again)
os.environ.setdefault("KINETO_LOG_LEVEL", "6")

import torch  # noqa: E402

from .config import ANSWER_MODES, KERNEL_CHOICES, PARADIGMS, PRECISIONS, SPLITS
from .hardware import card_name, has_weights, peak_tflops, versions
from .utils import atomic_path, get_logger, resolve_device

log = get_logger("speeder_fast.profile")


# ----------------------------------------------------------------------------------------------
# shared helpers (for every subcommand)
# ----------------------------------------------------------------------------------------------
def profiler_activities(device: torch.device) -> list[torch.profiler.ProfilerActivity]:
    acts = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    return acts


def profile_steps(
    steps: Sequence[tuple[str, Callable[[], Any]]], device: torch.device, repeat: int = 3
) -> torch.profiler.profile:
    """Run each named step ``repeat`` times inside ``record_function(name)`` under the profiler."""
    with torch.profiler.profile(activities=profiler_activities(device), record_shapes=True) as prof:
        for _ in range(repeat):
            for name, fn in steps:
                with torch.profiler.record_function(name):
                    fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    return prof


def print_top_ops(prof: torch.profiler.profile, device: torch.device, row_limit: int = 20) -> str:
    sort_by = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    table = prof.key_averages().table(sort_by=sort_by, row_limit=row_limit)
    print(table)
    return table


def export_trace(prof: torch.profiler.profile, out: Path) -> Path:
    """Write the Chrome trace atomically (open it in chrome://tracing or ui.perfetto.dev)."""
    with atomic_path(out, suffix=".json") as tmp:
        prof.export_chrome_trace(str(tmp))
    return out


# ----------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _add_kernels_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("kernels", help="profile the custom Triton kernels (forward + backward)")
    p.add_argument("--out", type=Path, default=Path("runs/profile/kernels_trace.json"), help="Chrome trace file")
    p.add_argument("--device", default="auto", help="auto | cuda | cpu")
    p.add_argument("--force", default="auto", choices=KERNEL_CHOICES, help="kernel path (auto: Triton on CUDA)")
    p.add_argument("--dtype", default=None, choices=sorted(_DTYPES), help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--items", type=int, default=None, help="MoME items N (default 4096 on CUDA, 16 on CPU)")
    p.add_argument("--modalities", type=int, default=3)
    p.add_argument("--tokens", type=int, default=4, help="soft tokens per item k")
    p.add_argument("--hidden", type=int, default=None, help="H (default 2048 on CUDA, 576 on CPU)")
    p.add_argument("--batch", type=int, default=None, help="inject batch B (default 64 on CUDA, 2 on CPU)")
    p.add_argument("--seq-len", type=int, default=None, help="inject length L (default 256 on CUDA, 64 on CPU)")
    p.add_argument("--repeat", type=int, default=3, help="profiled repetitions of each step")
    p.add_argument("--rows", type=int, default=20, help="rows of the top-ops table")
    p.set_defaults(func=_run_kernels)


def _kernel_steps(args: argparse.Namespace, device: torch.device) -> list[tuple[str, Callable[[], Any]]]:
    from .kernels import inject_positions, mome_combine

    cuda = device.type == "cuda"
    dt = _DTYPES[args.dtype or ("bf16" if cuda else "fp32")]
    n = args.items or (4096 if cuda else 16)
    h = args.hidden or (2048 if cuda else 576)
    m, k = args.modalities, args.tokens
    b, length = args.batch or (64 if cuda else 2), args.seq_len or (256 if cuda else 64)
    gen = torch.Generator(device="cpu").manual_seed(0)

    def rnd(*shape: int, scale: float = 1.0, requires_grad: bool = False) -> torch.Tensor:
        t = (torch.randn(*shape, generator=gen) * scale).to(device, dt)
        return t.requires_grad_(requires_grad)

    x = rnd(n, m, k, h, requires_grad=True)
    logits = rnd(n, m, 1, requires_grad=True)
    mask = (torch.rand(n, m, generator=gen) < 0.9).to(device)
    ln_w, ln_b = rnd(h, scale=0.02, requires_grad=True), rnd(h, scale=0.0, requires_grad=True)
    dy_m = rnd(n, k, h)

    hist = max(1, min(20, length // (2 * k)))
    n_items = max(1, b * hist // 2)
    slot_item = torch.full((b, length), -1, dtype=torch.int64)
    slot_abs = torch.full_like(slot_item, -1)
    slot_rel = torch.full_like(slot_item, -1)
    pos = torch.arange(hist * k)
    item_of = torch.randint(0, n_items, (b, hist), generator=gen)
    slot_item[:, : hist * k] = item_of[:, pos // k] * k + pos % k
    slot_abs[:, : hist * k] = pos // k
    slot_rel[:, : hist * k] = hist - 1 - pos // k
    vocab = 32000
    ids = torch.randint(0, vocab, (b, length), generator=gen)
    emb = rnd(vocab, h)
    items = rnd(n_items, k, h, requires_grad=True)
    abs_t, rel_t = rnd(64, h, scale=0.02, requires_grad=True), rnd(64, h, scale=0.02, requires_grad=True)
    dy_i = rnd(b, length, h)
    ids, slot_item, slot_abs, slot_rel = (t.to(device) for t in (ids, slot_item, slot_abs, slot_rel))
    print(
        f"shapes: mome expert_out [{n}, {m}, {k}, {h}]; inject input_ids [{b}, {length}], "
        f"item_tokens [{n_items}, {k}, {h}]; dtype {dt}; device {device}; force {args.force}"
    )

    def mome_step() -> None:
        out = mome_combine(x, logits, mask, ln_w, ln_b, force=args.force)
        torch.autograd.grad(out, (x, logits, ln_w, ln_b), dy_m)

    def inject_step() -> None:
        out = inject_positions(ids, emb, slot_item, slot_abs, slot_rel, items, abs_t, rel_t, 0.5, force=args.force)
        torch.autograd.grad(out, (items, abs_t, rel_t), dy_i)

    return [("mome_combine fwd+bwd", mome_step), ("inject_positions fwd+bwd", inject_step)]


def print_triton_metadata() -> list[dict[str, Any]]:
    """Registers / spills / shared memory / warps of the last compiled launch of each kernel."""
    from .kernels._common import LAST_LAUNCH, compiled_metadata

    rows = []
    for name, (compiled, grid) in sorted(LAST_LAUNCH.items()):
        rows.append({"kernel": name, "grid": "x".join(map(str, grid)), **compiled_metadata(compiled)})
    if not rows:
        print("Triton compiled metadata: none (kernels ran interpreted, or the torch path was used)")
        return rows
    cols = ["kernel", "grid", "n_regs", "n_spills", "shared_bytes", "num_warps", "num_stages"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(str(r.get(c)) for c in cols) + " |")
    return rows


def _run_kernels(args: argparse.Namespace) -> int:
    device = resolve_device(args.device)
    if device.type == "cpu" and args.force == "triton":
        if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
            from .errors import UsageError

            raise UsageError("profile kernels: --force triton on CPU needs TRITON_INTERPRET=1 before triton is "
                             "imported")
        os.environ.setdefault("TRITON_INTERPRET", "1")
    steps = _kernel_steps(args, device)
    for name, fn in steps:  # warm-up: Triton JIT compilation stays out of the trace
        log.info("warm-up: %s", name)
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    prof = profile_steps(steps, device, repeat=args.repeat)
    print_top_ops(prof, device, row_limit=args.rows)
    print_triton_metadata()
    out = export_trace(prof, args.out)
    print(f"Chrome trace written to {out}")
    return 0


# ----------------------------------------------------------------------------------------------
# model folders with random weights (GPU machines get config + tokenizer only)
# ----------------------------------------------------------------------------------------------
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                   "tokenizer.model", "chat_template.jinja", "generation_config.json")


def materialize_model_dir(src: str | Path, cache_dir: str | Path, *, seed: int = 0, overrides: dict | None = None,
                          dtype: str = "float32") -> Path:
    """A loadable HF folder with ``src``'s config (+ ``overrides``) and tokenizer and *random* weights.

    Speed does not depend on weight values, so a machine that has only the tokenizer and
    ``config.json`` (e.g. ``.gpu_assets/smollm2`` from ``benchmarks/prepare_gpu_assets.py``) can still
    time the real loading and training path. The folder is cached under ``cache_dir`` by a hash of
    (config, overrides, seed, dtype) and written atomically (temp folder, then rename).
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from .utils import stable_hash

    src = Path(src)
    if not (src / "config.json").is_file():
        raise FileNotFoundError(f"{src}: no config.json (a model folder needs at least config + tokenizer)")
    key = stable_hash({"config": json.loads((src / "config.json").read_text()), "overrides": overrides or {},
                       "seed": seed, "dtype": dtype,
                       "tokenizer": [(f, (src / f).stat().st_size) for f in TOKENIZER_FILES if (src / f).is_file()]})
    out = Path(cache_dir) / f"{src.name}-random-{key}"
    if (out / "speeder_random.json").is_file():
        return out
    cfg = AutoConfig.from_pretrained(str(src))
    for k, v in (overrides or {}).items():
        setattr(cfg, k, v)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=getattr(torch, dtype))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(str(tmp))
        for f in TOKENIZER_FILES:
            if (src / f).is_file():
                shutil.copy2(src / f, tmp / f)
        (tmp / "speeder_random.json").write_text(json.dumps({"source": str(src), "seed": seed, "dtype": dtype,
                                                             "overrides": overrides or {}}, indent=1))
        if out.exists():  # another process won the race
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("random-weight model folder %s (from %s, seed %d, %s)", out, src, seed, dtype)
    return out


# ----------------------------------------------------------------------------------------------
# FLOPs and peaks
# ----------------------------------------------------------------------------------------------
# peaks: speeder_fast.hardware.PEAKS / peak_tflops (shared with the benchmarks)


def decoder_linear_params(model: Any) -> int:
    """``N``: weights of every linear layer inside the decoder (LoRA adapters included)."""
    import torch.nn as nn

    dec = model.decoder if hasattr(model, "decoder") else model
    return int(sum(m.in_features * m.out_features for m in dec.modules() if isinstance(m, nn.Linear)))


def step_flops(phase: str, n_linear: int, vocab: int, hidden: int, tokens: int, answer_rows: int,
               generated: int = 0) -> float:
    """FLOPs of the profiled work (see the module docstring for the formulas)."""
    if phase == "train":
        return 4.0 * n_linear * tokens + 4.0 * vocab * hidden * answer_rows
    if phase == "score":
        return 2.0 * n_linear * tokens + 2.0 * vocab * hidden * answer_rows
    return 2.0 * n_linear * (tokens + generated) + 2.0 * vocab * hidden * (answer_rows + generated)


def top_ops_table(prof: torch.profiler.profile, device: torch.device, row_limit: int = 25) -> str:
    """Top ops by *self* time (device time on CUDA): where the step actually spends its time."""
    sort_by = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=sort_by, row_limit=row_limit)


# ----------------------------------------------------------------------------------------------
# train / infer
# ----------------------------------------------------------------------------------------------
def _add_common_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, help="TOML config (defaults: the built-in Config)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="config override (repeatable), applied after the options below")
    p.add_argument("--paradigm", choices=PARADIGMS, default="speeder")
    p.add_argument("--data", default=None, help="data.source (default: the config's, ml-100k)")
    p.add_argument("--model", default=None, help="model.llm: asset name or folder; a folder without weights "
                   "(config + tokenizer only) gets seeded random weights")
    p.add_argument("--precision", choices=PRECISIONS, default=None,
                   help="model.precision (default: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--device", default="auto", help="auto | cuda | cpu")
    p.add_argument("--modalities", default="text,collab", help="speeder modalities (collab = SASRec, --sasrec-epochs)")
    p.add_argument("--sasrec-epochs", type=int, default=2, help="SASRec epochs for collab (speed does not depend on it)")
    p.add_argument("--history", type=int, default=None, help="data.max_history (default: the config's, 10)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--warmup", type=int, default=1, help="un-timed steps first (allocations, autotuning)")
    p.add_argument("--steps", type=int, default=3, help="timed steps (no profiler) for TFLOP/s and MFU")
    p.add_argument("--profile-steps", type=int, default=2, help="steps recorded under torch.profiler")
    p.add_argument("--rows", type=int, default=25, help="rows of the top-ops table")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--seed", type=int, default=0)


def _add_train_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="profile real training steps (prompts -> forward/backward -> AdamW)")
    _add_common_model_args(p)
    p.add_argument("--out", type=Path, default=Path("runs/profile/train"), help="output folder")
    p.set_defaults(func=_run_train, phase="train")


def _add_infer_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("infer", help="profile real evaluation batches (score, or greedy generate)")
    _add_common_model_args(p)
    p.add_argument("--mode", choices=[m for m in ANSWER_MODES if m != "item"], default="score")
    p.add_argument("--max-new-tokens", type=int, default=32, help="generate mode: cap on new tokens")
    p.add_argument("--split", choices=SPLITS, default="test", help="users + persisted candidates")
    p.add_argument("--out", type=Path, default=Path("runs/profile/infer"), help="output folder")
    p.set_defaults(func=_run_infer, phase="infer")


def build_profile_components(args: argparse.Namespace) -> Any:
    """``Components`` (``speeder_fast.training.run.build_components``) for the options."""
    from .config import resolve
    from .training.run import build_components
    from .utils import cache_root

    device = resolve_device(args.device)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    mods = [m.strip() for m in args.modalities.split(",") if m.strip()]
    sets = [f"device={device.type}", f"seed={args.seed}", f"prompt.paradigm={args.paradigm}",
            f"model.precision={args.precision or ('bf16' if device.type == 'cuda' else 'fp32')}",
            f"features.modalities={json.dumps(mods)}", f"features.sasrec_epochs={args.sasrec_epochs}",
            f"train.batch_size={args.batch_size}"]
    sets += [f"data.source={args.data}"] if args.data else []
    sets += [f"model.llm={args.model}"] if args.model else []
    if args.history:  # the position tables must cover the history (the config's size when larger)
        sets += [f"data.max_history={args.history}", f"model.max_positions={max(args.history, 256)}"]
    cfg = resolve(None, args.config, sets + list(args.sets))
    llm_dir = Path(cfg.model.llm).expanduser()
    if llm_dir.is_dir() and not has_weights(llm_dir):
        dt = "bfloat16" if cfg.model.precision == "bf16" else "float32"
        cfg.model.llm = str(materialize_model_dir(llm_dir, cache_root() / "bench_models", seed=args.seed, dtype=dt))
    t0 = time.perf_counter()
    comp = build_components(cfg, run_dir=None, progress=False)
    log.info("components built in %.1f s (%s, %s, %s)", time.perf_counter() - t0, cfg.prompt.paradigm,
             cfg.model.llm, cfg.model.precision)
    return comp


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _profile_and_report(args: argparse.Namespace, comp: Any, phase: str, step: Callable[[], dict],
                        extra: dict[str, Any]) -> dict[str, Any]:
    """Warm-up, timed steps, profiled steps; writes trace.json, top_ops.txt, summary.json."""
    from .model.llm import base_model
    from .utils import atomic_write_json, atomic_write_text

    device = comp.device
    for _ in range(args.warmup):
        step()
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times, work = [], {"tokens": 0, "answer_rows": 0, "generated": 0, "examples": 0}
    for _ in range(args.steps):
        t0 = time.perf_counter()
        w = step()
        _sync(device)
        times.append(time.perf_counter() - t0)
        for k in work:
            work[k] += int(w.get(k, 0))
    peak_mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    with torch.profiler.profile(activities=profiler_activities(device), record_shapes=True) as prof:
        for _ in range(args.profile_steps):
            with torch.profiler.record_function(f"{phase}_step"):
                step()
        _sync(device)
    table = top_ops_table(prof, device, args.rows)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    export_trace(prof, args.out / "trace.json")
    atomic_write_text(args.out / "top_ops.txt", table + "\n")
    hf = base_model(comp.model.llm).config
    n_lin = decoder_linear_params(comp.model)
    mode = extra.get("mode", "train")
    total_s = float(sum(times))
    flops = step_flops(mode, n_lin, extra.get("head_width") or hf.vocab_size, hf.hidden_size, work["tokens"],
                       work["answer_rows"], work["generated"])
    tflops = flops / total_s / 1e12 if total_s > 0 else 0.0
    dtype = comp.cfg.model.precision
    card = card_name(device)
    peak = peak_tflops(card, "bf16" if dtype in ("bf16", "nf4") else "fp32") if device.type == "cuda" else None
    formula = {"train": "4*N*T + 4*V*H*A", "score": "2*N*T + 2*V*H*A",
               "generate": "2*N*(T+G) + 2*V*H*(A+G)"}[mode]
    summary = {
        "phase": phase, "mode": mode, "paradigm": comp.cfg.prompt.paradigm, "device": str(device), "card": card,
        "precision": dtype, "llm": comp.cfg.model.llm, "batch_size": args.batch_size,
        "data": comp.cfg.data.source, "max_history": comp.cfg.data.max_history,
        "steps_timed": args.steps, "step_s": times, "step_s_median": float(statistics.median(times)) if times else None,
        "examples_per_s": work["examples"] / total_s if total_s else None,
        "tokens_per_step": work["tokens"] / max(1, args.steps), "work": work,
        "flops_formula": formula + " (N decoder linear weights, T real prompt tokens, V*H the head the loss "
                                   "applies, A its rows, G generated tokens)",
        "N_linear": n_lin, "flops": flops, "tflops_per_s": tflops,
        "peak_tflops": peak, "mfu": (tflops / peak) if peak else None,
        "mfu_note": None if peak else ("CPU: MFU n/a" if device.type == "cpu" else f"no peak known for {card}"),
        "peak_mem_gb": peak_mem, "versions": versions(), "torch_threads": torch.get_num_threads(),
        "trace": str(args.out / "trace.json"),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"), **extra,
    }
    atomic_write_json(args.out / "summary.json", summary)
    mfu = f"{100 * summary['mfu']:.1f}%" if summary["mfu"] is not None else "n/a"
    print(f"{phase} {comp.cfg.prompt.paradigm} on {card}: median step {summary['step_s_median']:.4f} s, "
          f"{summary['tokens_per_step']:.0f} tokens/step, {tflops:.3f} TFLOP/s ({formula}), MFU {mfu}")
    print(f"wrote {args.out}/trace.json, top_ops.txt, summary.json")
    return summary


def _run_train(args: argparse.Namespace) -> int:
    """Profile the training step itself (:func:`~speeder_fast.training.step.train_step`, what the loop
    runs): the last MPO stage's trainable set, AdamW with the configured parameter groups and weight
    decay, the configured loss (next-item, label or vocabulary cross-entropy), ``train.grad_accum``
    micro-batches, clipping at ``train.grad_clip``."""
    import itertools

    from .training.batches import MicroBatch, MicroBatches
    from .training.loop import resolve_stages
    from .training.step import loss_name, prepare_stage, train_step

    comp = build_profile_components(args)
    stage = resolve_stages(comp.cfg, comp.modalities)[-1]
    ctx = prepare_stage(comp, stage, total=args.warmup + args.steps + args.profile_steps)
    loss = loss_name(comp.cfg)
    model = comp.model

    def head_rows(batch: Any) -> int:  # rows of the head the loss applies (FLOP accounting)
        if loss == "next-item":
            return int(batch.item_pos.numel()) if model.item_loss.all_positions else int(batch.input_ids.shape[0])
        return int(batch.input_ids.shape[0]) if loss == "label" else int(batch.loss_pos.numel())

    head_width = {"next-item": model.mome.n_items if model.mome is not None else None,
                  "label": int(comp.builder.label_ids.shape[0]) if loss == "label" else None}.get(loss)
    stream = MicroBatches(comp, args.batch_size, args.seed)
    steps = itertools.count()
    comp.model.train()

    def step() -> dict:
        work = {"tokens": 0, "answer_rows": 0, "examples": 0}

        def micro_batches():
            for _ in range(ctx.grad_accum):
                with torch.profiler.record_function("prompt_build"):
                    batch, weight = stream.next()
                work["tokens"] += batch.n_tokens
                work["answer_rows"] += head_rows(batch)
                work["examples"] += int(batch.input_ids.shape[0])
                yield MicroBatch(batch, weight, stream.last_n_global)

        train_step(ctx, next(steps), micro_batches())
        return work

    _profile_and_report(args, comp, "train", step, {"mode": "train", "loss": loss, "head_width": head_width,
                                                    "trainable_params": sum(p.numel() for p in ctx.params),
                                                    "stage_modalities": list(stage.modalities)})
    return 0


def _run_infer(args: argparse.Namespace) -> int:
    import numpy as np

    from .evaluate import select_examples
    from .model.llm import match_generated

    comp = build_profile_components(args)
    model, device, builder, prepared = comp.model, comp.device, comp.builder, comp.prepared
    model.set_stage(comp.modalities)
    model.eval()
    sa, cands = prepared.split(args.split), prepared.candidates(args.split)
    idx = select_examples(len(sa), 0, args.seed)
    order = np.random.default_rng(args.seed).permutation(idx)
    pos = [0]

    def next_rows() -> np.ndarray:
        if pos[0] + args.batch_size > len(order):
            pos[0] = 0
        rows = order[pos[0] : pos[0] + args.batch_size]
        pos[0] += len(rows)
        return rows

    def step() -> dict:
        rows = next_rows()
        left = args.mode == "generate"
        batch = builder.build(sa.histories[rows], sa.lengths[rows], cands[rows], sa.targets[rows], with_answer=False,
                              padding_side="left" if left else "right")
        work = {"tokens": batch.n_tokens, "answer_rows": int(batch.input_ids.shape[0]),
                "examples": int(batch.input_ids.shape[0])}
        with torch.no_grad():
            if args.mode == "score":
                model.score(batch.to(device)).argmax(1).cpu()
            else:
                out = model.generate(batch.to(device), args.max_new_tokens, builder.eos_id, builder.pad_id)
                match_generated(builder, out, batch.candidates)
                work["generated"] = int(out.numel())
        return work

    _profile_and_report(args, comp, "infer", step, {"mode": args.mode, "max_new_tokens": args.max_new_tokens,
                                                    "split": args.split})
    return 0


# ----------------------------------------------------------------------------------------------
# entry point
# ----------------------------------------------------------------------------------------------
SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [_add_kernels_parser, _add_train_parser,
                                                                    _add_infer_parser]


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m speeder_fast.profile", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    for add in SUBCOMMANDS:
        add(sub)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point: 0 ok, 2 bad input (one ``error:`` line), 3 out of memory
    (:func:`~speeder_fast.errors.run_cli`)."""
    args = build_parser().parse_args(argv)
    from .errors import run_cli

    return run_cli(lambda: args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
