import os

# Triton kernels run on CPU only under the interpreter; it must be set before triton is imported.
try:
    import torch

    _cuda = torch.cuda.is_available()
except Exception:  # pragma: no cover
    _cuda = False
if not _cuda:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pathlib

import pytest

SHARED_DATA = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture
def shared_data():
    """Path to ../shared/data; skips the test with a clear reason when absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data folder {SHARED_DATA} is absent (see README: Data)")
    return SHARED_DATA


@pytest.fixture(scope="module")
def tok():
    """The tiny BPE tokenizer of ``tests/tiny.py`` (one per test module)."""
    import tiny

    return tiny.make_tokenizer()


@pytest.fixture(scope="module")
def prepared():
    """The tiny toy dataset of ``tests/tiny.py``: 8 candidates, history <= 5 (one per test module)."""
    import tiny

    return tiny.make_prepared(n_candidates=8, max_history=5)
