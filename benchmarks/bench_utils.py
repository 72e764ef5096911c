"""Helpers every benchmark script shares (after Liger-Kernel's ``benchmark/scripts/utils.py``):

* the machine: :func:`card_name`, :func:`peak_tflops` (dense peak FLOP/s table :data:`PEAKS`),
  :func:`versions`, :func:`has_weights` (from :mod:`speeder_fast.hardware`, which the profiler uses
  too), and :func:`environment_info`, the header of every report;
* timing: :func:`cuda_time_ms` (median of CUDA-event-bracketed calls) and :class:`Timer` (mean of a
  run of calls: CUDA events on a GPU, the wall clock otherwise);
* memory: :class:`PeakMemory` (CUDA ``max_memory_allocated``, or the process peak RSS on CPU),
  :func:`reset_peak_memory` / :func:`peak_memory_gb` (CUDA), :func:`free_memory`.

``bench_paradigms.py``, ``bench_kernels.py`` and ``fastpath_check.py`` import these; nothing here
depends on pytest.
"""

from __future__ import annotations

import gc
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from speeder_fast.hardware import (PEAKS, VERSION_PACKAGES, card_name, has_weights, peak_tflops,  # noqa: E402
                                   version, versions)

__all__ = ["PEAKS", "VERSION_PACKAGES", "PeakMemory", "Timer", "card_name", "cuda_time_ms", "environment_info",
           "free_memory", "has_weights", "peak_memory_gb", "peak_tflops", "reset_peak_memory", "version", "versions"]


def environment_info(device: torch.device, **extra: Any) -> dict[str, Any]:
    """Card, versions, date, python, load average (and GPU memory): the header of every report;
    ``extra`` keys are added as they are."""
    info: dict[str, Any] = {
        "device": device.type,
        "card": card_name(device),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "python": platform.python_version(),
        "versions": versions(),
        **extra,
    }
    if hasattr(os, "getloadavg"):
        info["loadavg_start"] = list(os.getloadavg())
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu_memory_gb"] = round(props.total_memory / 2**30, 1)
    return info


# ----------------------------------------------------------------------------------------------
# timing
# ----------------------------------------------------------------------------------------------
def cuda_time_ms(fn: Callable[[], Any], reps: int = 50, warmup: int = 5) -> float:
    """Median milliseconds of ``fn`` over ``reps`` runs, each bracketed by CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


class Timer:
    """``Timer(device)(fn, warmup, steps) -> (mean seconds per call, last output)``: one CUDA-event pair
    around the ``steps`` calls on a GPU (no host sync between calls), the wall clock elsewhere."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def __call__(self, fn: Callable[[], Any], warmup: int, steps: int) -> tuple[float, Any]:
        out = None
        for _ in range(warmup):
            out = fn()
        self.sync()
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(steps):
                out = fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1000 / steps, out
        t0 = time.perf_counter()
        for _ in range(steps):
            out = fn()
        return (time.perf_counter() - t0) / steps, out


# ----------------------------------------------------------------------------------------------
# memory
# ----------------------------------------------------------------------------------------------
def reset_peak_memory(device: torch.device) -> None:
    """CUDA: synchronize, empty the cache, reset the peak counter (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_memory_gb(device: torch.device) -> float | None:
    """CUDA ``max_memory_allocated`` in GiB since the last reset; None on CPU."""
    return torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def _proc_kb(field_name: str) -> int | None:
    try:
        m = re.search(rf"^{field_name}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    except OSError:
        return None
    return int(m.group(1)) if m else None


def _malloc_trim() -> None:
    """glibc ``malloc_trim(0)``: return free heap memory to the OS (no-op elsewhere)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """Peak memory of one case: CUDA max_memory_allocated, or the CPU process peak RSS.

    CPU: the process peak RSS during the case (``/proc/self/status`` VmHWM after resetting it through
    ``/proc/self/clear_refs``, after glibc ``malloc_trim``) and its growth over the RSS before the
    case -- coarse (allocator caching, other threads), labelled ``cpu_peak_rss``.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.base_mb = 0.0
        self.kind = "cuda_max_allocated" if device.type == "cuda" else "cpu_peak_rss"

    def start(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base_mb = torch.cuda.memory_allocated(self.device) / 2**20
        else:
            _malloc_trim()  # hand freed heap pages back, so RSS growth is this case's
            try:  # "5" resets VmHWM (the peak RSS) to the current RSS (Linux >= 4.0)
                Path("/proc/self/clear_refs").write_text("5")
            except OSError:
                pass
            self.base_mb = (_proc_kb("VmRSS") or 0) / 1024

    def stop(self) -> dict[str, Any]:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device) / 2**20
        else:
            hwm = _proc_kb("VmHWM")
            peak = hwm / 1024 if hwm is not None else float("nan")
        return {"mem_kind": self.kind, "peak_mem_mb": round(peak, 1), "step_mem_mb": round(peak - self.base_mb, 1)}
