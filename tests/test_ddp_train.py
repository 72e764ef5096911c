"""Data-parallel training through the real CLI: ``torchrun --nproc_per_node=2`` (gloo, CPU) equals one
process with the same global batch.

Two processes with ``train.batch_size=2`` and one process with ``train.batch_size=4`` train on exactly the
same examples per step (ShardedSampler), DDP averages the gradients of the loss scaled by
``n_real * world / n_global``, so the loss trajectory, the sharded-and-gathered validation metrics and the
final weights agree within float tolerance (summation order differs). Only rank 0 writes the run folder.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from test_resume import REPO, cli_env, final_weights, inputs, tiny_config, train_losses  # noqa: F401 (fixture)
from speeder_fast.config import to_toml


def _eval_records(run_dir):
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["tag"]: r for r in recs if r["type"] == "eval"}


@pytest.mark.parametrize("precision", ["fp32", "nf4"])
def test_two_process_ddp_matches_single_process(inputs, tmp_path, precision):  # noqa: F811
    if precision == "nf4":
        pytest.importorskip("bitsandbytes")
    llm, data = inputs
    env = cli_env(tmp_path)
    out = tmp_path / "out"
    single = tiny_config(llm, data, out, "single", batch_size=4, grad_accum=2, checkpoint_every=3)
    ddp = tiny_config(llm, data, out, "ddp", batch_size=2, grad_accum=2, checkpoint_every=3)
    for c in (single, ddp):
        c.model.precision = precision
        c.train.stages[0].max_steps = c.train.stages[1].max_steps = 3
    (tmp_path / "single.toml").write_text(to_toml(single))
    (tmp_path / "ddp.toml").write_text(to_toml(ddp))
    r1 = subprocess.run([sys.executable, "-m", "speeder_fast.train", "--config", str(tmp_path / "single.toml"),
                         "--no-progress"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r1.returncode == 0, r1.stderr[-3000:]
    r2 = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                         "-m", "speeder_fast.train", "--config", str(tmp_path / "ddp.toml"), "--no-progress"],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r2.returncode == 0, (r2.stdout[-2000:], r2.stderr[-4000:])
    assert "still referenced after destroy_process_group" not in r2.stderr  # cleanup() freed the group
    assert r2.stdout.count("run folder:") == 1  # only rank 0 prints / writes
    a, b = out / "single", out / "ddp"
    la, lb = train_losses(a), train_losses(b)
    assert sorted(la) == sorted(lb) == list(range(1, 7))
    tol = 1e-4 if precision == "fp32" else 2e-3
    for s in la:
        assert lb[s] == pytest.approx(la[s], rel=tol, abs=tol), (s, la[s], lb[s])
    ea, eb = _eval_records(a), _eval_records(b)
    assert set(ea) == set(eb) and ea["stage2"]["n"] == eb["stage2"]["n"] == 8  # sharded eval gathered all 8
    for tag in ea:
        assert eb[tag]["NDCG@10"] == pytest.approx(ea[tag]["NDCG@10"], abs=1e-6 if precision == "fp32" else 0.13)
    wa, wb = final_weights(a), final_weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=tol * 10, atol=tol * 10)
    state = json.loads((b / "checkpoints" / "final" / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and state["n_rng"] == 2  # one RNG state per rank
    assert (b / "FINISHED.json").is_file() and (b / "eval_test_score.json").is_file()
