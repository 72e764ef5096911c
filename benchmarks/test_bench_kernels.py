"""pytest-benchmark timings of the custom kernels: Triton vs eager reference vs torch.compile(reference).

GPU cases skip on machines without CUDA; two small CPU cases time the eager torch reference so that
``pytest benchmarks/ --benchmark-only`` does real work anywhere. Each GPU result records bytes moved,
achieved GB/s, the measured copy bandwidth and its percentage, card name, dtype and shapes in
``extra_info``. For a compact table use ``python benchmarks/bench_kernels.py --out FILE``.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any, Callable

import pytest
import torch
from bench_kernels import (
    CPU_INJECT_CASE,
    CPU_MOME_CASE,
    IMPLS,
    INJECT_CASES,
    MODES,
    MOME_CASES,
    card_name,
    inject_bytes,
    inject_runner,
    make_inject_inputs,
    make_mome_inputs,
    mome_bytes,
    mome_runner,
)

# pytest-benchmark times each round with a host clock: every timed call ends with a synchronize.
BENCH_MOME = [MOME_CASES[1], MOME_CASES[4]]
BENCH_INJECT = [INJECT_CASES[1], INJECT_CASES[3]]


def _timed(fn: Callable[[], Any], device: torch.device) -> Callable[[], None]:
    def run() -> None:
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    return run


def _record(benchmark: Any, nbytes: int, device: torch.device, copy_gbs: float | None, **info: Any) -> None:
    benchmark.extra_info.update(info)
    benchmark.extra_info["bytes"] = nbytes
    benchmark.extra_info["card"] = card_name(device)
    stats = getattr(benchmark, "stats", None)  # None under --benchmark-disable
    if stats is not None and getattr(stats, "stats", None) is not None and stats.stats.median > 0:
        gbs = nbytes / stats.stats.median / 1e9
        benchmark.extra_info["gbs"] = round(gbs, 1)
        if copy_gbs:
            benchmark.extra_info["copy_gbs"] = round(copy_gbs, 1)
            benchmark.extra_info["pct_of_copy_bw"] = round(100.0 * gbs / copy_gbs, 1)


def _run(benchmark: Any, runner: Callable[[], Any], device: torch.device) -> None:
    runner()  # warm-up: Triton JIT / torch.compile happen outside the timing
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    benchmark(_timed(runner, device))


@pytest.mark.gpu
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", BENCH_MOME, ids=lambda c: c.label().replace(" ", "_"))
def test_bench_mome(benchmark: Any, cuda_device: torch.device, copy_bandwidth: float, case: Any, impl: str, mode: str) -> None:
    inp = make_mome_inputs(case, cuda_device)
    benchmark.group = f"{case.label()} {mode}"
    _run(benchmark, mome_runner(impl, mode, inp), cuda_device)
    _record(benchmark, mome_bytes(case, mode), cuda_device, copy_bandwidth, impl=impl, mode=mode, dtype=case.dtype, shape=asdict(case))


@pytest.mark.gpu
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", BENCH_INJECT, ids=lambda c: c.label().replace(" ", "_"))
def test_bench_inject(benchmark: Any, cuda_device: torch.device, copy_bandwidth: float, case: Any, impl: str, mode: str) -> None:
    inp = make_inject_inputs(case, cuda_device)
    benchmark.group = f"{case.label()} {mode}"
    _run(benchmark, inject_runner(impl, mode, inp), cuda_device)
    nbytes = inject_bytes(case, inp, mode)
    _record(benchmark, nbytes, cuda_device, copy_bandwidth, impl=impl, mode=mode, dtype=case.dtype, shape=asdict(case))


@pytest.mark.parametrize("mode", MODES)
def test_bench_mome_cpu_reference(benchmark: Any, mode: str) -> None:
    """Eager torch reference on CPU (small shape): keeps the CPU benchmark run meaningful."""
    dev = torch.device("cpu")
    inp = make_mome_inputs(CPU_MOME_CASE, dev)
    benchmark.group = f"cpu {CPU_MOME_CASE.label()} {mode}"
    _run(benchmark, mome_runner("eager", mode, inp), dev)
    _record(benchmark, mome_bytes(CPU_MOME_CASE, mode), dev, None, impl="eager", mode=mode, dtype=CPU_MOME_CASE.dtype, shape=asdict(CPU_MOME_CASE))


@pytest.mark.parametrize("mode", MODES)
def test_bench_inject_cpu_reference(benchmark: Any, mode: str) -> None:
    dev = torch.device("cpu")
    inp = make_inject_inputs(CPU_INJECT_CASE, dev)
    benchmark.group = f"cpu {CPU_INJECT_CASE.label()} {mode}"
    _run(benchmark, inject_runner("eager", mode, inp), dev)
    nbytes = inject_bytes(CPU_INJECT_CASE, inp, mode)
    _record(benchmark, nbytes, dev, None, impl="eager", mode=mode, dtype=CPU_INJECT_CASE.dtype, shape=asdict(CPU_INJECT_CASE))
