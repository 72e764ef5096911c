"""What a newcomer sees (issue 15, item 8): the default text template fits the default data without a
warning, README's --prepare-only step warms the default run's cache, `profile kernels` prints no
profiler debug lines. (The `--resume` report of a finished run and the labelled timing lines are
checked on the real CLI runs of tests/test_resume.py; the packing line in tests/test_recommend.py; the
asset conversion's progress bars in tests/test_assets.py.)"""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest

import tiny

REPO = Path(__file__).resolve().parents[1]


def _warnings(caplog, fn):
    lg = logging.getLogger("speeder_fast")
    lg.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.WARNING, logger="speeder_fast"):
            caplog.clear()
            fn()
    finally:
        lg.removeHandler(caplog.handler)
    return [r.getMessage() for r in caplog.records if "text template" in r.getMessage()]


def test_default_text_template_does_not_warn_a_set_one_does(caplog):
    from speeder_fast.config import FeatureConfig
    from speeder_fast.features.text import render_item_texts

    ds = tiny.make_prepared().dataset  # columns title, description (no brand, no categories), like ml-100k
    assert not {"brand", "categories"} & set(ds.item_text)
    texts = []
    assert _warnings(caplog, lambda: texts.extend(render_item_texts(ds, FeatureConfig().text_template)[0])) == []
    assert texts[0] == f"{ds.item_text['title'][0]}. {ds.item_text['description'][0].strip()}"  # empty fields vanish
    got = _warnings(caplog, lambda: render_item_texts(ds, "{title} by {brand}"))
    assert len(got) == 1 and "['brand']" in got[0] and "not columns of tiny" in got[0]


def test_readme_prepare_only_step_warms_the_default_runs_cache():
    from speeder_fast.train import build_parser, resolve_config

    readme = (REPO / "README.md").read_text()
    step = "python -m speeder_fast.train --prepare-only --preset quick"
    assert step in readme
    default = resolve_config(build_parser().parse_args([]))
    prepared = resolve_config(build_parser().parse_args(step.split()[3:]))
    assert prepared.data == default.data and default.data.max_users == 300  # the same cache key


def test_profile_kernels_prints_no_profiler_debug_lines(tmp_path):
    r = subprocess.run([sys.executable, "-m", "speeder_fast.profile", "kernels", "--device", "cpu", "--items", "4",
                        "--hidden", "32", "--batch", "1", "--seq-len", "16", "--repeat", "1", "--rows", "3",
                        "--out", str(tmp_path / "trace.json")], cwd=tmp_path, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "trace.json").is_file() and "Chrome trace written" in r.stdout
    assert "USDT" not in r.stderr and "profiler_start" not in r.stderr, r.stderr


@pytest.mark.parametrize("valid", [None, {"n": 8, "VHR@1": 0.25, "ValidRatio": 1.0, "NDCG@10": 0.5}])
def test_finished_report_is_tables_not_a_dict(tmp_path, valid):
    from speeder_fast.checkpoint import mark_finished
    from speeder_fast.train import finished_report

    mark_finished(tmp_path, {"steps": 80, "total_seconds": 2311.6, "epoch_seconds": 2689.1, "n_train": 800,
                             "epochs": 0.8, "valid": valid})
    if valid is None:
        (tmp_path / "eval_test_score.md").write_text("## speeder: test split\n\n| model | n |\n|---|---|\n| x | 1 |\n")
    out = finished_report(tmp_path)
    assert "has already finished" in out and "{'" not in out
    assert "trained: 80 steps in 2311.6 s wall time (setup, validation and checkpoints included)" in out
    assert ("training steps alone (validation excluded): 2151.3 s for 80 steps = 0.80 epochs, i.e. 2689.1 s per "
            "epoch of 800 examples") in out
    assert ("(eval_test_score.md)" in out) if valid is None else ("| valid | 8 | 0.2500 | 1.0000 |" in out)


def test_help_config_into_a_closed_pipe():
    """``python -m speeder_fast.train --help-config | head`` exits 0 without a traceback when the
    reader closes the pipe first (BrokenPipeError is handled by ``errors.run_cli``)."""
    import subprocess
    import sys

    p = subprocess.Popen([sys.executable, "-m", "speeder_fast.train", "--help-config"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.close()  # the reader is gone before anything is written
    err = p.stderr.read().decode()
    assert p.wait(timeout=120) == 0, err
    assert "Traceback" not in err and "BrokenPipe" not in err
