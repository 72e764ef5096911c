"""Packaging invariants: the kernels folder is speeder_fast.kernels, never a top-level `kernels`."""

import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]


def _run(code: str, cwd: pathlib.Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_speeder_fast_kernels_importable():
    import speeder_fast.kernels as k

    assert pathlib.Path(k.__file__).resolve().parent == REPO / "kernels"
    assert callable(k.mome_combine) and callable(k.inject_positions)


def test_top_level_kernels_is_not_this_project_even_from_repo_root(tmp_path):
    # From the repo root the folder is on sys.path; importing it as `kernels` must fail cleanly
    # (or resolve to a different, real `kernels` distribution), never to our folder.
    code = (
        "import sys\n"
        "try:\n"
        "    import kernels\n"
        "except ImportError as e:\n"
        "    print('IMPORTERROR', e)\n"
        "    sys.exit(0)\n"
        "f = getattr(kernels, '__file__', None)\n"
        "assert not hasattr(kernels, 'mome_combine'), 'our kernels leaked under the top-level name'\n"
        f"assert f is None or not f.startswith({str(REPO)!r}), f\n"
        "print('OTHER', f)\n"
    )
    for cwd in (REPO, tmp_path):
        r = _run(code, cwd)
        assert r.returncode == 0, r.stderr
        assert "IMPORTERROR" in r.stdout or "OTHER" in r.stdout


def test_transformers_does_not_see_our_folder_as_hf_kernels():
    r = _run(
        "from transformers.utils import import_utils as iu\n"
        "f = getattr(iu, 'is_kernels_available', None)\n"
        "print('AVAILABLE' if (f and f()) else 'ABSENT')\n",
        REPO,
    )
    assert r.returncode == 0, r.stderr
    assert "ABSENT" in r.stdout, r.stdout


def test_cli_loading_a_4bit_model_prints_no_kernels_community_advice(tmp_path):
    """bitsandbytes 0.50 on an AVX512-BF16 CPU probes the Hugging Face `kernels` package when it is imported
    and logs "Failed to load CPU gemm_4bit_forward from kernels-community ... pip install kernels" (from the
    checkout's root it even found our kernels/ folder). A CLI that loads an NF4 model (tiny Llama, one
    training step) prints none of it, run from the checkout's root or elsewhere; it says one line about
    the CPU 4-bit path instead. (On a CPU without AVX512-BF16 bitsandbytes does not probe at all.)"""
    import pytest

    pytest.importorskip("bitsandbytes")
    import tiny
    from test_resume import cli_env, tiny_config, write_atomic_dataset

    from speeder_fast.config import StageConfig, to_toml

    llm, data = tiny.make_llm_dir(tmp_path / "llm"), write_atomic_dataset(tmp_path / "data")
    for i, cwd in enumerate((REPO, tmp_path)):
        cfg = tiny_config(llm, data, tmp_path / "out", f"nf4-{i}", eval_every=0, checkpoint_every=0)
        cfg.model.precision = "nf4"
        cfg.prompt.paradigm = "titles"
        cfg.train.stages = [StageConfig(max_steps=1, lr=1e-3)]
        (tmp_path / f"c{i}.toml").write_text(to_toml(cfg))
        r = subprocess.run([sys.executable, "-m", "speeder_fast.train", "--config", str(tmp_path / f"c{i}.toml"),
                            "--no-progress", "--no-eval"], cwd=cwd, env=cli_env(tmp_path), capture_output=True,
                           text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        assert "kernels-community" not in r.stderr and "pip install kernels" not in r.stderr, r.stderr[-3000:]
        assert "get_kernel" not in r.stderr and "is_gradient_checkpointing" not in r.stderr
        assert "model.precision=nf4 on cpu: bitsandbytes' own CPU 4-bit kernels" in r.stderr


def test_guard_hides_only_our_folder_and_only_that_bitsandbytes_record():
    """After `import speeder_fast` the checkout's root no longer resolves the top-level name `kernels`
    (speeder_fast.kernels still imports), and the bitsandbytes logger drops exactly one message."""
    r = _run(
        "import importlib.util, logging, io\n"
        "import speeder_fast\n"
        "assert importlib.util.find_spec('kernels') is None, importlib.util.find_spec('kernels')\n"
        "import speeder_fast.kernels as k\n"
        "assert callable(k.mome_combine)\n"
        "lg = logging.getLogger('bitsandbytes.backends.cpu.ops')\n"
        "buf = io.StringIO(); lg.addHandler(logging.StreamHandler(buf))\n"
        "lg.warning('Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure', 'x')\n"
        "lg.warning('another bitsandbytes warning')\n"
        "print(repr(buf.getvalue()))\n",
        REPO,
    )
    assert r.returncode == 0, r.stderr
    assert "another bitsandbytes warning" in r.stdout and "kernels-community" not in r.stdout
