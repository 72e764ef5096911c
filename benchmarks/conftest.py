"""Shared fixtures for the benchmarks (pytest-benchmark). Keep this minimal: helpers live in the
bench_*.py modules next to the tests that use them."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():  # same rule as tests/conftest.py: Triton runs interpreted on CPU
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def cuda_device() -> torch.device:
    """The CUDA device; skips GPU benchmarks with a clear reason on CPU-only machines."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA: Triton/torch.compile kernel timings are only meaningful on a GPU")
    return torch.device("cuda")


@pytest.fixture(scope="session")
def copy_bandwidth(cuda_device: torch.device) -> float:
    """Measured device copy bandwidth in GB/s (bytes read + written), once per session."""
    from bench_kernels import measure_copy_bandwidth

    return measure_copy_bandwidth(cuda_device)
