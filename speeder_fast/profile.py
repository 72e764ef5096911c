"""Profiling entry point: ``python -m speeder_fast.profile <subcommand> [options]``.

Subcommands:

* ``kernels`` -- runs each custom kernel (``mome_combine``, ``inject_positions``; forward + backward)
  under ``torch.profiler``, prints the top ops, the Triton compiled metadata (registers, spills,
  shared memory, warps) when running compiled on CUDA, and writes a Chrome trace to ``--out``.

Adding a subcommand (e.g. ``train`` / ``infer``): write ``_add_<name>_parser(sub)`` that creates
its subparser and calls ``set_defaults(func=_run_<name>)``, append it to ``SUBCOMMANDS``, and reuse
:func:`profile_steps`, :func:`print_top_ops` and :func:`export_trace`.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

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
    p.add_argument("--force", default="auto", choices=("auto", "triton", "torch"), help="kernel path (auto: Triton on CUDA)")
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
            raise SystemExit("profile kernels: --force triton on CPU needs TRITON_INTERPRET=1 before triton is imported")
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
# entry point
# ----------------------------------------------------------------------------------------------
SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [_add_kernels_parser]


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m speeder_fast.profile", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    for add in SUBCOMMANDS:
        add(sub)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
