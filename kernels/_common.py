"""Shared helpers for the Triton kernels: availability, launch heuristics, output allocation.

Nothing here touches tensor values on the host (no ``.item()``), so the launchers stay free of
device synchronisation.
"""

from __future__ import annotations

import contextlib
import functools
import os
from typing import Any, Callable, Iterator

import torch

try:  # Triton is optional at import time (e.g. macOS); the torch reference path always works.
    import triton
    import triton.language as tl

    HAS_TRITON = True
except Exception:  # pragma: no cover - exercised only where triton is missing
    triton = None  # type: ignore[assignment]
    tl = None  # type: ignore[assignment]
    HAS_TRITON = False

#: floating dtypes the Triton kernels accept for their activations / tables.
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
#: values accepted by the dispatchers' ``force`` argument: ``model.use_kernels``'s choices, defined once in
#: :mod:`speeder_fast.config`.
from speeder_fast.config import KERNEL_CHOICES as FORCE_CHOICES  # noqa: E402

_POISON = False

#: name -> (compiled kernel, grid) of the most recent *compiled* (non-interpreter) launch; read by
#: ``speeder_fast.profile`` to print register / shared-memory / warp counts.
LAST_LAUNCH: dict[str, Any] = {}


@contextlib.contextmanager
def poison_outputs(enabled: bool = True) -> Iterator[None]:
    """Within the block, every buffer a launcher hands to a kernel starts as NaN instead of empty.

    Tests use this to prove that the kernels write every element they are responsible for: a missed
    element stays NaN and fails the comparison against the reference.
    """
    global _POISON
    old, _POISON = _POISON, enabled
    try:
        yield
    finally:
        _POISON = old


def alloc(shape: tuple[int, ...] | list[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Allocate a kernel output: ``torch.empty`` normally, NaN-filled under :func:`poison_outputs`."""
    if _POISON:
        return torch.full(tuple(shape), float("nan"), dtype=dtype, device=device)
    return torch.empty(tuple(shape), dtype=dtype, device=device)


def interpreter_enabled() -> bool:
    """True when Triton runs kernels with its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def check_triton_device(t: torch.Tensor, op: str) -> None:
    """Raise a clear error when the Triton path cannot run on ``t``'s device."""
    if not HAS_TRITON:
        raise RuntimeError(f"{op}: force='triton' requested but triton is not installed")
    if t.device.type == "cuda":
        return
    if t.device.type == "cpu" and interpreter_enabled():
        return
    raise RuntimeError(
        f"{op}: the Triton path needs CUDA tensors, or CPU tensors with TRITON_INTERPRET=1 set "
        f"before triton is imported (got device {t.device})"
    )


def check_float_dtype(t: torch.Tensor, name: str, op: str) -> None:
    if t.dtype not in TRITON_DTYPES:
        raise TypeError(f"{op}: {name} has dtype {t.dtype}; the Triton path supports fp16, bf16 and fp32")


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def warps_for(block_elems: int, elems_per_thread: int = 16, max_warps: int = 16) -> int:
    """num_warps so that each thread holds about ``elems_per_thread`` fp32 values of a tile."""
    w = max(1, block_elems // (32 * elems_per_thread))
    return int(min(max_warps, max(4, next_pow2(w))))


@functools.lru_cache(maxsize=None)
def num_sms(device_index: int) -> int:
    return int(torch.cuda.get_device_properties(device_index).multi_processor_count)


def persistent_programs(device: torch.device, n_rows: int, per_sm: int = 4) -> int:
    """Program count for the row-looping backward kernels (Liger-style partial sums)."""
    if device.type == "cuda":
        idx = device.index if device.index is not None else torch.cuda.current_device()
        cap = num_sms(idx) * per_sm
    else:  # interpreter: every program is executed serially, few programs keep it fast
        cap = 4
    return max(1, min(int(n_rows), cap))


def record_launch(name: str, compiled: Any, grid: tuple[int, ...]) -> None:
    """Remember a compiled kernel handle (not the interpreter's) for the profiler's metadata table."""
    if compiled is not None and hasattr(compiled, "metadata"):
        LAST_LAUNCH[name] = (compiled, grid)


def compiled_metadata(compiled: Any) -> dict[str, Any]:
    """Registers, spills, shared memory and warps of a compiled Triton kernel (best effort)."""
    md = getattr(compiled, "metadata", None)

    def _get(obj: Any, key: str) -> Any:
        if obj is None:
            return None
        if isinstance(obj, dict):
            return obj.get(key)
        return getattr(obj, key, None)

    return {
        "n_regs": getattr(compiled, "n_regs", None),
        "n_spills": getattr(compiled, "n_spills", None),
        "shared_bytes": _get(md, "shared"),
        "num_warps": _get(md, "num_warps"),
        "num_stages": _get(md, "num_stages"),
    }


def eager_or_op(op_name: str, eager: Callable[..., Any]) -> Callable[..., Any]:
    """A launcher that calls ``eager`` (the Triton launcher) directly in eager mode, where custom-op
    dispatch would only add host time, and the registered opaque custom op
    ``torch.ops.speeder_fast.<op_name>`` while ``torch.compile`` traces."""

    def launch(*args: Any) -> Any:
        if torch.compiler.is_compiling():
            return getattr(torch.ops.speeder_fast, op_name)(*args)
        return eager(*args)

    launch.__name__ = f"launch_{op_name}"
    return launch
