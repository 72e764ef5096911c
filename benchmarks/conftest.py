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


# ----------------------------------------------------------------------------------------------
# paradigm benchmarks (benchmarks/test_bench_paradigms.py)
# ----------------------------------------------------------------------------------------------
def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("speeder paradigm benchmarks")
    group.addoption("--paradigm-summary", default=os.environ.get("SPEEDER_BENCH_SUMMARY", "runs/bench/paradigms_summary.json"),
                    help="collector JSON written at the end of a paradigm benchmark session (records, ratios, environment)")


def _sigterm_to_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum} (timeout?)")


def pytest_configure(config: pytest.Config) -> None:
    # `timeout` sends SIGTERM: turn it into KeyboardInterrupt so that pytest still finishes the
    # session and pytest-benchmark writes --benchmark-json with the cases measured so far.
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _sigterm_to_interrupt)
    # CI smoke (`pytest benchmarks/ --benchmark-disable`): every benchmark body runs once, so the
    # paradigm benchmarks switch to a tiny random model (SPEEDER_BENCH_SMOKE=1) to stay fast.
    try:
        disabled = bool(config.getoption("benchmark_disable"))
    except ValueError:
        disabled = False
    if disabled:
        os.environ.setdefault("SPEEDER_BENCH_SMOKE", "1")


class ParadigmCollector:
    """Gathers every paradigm record of the session; written (with ratios) at session end."""

    def __init__(self, path: str) -> None:
        import time

        self.path = path
        self.t0 = time.perf_counter()
        self.records: list[dict] = []
        self.skipped: list[dict] = []
        self.meta: dict = {}
        self.token_summary: dict = {}

    def elapsed(self) -> float:
        import time

        return time.perf_counter() - self.t0

    def add(self, record: dict) -> None:
        self.records.append(record)
        self.flush()

    def skip(self, case_id: str, why: str) -> None:
        self.skipped.append({"case_id": case_id, "why": why})
        self.flush()

    def flush(self) -> None:
        """Write the summary now (atomic): a run killed by a timeout keeps what it measured."""
        from bench_paradigms import write_summary

        write_summary(self.path, self.records, self.skipped, self.meta, self.token_summary)


@pytest.fixture(scope="session")
def paradigm_collector(request: pytest.FixtureRequest):
    """Session collector; at teardown writes ``--paradigm-summary`` (records, skips, ratios, environment)."""
    c = ParadigmCollector(request.config.getoption("paradigm_summary"))
    yield c
    if c.records or c.skipped:
        c.flush()


@pytest.fixture(scope="session")
def paradigm_env(paradigm_collector: ParadigmCollector):
    """Data + tokenizer + the current LLM for the paradigm benchmarks; skips when the data is absent."""
    from bench_paradigms import BenchEnv, data_dir, environment_info

    d = data_dir()
    if not d.is_dir():
        pytest.skip(f"real data {d} is absent (set SPEEDER_BENCH_DATA, or provide ../shared/data/amazon-office)")
    env = BenchEnv()
    paradigm_collector.meta = {**environment_info(env.device), "torch_threads": torch.get_num_threads()}
    yield env
    env.release()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Drop benchmarks interrupted before their first timed round (e.g. by SIGTERM from `timeout`):
    pytest-benchmark cannot serialise empty stats and would write an empty --benchmark-json."""
    bs = getattr(session.config, "_benchmarksession", None)
    benches = getattr(bs, "benchmarks", None)
    if isinstance(benches, list):
        benches[:] = [b for b in benches if getattr(getattr(b, "stats", None), "data", None)]
