"""Facts about the machine, shared by the profiler (``speeder_fast.profile``) and the benchmarks
(``benchmarks/bench_utils.py`` re-exports them): the card's name, its dense peak FLOP/s, package
versions, and whether a model folder holds weights. Nothing here touches a device except to read
its name."""

from __future__ import annotations

import importlib.metadata as md
import os
import platform
from pathlib import Path
from typing import Iterable

import torch

__all__ = ["PEAKS", "VERSION_PACKAGES", "card_name", "has_weights", "peak_tflops", "version", "versions"]

#: dense tensor-core peaks (no sparsity), TFLOP/s, vendors' datasheets: (name substring, bf16, tf32);
#: the first matching substring wins (so "H100 PCIe" precedes "H100")
PEAKS: list[tuple[str, float, float]] = [
    ("H100 PCIe", 756.0, 378.0),
    ("H100 NVL", 835.0, 417.5),
    ("GH200", 989.0, 494.7),
    ("H200", 989.0, 494.7),
    ("H100", 989.0, 494.7),  # SXM5 ("H100 80GB HBM3")
    ("A100", 312.0, 156.0),
    ("L40S", 362.0, 181.0),
    ("A10G", 70.0, 35.0),
    ("L4", 121.0, 60.0),
]

#: the packages every benchmark / profile report lists
VERSION_PACKAGES = ("torch", "transformers", "peft", "bitsandbytes", "triton", "liger-kernel", "flash-attn",
                    "pytest-benchmark")


def card_name(device: torch.device | str) -> str:
    """The CUDA device's name (``NVIDIA H100 80GB HBM3``), or ``CPU <model> x<cores> (torch threads N)``."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU {cpu} x{os.cpu_count()} (torch threads {torch.get_num_threads()})"


def peak_tflops(card: str, dtype: str = "bf16") -> float | None:
    """Dense peak TFLOP/s of ``card`` (a :func:`card_name`) for ``dtype``: bf16/fp16/nf4 -> the bf16
    column, fp32/float32 -> TF32; None for an unknown card (and every CPU)."""
    for name, bf16, tf32 in PEAKS:
        if name.lower() in card.lower():
            return tf32 if dtype in ("fp32", "float32", "tf32") else bf16
    return None


def version(pkg: str) -> str | None:
    """Installed version of distribution ``pkg``, or None."""
    try:
        return md.version(pkg)
    except md.PackageNotFoundError:
        return None


def versions(packages: Iterable[str] = VERSION_PACKAGES) -> dict[str, str | None]:
    """``{package: version or None}``."""
    return {p: version(p) for p in packages}


def has_weights(path: str | Path) -> bool:
    """Whether a model folder holds weights (``*.safetensors`` or ``pytorch_model*.bin``)."""
    p = Path(path)
    return any(p.glob("*.safetensors")) or any(p.glob("pytorch_model*.bin"))
