"""Kernel benchmarks: Triton vs eager torch reference vs torch.compile(reference).

Shared by ``benchmarks/test_bench_kernels.py`` (pytest-benchmark) and the CLI below, which times
every case with CUDA events (median of N) and prints a markdown table::

    python benchmarks/bench_kernels.py --out runs/bench/kernels.json

Bytes moved are the *unique* bytes an ideal implementation must read and write (inputs it needs
read once, outputs written once, int64 index arrays included, small per-program partial sums and
sort scratch excluded); GB/s = bytes / median time, and "% copy" compares that with a measured
device-to-device ``copy_`` (bytes read + written / time) on the same card. Forward timings run
under ``torch.no_grad()``; fwd+bwd timings run the forward with grad-requiring leaves and
``torch.autograd.grad`` with a fixed output gradient, and count forward + backward bytes.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

from bench_utils import card_name, cuda_time_ms  # noqa: E402,F401  (card_name: re-exported for the tests)
from speeder_fast.kernels import (  # noqa: E402
    inject_positions,
    inject_positions_reference,
    mome_combine,
    mome_combine_reference,
)

IMPLS = ("triton", "eager", "compile")
MODES = ("fwd", "fwdbwd")


# ----------------------------------------------------------------------------------------------
# cases
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MomeCase:
    n: int  # unique items in the batch
    k: int  # tokens per item
    h: int  # LLM hidden size
    m: int = 3  # modalities (text, image, collab)
    per_token_gate: bool = False  # G == k instead of 1
    dtype: str = "bfloat16"

    @property
    def g(self) -> int:
        return self.k if self.per_token_gate else 1

    def label(self) -> str:
        return f"mome N={self.n} M={self.m} k={self.k} H={self.h} G={self.g} {self.dtype}"


@dataclass(frozen=True)
class InjectCase:
    b: int
    length: int
    h: int
    k: int = 4  # tokens per item
    hist: int = 20  # items per sequence (each k slot positions)
    vocab: int = 49152
    n_abs: int = 64
    n_rel: int = 64
    dtype: str = "bfloat16"

    def label(self) -> str:
        return f"inject B={self.b} L={self.length} H={self.h} k={self.k} hist={self.hist} {self.dtype}"


MOME_CASES = [
    MomeCase(n=256, k=1, h=576),
    MomeCase(n=2048, k=4, h=576, per_token_gate=True),
    MomeCase(n=8192, k=1, h=2048),
    MomeCase(n=2048, k=4, h=2048),
    MomeCase(n=4096, k=4, h=4096),
    MomeCase(n=8192, k=2, h=4096, per_token_gate=True),
]
INJECT_CASES = [
    InjectCase(b=16, length=256, h=576),
    InjectCase(b=64, length=256, h=576),
    InjectCase(b=64, length=256, h=2048, vocab=151936),
    InjectCase(b=64, length=256, h=4096, vocab=151936),
]
#: small CPU cases (torch reference only) so the pytest benchmarks do real work without a GPU.
CPU_MOME_CASE = MomeCase(n=64, k=2, h=576, dtype="float32")
CPU_INJECT_CASE = InjectCase(b=4, length=128, h=576, hist=10, vocab=4096, dtype="float32")


def _dtype(name: str) -> torch.dtype:
    return getattr(torch, name)


def make_mome_inputs(case: MomeCase, device: torch.device, seed: int = 0) -> dict[str, torch.Tensor]:
    """Inputs with every modality present (so the byte count is exact); ln_weight ~ embedding scale."""
    gen = torch.Generator(device=device).manual_seed(seed)
    dt = _dtype(case.dtype)
    return {
        "expert_out": torch.randn(case.n, case.m, case.k, case.h, device=device, generator=gen).to(dt),
        "gate_logits": torch.randn(case.n, case.m, case.g, device=device, generator=gen).to(dt),
        "mask": torch.ones(case.n, case.m, device=device, dtype=torch.bool),
        "ln_weight": torch.full((case.h,), 0.02, device=device, dtype=dt),
        "ln_bias": torch.zeros(case.h, device=device, dtype=dt),
        "dy": torch.randn(case.n, case.k, case.h, device=device, generator=gen).to(dt),
    }


def make_inject_inputs(case: InjectCase, device: torch.device, seed: int = 0) -> dict[str, Any]:
    """[B, L] prompts with ``hist`` items of ``k`` tokens each spliced at the start of every row.

    Items are drawn from a pool of ``0.8 * B * hist`` unique items (so targets repeat); abs cue =
    history index, rel cue = recency (hist - 1 - index); the embedding table is frozen.
    """
    gen = torch.Generator(device="cpu").manual_seed(seed)
    dt = _dtype(case.dtype)
    b, length, k, hist = case.b, case.length, case.k, case.hist
    if hist * k > length:
        raise ValueError(f"{case.label()}: hist*k={hist * k} slots do not fit in L={length}")
    n_items = max(1, int(0.8 * b * hist))
    item_of = torch.randint(0, n_items, (b, hist), generator=gen)
    slot_item = torch.full((b, length), -1, dtype=torch.int64)
    slot_abs = torch.full((b, length), -1, dtype=torch.int64)
    slot_rel = torch.full((b, length), -1, dtype=torch.int64)
    pos = torch.arange(hist * k)
    j, t = pos // k, pos % k
    slot_item[:, : hist * k] = item_of[:, j] * k + t
    slot_abs[:, : hist * k] = j.expand(b, -1)
    slot_rel[:, : hist * k] = (hist - 1 - j).expand(b, -1)
    ids = torch.randint(0, case.vocab, (b, length), generator=gen)
    ids[slot_item >= 0] = 0
    tables = {
        "embed_table": torch.randn(case.vocab, case.h, generator=gen),
        "item_tokens": torch.randn(n_items, k, case.h, generator=gen),
        "abs_table": torch.randn(case.n_abs, case.h, generator=gen) * 0.02,
        "rel_table": torch.randn(case.n_rel, case.h, generator=gen) * 0.02,
    }
    out: dict[str, Any] = {n: v.to(device, dt) for n, v in tables.items()}
    out.update(
        input_ids=ids.to(device),
        slot_item=slot_item.to(device),
        slot_abs=slot_abs.to(device),
        slot_rel=slot_rel.to(device),
        dy=torch.randn(b, length, case.h, generator=gen).to(device, dt),
        n_item_slots=int((slot_item >= 0).sum()),
    )
    return out


# ----------------------------------------------------------------------------------------------
# byte counts (unique bytes an ideal implementation moves)
# ----------------------------------------------------------------------------------------------
def mome_bytes(case: MomeCase, mode: str) -> int:
    es = _dtype(case.dtype).itemsize
    rows = case.n * case.k
    x = case.n * case.m * case.k * case.h * es
    small = case.n * case.m * case.g * es + case.n * case.m  # logits + bool mask
    fwd = x + small + 2 * case.h * es + rows * case.h * es + rows * 8  # + out + mean/rstd
    bwd = rows * case.h * es + x + small + case.h * es + rows * 8  # read dy, x, logits, mask, W, stats
    bwd += x + case.n * case.m * case.g * es + 2 * case.h * es  # write dx, dlogits, dW, dB
    return fwd if mode == "fwd" else fwd + bwd


def inject_bytes(case: InjectCase, inp: dict[str, Any], mode: str) -> int:
    es = _dtype(case.dtype).itemsize
    t = case.b * case.length
    n_item = int(inp["n_item_slots"])
    n_text = t - n_item
    h = case.h
    fwd = t * 8 + n_text * 8 + 2 * n_item * 8  # slot_item everywhere, ids at text, cues at items
    fwd += n_text * h * es + n_item * 3 * h * es + t * h * es  # gathers + output
    n_rows = inp["item_tokens"].shape[0] * case.k
    bwd = 3 * n_item * 8 + n_item * h * es  # slot indices + dout at item positions
    bwd += (n_rows + case.n_abs + case.n_rel) * h * es  # dense grads written
    return fwd if mode == "fwd" else fwd + bwd


# ----------------------------------------------------------------------------------------------
# runners
# ----------------------------------------------------------------------------------------------
def _compiled(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """A fresh ``torch.compile`` of ``fn`` (static shapes). Dynamo's caches are reset first: its
    per-code-object recompile limit would otherwise silently fall back to eager after a few shapes."""
    torch._dynamo.reset()
    return torch.compile(fn, dynamic=False)


def mome_runner(impl: str, mode: str, inp: dict[str, torch.Tensor]) -> Callable[[], Any]:
    """A no-argument callable running one MoME step (no synchronisation inside)."""
    if impl == "triton":

        def fn(*a: Any) -> torch.Tensor:
            return mome_combine(*a, force="triton")

    elif impl == "eager":
        fn = mome_combine_reference
    elif impl == "compile":
        fn = _compiled(mome_combine_reference)
    else:
        raise ValueError(f"unknown impl {impl!r}")
    names = ("expert_out", "gate_logits", "ln_weight", "ln_bias")
    if mode == "fwd":
        args = (inp["expert_out"], inp["gate_logits"], inp["mask"], inp["ln_weight"], inp["ln_bias"])

        def run() -> Any:
            with torch.no_grad():
                return fn(*args)

        return run
    leaves = {n: inp[n].detach().clone().requires_grad_(True) for n in names}
    dy = inp["dy"]

    def run_bwd() -> Any:
        out = fn(leaves["expert_out"], leaves["gate_logits"], inp["mask"], leaves["ln_weight"], leaves["ln_bias"])
        return torch.autograd.grad(out, list(leaves.values()), dy)

    return run_bwd


def inject_runner(impl: str, mode: str, inp: dict[str, Any]) -> Callable[[], Any]:
    """A no-argument callable running one injection step (embedding table frozen)."""
    if impl == "triton":

        def fn(*a: Any) -> torch.Tensor:
            return inject_positions(*a, force="triton")

    elif impl == "eager":
        fn = inject_positions_reference
    elif impl == "compile":
        fn = _compiled(inject_positions_reference)
    else:
        raise ValueError(f"unknown impl {impl!r}")
    grad_names = ("item_tokens", "abs_table", "rel_table")
    t = {n: inp[n] for n in ("embed_table", "item_tokens", "abs_table", "rel_table")}
    if mode == "fwdbwd":
        for n in grad_names:
            t[n] = inp[n].detach().clone().requires_grad_(True)
    args = (
        inp["input_ids"], t["embed_table"], inp["slot_item"], inp["slot_abs"], inp["slot_rel"],
        t["item_tokens"], t["abs_table"], t["rel_table"], 0.5,
    )  # fmt: skip
    if mode == "fwd":

        def run() -> Any:
            with torch.no_grad():
                return fn(*args)

        return run
    dy = inp["dy"]

    def run_bwd() -> Any:
        return torch.autograd.grad(fn(*args), [t[n] for n in grad_names], dy)

    return run_bwd


# ----------------------------------------------------------------------------------------------
# timing (cuda_time_ms: bench_utils)
# ----------------------------------------------------------------------------------------------
def measure_copy_bandwidth(device: torch.device, nbytes: int = 1 << 30, reps: int = 20) -> float:
    """Device copy bandwidth in GB/s: ``dst.copy_(src)`` of ``nbytes``, counting read + written bytes."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    ms = cuda_time_ms(lambda: dst.copy_(src), reps=reps, warmup=3)
    del src, dst
    return 2 * nbytes / (ms * 1e-3) / 1e9


# ----------------------------------------------------------------------------------------------
# table
# ----------------------------------------------------------------------------------------------
def run_kernel_table(
    out_json: str | Path | None = None,
    reps: int = 50,
    mome_cases: list[MomeCase] | None = None,
    inject_cases: list[InjectCase] | None = None,
) -> list[dict[str, Any]]:
    """Time every case x mode x impl on CUDA, print a markdown table, write rows to ``out_json``."""
    if not torch.cuda.is_available():
        raise RuntimeError("run_kernel_table needs a CUDA device")
    from speeder_fast.utils import atomic_write_json

    dev = torch.device("cuda")
    card = card_name(dev)
    copy_gbs = measure_copy_bandwidth(dev)
    print(f"card: {card}; measured copy bandwidth: {copy_gbs:.0f} GB/s (read + write)", flush=True)
    rows: list[dict[str, Any]] = []
    jobs: list[tuple[str, Any]] = [("mome", c) for c in (MOME_CASES if mome_cases is None else mome_cases)]
    jobs += [("inject", c) for c in (INJECT_CASES if inject_cases is None else inject_cases)]
    for kind, case in jobs:
        inp = make_mome_inputs(case, dev) if kind == "mome" else make_inject_inputs(case, dev)
        for mode in MODES:
            nbytes = mome_bytes(case, mode) if kind == "mome" else inject_bytes(case, inp, mode)
            ms: dict[str, float] = {}
            for impl in IMPLS:
                runner = (mome_runner if kind == "mome" else inject_runner)(impl, mode, inp)
                try:
                    ms[impl] = cuda_time_ms(runner, reps=reps)
                except Exception as exc:  # a failing impl must not hide the others' numbers
                    print(f"  {case.label()} {mode} {impl}: FAILED {type(exc).__name__}: {exc}", flush=True)
                    ms[impl] = float("nan")
            gbs = nbytes / (ms["triton"] * 1e-3) / 1e9
            row = {
                "kernel": kind,
                "case": case.label(),
                "shape": asdict(case),
                "mode": mode,
                "dtype": case.dtype,
                "card": card,
                "bytes": nbytes,
                "triton_ms": ms["triton"],
                "eager_ms": ms["eager"],
                "compile_ms": ms["compile"],
                "speedup_vs_eager": ms["eager"] / ms["triton"],
                "speedup_vs_compile": ms["compile"] / ms["triton"],
                "triton_gbs": gbs,
                "copy_gbs": copy_gbs,
                "pct_of_copy_bw": 100.0 * gbs / copy_gbs,
                "reps": reps,
            }
            rows.append(row)
            print(_fmt_row(row), flush=True)
        del inp
        torch.cuda.empty_cache()
    print()
    print(markdown_table(rows, card, copy_gbs))
    if out_json is not None:
        atomic_write_json(out_json, {"card": card, "copy_gbs": copy_gbs, "rows": rows})
    return rows


def _fmt_row(r: dict[str, Any]) -> str:
    return (
        f"| {r['case']} | {r['mode']} | {r['triton_ms']:.4f} | {r['eager_ms']:.4f} | {r['compile_ms']:.4f} | "
        f"{r['speedup_vs_eager']:.2f}x | {r['speedup_vs_compile']:.2f}x | {r['triton_gbs']:.0f} | "
        f"{r['pct_of_copy_bw']:.0f}% |"
    )


def markdown_table(rows: list[dict[str, Any]], card: str, copy_gbs: float) -> str:
    head = (
        f"Card: {card}; measured copy bandwidth {copy_gbs:.0f} GB/s; median of CUDA-event timings.\n\n"
        "| case | mode | Triton ms | eager ms | compile ms | vs eager | vs compile | Triton GB/s | % copy BW |\n"
        "|---|---|---|---|---|---|---|---|---|"
    )
    return "\n".join([head] + [_fmt_row(r) for r in rows])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("runs/bench/kernels.json"), help="JSON file for the rows")
    ap.add_argument("--reps", type=int, default=50, help="timed repetitions per measurement (median)")
    ap.add_argument("--only", default="", help="comma-separated substrings; keep cases whose label contains one")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_kernels: no CUDA device; nothing to measure", file=sys.stderr)
        return 2
    keys = [k for k in args.only.split(",") if k]

    def keep(c: Any) -> bool:
        return not keys or any(k in c.label() for k in keys)

    mome = [c for c in MOME_CASES if keep(c)]
    inject = [c for c in INJECT_CASES if keep(c)]
    if not mome and not inject:
        print(f"bench_kernels: --only {args.only!r} matches no case", file=sys.stderr)
        return 2
    run_kernel_table(args.out, reps=args.reps, mome_cases=mome, inject_cases=inject)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
