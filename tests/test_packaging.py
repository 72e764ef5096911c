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
