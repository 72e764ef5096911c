"""Kill a training run with SIGKILL mid-epoch, resume it, and reach exactly the uninterrupted result.

The run kills itself at a chosen step through ``train(..., on_step=...)`` (:data:`KILL_AT_STEP`), so the
interruption point is exact and nothing in the training loop waits for a test.

Runs the real CLI (``python -m speeder_fast.train``) as subprocesses on a tiny random Llama and a tiny
RecBole-format dataset written by the test, on CPU with one thread (deterministic): the resumed run's
final trainable weights are bit-identical to an uninterrupted run's, and its per-step losses after the
resume point equal the uninterrupted ones.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import tiny
from speeder_fast.config import Config, StageConfig, to_toml

REPO = Path(__file__).resolve().parents[1]


def write_atomic_dataset(folder: Path, n_users: int = 36, n_items: int = 50, seed: int = 0) -> Path:
    """A tiny RecBole atomic dataset ``folder/tiny.inter`` + ``tiny.item`` (next item = previous + 1)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    titles = tiny.item_titles(n_items)
    lines = ["user_id:token\titem_id:token\ttimestamp:float"]
    for u in range(n_users):
        start, n = int(rng.integers(0, n_items)), int(rng.integers(5, 9))
        lines += [f"u{u}\t{(start + j) % n_items}\t{j}" for j in range(n)]
    (folder / "tiny.inter").write_text("\n".join(lines) + "\n")
    items = ["item_id:token\ttitle:token_seq\tdescription:token_seq"]
    items += [f"{i}\t{t}\tA {t} for the office." for i, t in enumerate(titles)]
    (folder / "tiny.item").write_text("\n".join(items) + "\n")
    return folder


def tiny_config(llm_dir: Path, data_dir: Path, out: Path, run_name: str = "run", **train: object) -> Config:
    """A speeder (text + collab, two MPO stages) config small enough for a few seconds of CPU training."""
    cfg = tiny.train_config(llm_dir, out, run_name)
    cfg.seed = 0
    cfg.data.source = str(data_dir)
    cfg.data.user_kcore = 0
    cfg.data.cache_dir = str(out / "data-cache")
    cfg.prompt.paradigm, cfg.prompt.answer_mode = "speeder", "score"
    cfg.features.sasrec_epochs, cfg.features.sasrec_dim = 2, 16
    cfg.train.grad_accum = 1
    cfg.train.log_every, cfg.train.eval_every, cfg.train.eval_max_examples = 1, 3, 8
    cfg.train.checkpoint_every, cfg.train.keep_checkpoints = 2, 2
    cfg.train.stages = [StageConfig(modalities=["text"], max_steps=5, lr=3e-3, curriculum_ramp=0.5),
                        StageConfig(modalities=["text", "collab"], max_steps=5, lr=3e-3)]
    cfg.eval.max_examples, cfg.eval.batch_size = 8, 8
    for k, v in train.items():
        setattr(cfg.train, k, v)
    return cfg


def cli_env(tmp: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(SPEEDER_CACHE=str(tmp / "cache"), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""))
    env.update(extra)
    return env


#: ``python -c KILL_AT_STEP CONFIG N``: train CONFIG and SIGKILL the process right after global step N (the
#: ``on_step`` hook of :func:`speeder_fast.training.train`), as a crash or a preemption would
KILL_AT_STEP = """
import os, signal, sys
from speeder_fast.config import load_config
from speeder_fast.training import train

def kill_at(progress, step=int(sys.argv[2])):
    if progress.global_step == step:
        os.kill(os.getpid(), signal.SIGKILL)

train(load_config(sys.argv[1]), progress=False, on_step=kill_at)
"""


def run_cli(args: list[str], env: dict, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "speeder_fast.train", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def train_losses(run_dir: Path) -> dict[int, float]:
    """global_step -> loss (the last record per step)."""
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r["type"] == "train":
            out[r["global_step"]] = r["loss"]
    return out


def train_steps(run_dir: Path) -> list[int]:
    """global_step of every train record of metrics.jsonl, in file order."""
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["global_step"] for r in recs if r["type"] == "train"]


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "checkpoints" / "final" / "trainable.safetensors"))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume_inputs")
    return tiny.make_llm_dir(root / "llm"), write_atomic_dataset(root / "data")


def test_sigkill_then_resume_matches_uninterrupted(inputs, tmp_path):
    llm, data = inputs
    env = cli_env(tmp_path)
    ref_cfg = tiny_config(llm, data, tmp_path / "out", "ref")
    (tmp_path / "ref.toml").write_text(to_toml(ref_cfg))
    r = run_cli(["--config", str(tmp_path / "ref.toml"), "--no-progress", "--no-eval"], env)
    assert r.returncode == 0, r.stderr[-3000:]
    ref = tmp_path / "out" / "ref"
    # the two timing lines say what they count
    assert "trained: 10 steps in " in r.stdout and "(setup, validation and checkpoints included)" in r.stdout
    assert "training steps alone (validation excluded): " in r.stdout and " s per epoch of 130 examples" in r.stdout

    cfg = tiny_config(llm, data, tmp_path / "out", "killed")
    (tmp_path / "killed.toml").write_text(to_toml(cfg))
    run = tmp_path / "out" / "killed"
    # the run SIGKILLs itself through train()'s on_step hook after global step 5: stage 1 is 5 steps, so
    # that is inside stage 1, mid-epoch, after the step-4 checkpoint and step 5's log record
    proc = subprocess.run([sys.executable, "-c", KILL_AT_STEP, str(tmp_path / "killed.toml"), "5"], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert (run / "checkpoints" / "step-00000004").is_dir(), "the run ended before its step-4 checkpoint"
    assert not (run / "FINISHED.json").exists() and not (run / "checkpoints" / "final").exists()
    killed_at = max(train_losses(run))
    assert killed_at == 5 and not (run / "checkpoints" / "step-00000005").exists()

    r = run_cli(["--resume", str(run), "--no-progress", "--no-eval"], env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming" in r.stderr
    assert (run / "FINISHED.json").is_file()
    a, b = final_weights(ref), final_weights(run)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k  # bit-identical (CPU, one thread)
    la, lb = train_losses(ref), train_losses(run)
    assert sorted(la) == sorted(lb) == list(range(1, 11))
    # metrics.jsonl was cut back to the checkpoint on resume: every step is logged once, as in the reference
    assert train_steps(run) == list(range(1, 11))
    assert all(la[s] == lb[s] for s in la), {s: (la[s], lb[s]) for s in la if la[s] != lb[s]}
    summary = json.loads((run / "train_summary.json").read_text())
    assert summary["resumed"] is True and summary["steps"] == 10

    # resuming a finished run says so and exits 0 without touching it
    r = run_cli(["--resume", str(run), "--no-progress"], env)
    assert r.returncode == 0 and "already finished" in r.stdout
    assert "| model | n |" in r.stdout and "| valid | 8 |" in r.stdout and "{'" not in r.stdout, r.stdout


def test_resume_skips_a_corrupt_latest_checkpoint(inputs, tmp_path):
    """The newest checkpoint is truncated: resume warns naming the file, uses the previous one, and
    still reaches the uninterrupted run's weights."""
    llm, data = inputs
    env = cli_env(tmp_path)
    cfg = tiny_config(llm, data, tmp_path / "out", "ref", eval_every=0, keep_checkpoints=3)
    cfg.train.stages = cfg.train.stages[:1]
    (tmp_path / "c.toml").write_text(to_toml(cfg))
    r = run_cli(["--config", str(tmp_path / "c.toml"), "--no-progress", "--no-eval"], env)
    assert r.returncode == 0, r.stderr[-3000:]
    ref = tmp_path / "out" / "ref"
    run = tmp_path / "out" / "broken"
    import shutil

    shutil.copytree(ref, run)
    # pretend the run died while step 4 was being overwritten: drop everything after it, truncate its weights
    (run / "FINISHED.json").unlink()
    for name in ("final", "stage1", "best", "step-00000005"):
        shutil.rmtree(run / "checkpoints" / name)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000002", "step-00000004"]
    w = run / "checkpoints" / "step-00000004" / "trainable.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    r = run_cli(["--resume", str(run), "--no-progress", "--no-eval"], env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "step-00000004/trainable.safetensors" in r.stderr and "truncated" in r.stderr
    assert (run / "checkpoints" / "corrupt-step-00000004").is_dir()
    a, b = final_weights(ref), final_weights(run)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # resumed from step 2: the copied log's records of steps 3-5 were cut, the resumed run logged them once
    assert train_steps(run) == train_steps(ref) == [1, 2, 3, 4, 5]
