"""Checkpoints: exact resume (weights, AdamW, LR schedule, RNG, data position), atomicity, retention."""

from __future__ import annotations

import json
import logging
import math
import random

import numpy as np
import pytest
import torch

from speeder_fast import checkpoint as ck
from speeder_fast.checkpoint import (CheckpointError, CheckpointManager, TrainState, capture_rng, is_finished,
                                     finished_summary, load_optimizer_state, mark_finished,
                                     optimizer_state_to_tensors, restore_rng, state_from_tensors, state_to_tensors)


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Dropout(0.3), torch.nn.Linear(16, 1))


def _opt_sched(model: torch.nn.Module):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.8, 0.95), weight_decay=0.05, eps=1e-7)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 3) * 0.9 ** s)
    return opt, sched


DATA_X = torch.randn(40, 6, generator=torch.Generator().manual_seed(1))
DATA_Y = torch.randn(40, 1, generator=torch.Generator().manual_seed(2))


def _train(model, opt, sched, start: int, stop: int, bs: int = 8, data_pos: dict | None = None) -> dict:
    """Steps [start, stop): numpy-shuffled epochs (global RNG), dropout (torch RNG), python noise."""
    model.train()
    pos = dict(data_pos or {"epoch": 0, "step_in_epoch": 0, "order": None})
    steps_per_epoch = len(DATA_X) // bs
    for step in range(start, stop):
        if pos["step_in_epoch"] == 0 or pos["order"] is None:
            pos["order"] = np.random.permutation(len(DATA_X)).tolist()
        i = pos["step_in_epoch"]
        idx = pos["order"][i * bs:(i + 1) * bs]
        scale = 1.0 + random.gauss(0.0, 0.1)  # python RNG affects the update too
        loss = ((model(DATA_X[idx]) - DATA_Y[idx]) ** 2).mean() * scale
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        pos["step_in_epoch"] += 1
        if pos["step_in_epoch"] == steps_per_epoch:
            pos = {"epoch": pos["epoch"] + 1, "step_in_epoch": 0, "order": None}
    return pos


def test_state_roundtrip_preserves_types():
    state = {"a": (1, 2.5, "x"), 3: [True, None, float("nan"), float("inf")], "t": torch.arange(5.0),
             "n": np.arange(4, dtype=np.int64), "nested": {"a.b": torch.ones(2), "a": {"b": torch.zeros(2)}},
             (1, 2): "tuple-key", "__tensor__": "reserved-looking key", "big": 2**70}
    tensors, meta = state_to_tensors(state)
    json.dumps(meta)  # must be plain JSON
    back = state_from_tensors(tensors, json.loads(json.dumps(meta)))
    assert back["a"] == (1, 2.5, "x") and isinstance(back["a"], tuple)
    assert back[3][:2] == [True, None] and math.isnan(back[3][2]) and back[3][3] == math.inf
    assert torch.equal(back["t"], state["t"]) and np.array_equal(back["n"], state["n"])
    assert torch.equal(back["nested"]["a.b"], torch.ones(2)) and torch.equal(back["nested"]["a"]["b"], torch.zeros(2))
    assert back[(1, 2)] == "tuple-key" and back["__tensor__"] == "reserved-looking key" and back["big"] == 2**70


def test_unsupported_value_is_named():
    with pytest.raises(CheckpointError, match=r"extra\.fn.*function"):
        state_to_tensors({"extra": {"fn": lambda: 0}})


def test_adamw_and_scheduler_roundtrip_exact(tmp_path):
    model = _model()
    opt, sched = _opt_sched(model)
    _train(model, opt, sched, 0, 4)
    tensors, meta = optimizer_state_to_tensors(opt)
    json.dumps(meta)
    model2 = _model(seed=99)
    model2.load_state_dict(model.state_dict())
    opt2, sched2 = _opt_sched(model2)
    load_optimizer_state(opt2, tensors, json.loads(json.dumps(meta)))
    sd1, sd2 = opt.state_dict(), opt2.state_dict()
    assert sd1["param_groups"] == sd2["param_groups"]
    assert isinstance(sd2["param_groups"][0]["betas"], tuple)
    for k in sd1["state"]:
        for name in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(sd1["state"][k][name], sd2["state"][k][name]), (k, name)
    # A mismatched optimizer is refused with a clear error.
    other = torch.optim.AdamW(torch.nn.Linear(2, 2).parameters())
    with pytest.raises(CheckpointError, match="does not match"):
        load_optimizer_state(other, tensors, meta)


def test_rng_capture_restore_exact():
    g = torch.Generator().manual_seed(5)
    ng = np.random.default_rng(7)
    torch.manual_seed(3), np.random.seed(3), random.seed(3)
    st = json.loads(json.dumps(capture_rng({"loader": g, "np": ng})))
    a = (torch.rand(3), np.random.rand(3), random.random(), torch.rand(2, generator=g), ng.random(2))
    restore_rng(st, {"loader": g, "np": ng})
    b = (torch.rand(3), np.random.rand(3), random.random(), torch.rand(2, generator=g), ng.random(2))
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]
    assert torch.equal(a[3], b[3]) and np.array_equal(a[4], b[4])
    with pytest.raises(CheckpointError, match="no generator 'other'"):
        restore_rng(st, {"other": torch.Generator()})


def test_resume_is_bit_exact(tmp_path):
    """10 straight steps == 6 steps, checkpoint, scrambled process state, load, 4 more steps."""
    def fresh():
        m = _model()
        o, s = _opt_sched(m)
        return m, o, s

    torch.manual_seed(11), np.random.seed(11), random.seed(11)
    m_ref, o_ref, s_ref = fresh()
    _train(m_ref, o_ref, s_ref, 0, 10)

    torch.manual_seed(11), np.random.seed(11), random.seed(11)
    m, o, s = fresh()
    pos = _train(m, o, s, 0, 6)
    mgr = CheckpointManager(tmp_path / "run", keep_last=2)
    state = TrainState(step=6, stage=1, weights=dict(m.state_dict()), optimizer=o.state_dict(),
                       scheduler=s.state_dict(), data=pos, rng=[capture_rng()], config_text="seed = 11\n")
    mgr.save(6, state, metric=0.5)
    assert mgr.best_info() == {"step": 6, "metric": 0.5}
    # Scramble everything a new process would have different.
    torch.manual_seed(999), np.random.seed(999), random.seed(999)
    m2, o2, s2 = fresh()
    with torch.no_grad():
        for p in m2.parameters():
            p.add_(1.0)
    loaded = mgr.load_latest_valid()
    assert loaded is not None and loaded.step == 6 and loaded.stage == 1 and loaded.metric == 0.5
    assert loaded.config_text == "seed = 11\n" and loaded.path == mgr.path_for(6)
    m2.load_state_dict(loaded.weights)
    o2.load_state_dict(loaded.optimizer)
    s2.load_state_dict(loaded.scheduler)
    restore_rng(loaded.rng[0])
    _train(m2, o2, s2, 6, 10, data_pos=loaded.data)
    for (n, a), b in zip(m_ref.state_dict().items(), m2.state_dict().values()):
        assert torch.equal(a, b), n
    assert s2.get_last_lr() == s_ref.get_last_lr()


def test_retention_keeps_last_k_and_best(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_last=2)
    for step, metric in zip(range(1, 6), [0.1, 0.5, 0.2, float("nan"), 0.4]):
        mgr.save(step, TrainState(weights={"w": torch.full((3,), float(step))}), metric=metric)
    assert [p.name for p in mgr.list()] == ["step-00000004", "step-00000005"]
    assert mgr.best_info() == {"step": 2, "metric": 0.5} and mgr.latest() == mgr.path_for(5)
    best = mgr.load("best")  # the best survives retention of its step dir, and verifies
    assert best.step == 2 and torch.equal(best.weights["w"], torch.full((3,), 2.0))
    mgr.save(6, TrainState(weights={"w": torch.ones(3)}), metric=0.9, aliases=("stage1",))
    assert mgr.best_info()["step"] == 6 and mgr.load("stage1").step == 6
    mgr.save(7, TrainState(weights={"w": torch.ones(3)}), is_best=True, aliases=["final"])  # forced, no metric
    assert mgr.best_info() == {"step": 7, "metric": None}
    mgr.save(8, TrainState(weights={"w": torch.ones(3)}), metric=0.1)  # previous best had no metric -> new best
    assert mgr.best_info()["step"] == 8
    # aliases share the files (hard links), they are not copies
    assert (mgr.root / "best" / "trainable.safetensors").stat().st_ino == \
        (mgr.path_for(8) / "trainable.safetensors").stat().st_ino
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["best", "final", "stage1", "step-00000007", "step-00000008"]
    assert mgr.load("final").step == 7 and mgr.load_latest_valid().step == 8
    with pytest.raises(CheckpointError, match="invalid checkpoint alias"):
        mgr.save(9, TrainState(), aliases=("step-00000001",))


def test_resave_same_step_replaces(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_last=3)
    mgr.save(3, TrainState(weights={"w": torch.zeros(2)}))
    mgr.save(3, TrainState(weights={"w": torch.ones(2)}))
    assert torch.equal(mgr.load(mgr.path_for(3)).weights["w"], torch.ones(2))
    assert len(mgr.list()) == 1


def test_crash_during_save_leaves_previous_intact(tmp_path, monkeypatch):
    mgr = CheckpointManager(tmp_path, keep_last=2)
    mgr.save(1, TrainState(weights={"w": torch.zeros(2)}, optimizer={"k": torch.ones(1)}))
    calls = {"n": 0}
    real = ck._save_tensors

    def dying(path, tensors):
        calls["n"] += 1
        real(path, tensors)
        if calls["n"] == 2:
            raise OSError("disk full (simulated)")

    monkeypatch.setattr(ck, "_save_tensors", dying)
    with pytest.raises(OSError, match="disk full"):
        mgr.save(2, TrainState(weights={"w": torch.ones(2)}, optimizer={"k": torch.ones(1)}))
    assert not mgr.path_for(2).exists()
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-00000001"]
    assert mgr.load_latest_valid().step == 1


def test_stale_temp_dirs_are_cleaned(tmp_path):
    stale = tmp_path / "checkpoints" / ".tmp-step-00000009-123-abcd"
    stale.mkdir(parents=True)
    (stale / "trainable.safetensors").write_bytes(b"partial")
    mgr = CheckpointManager(tmp_path)
    assert not stale.exists() and mgr.latest() is None and mgr.load_latest_valid() is None


def test_fallback_to_previous_when_newest_corrupt(tmp_path, caplog):
    mgr = CheckpointManager(tmp_path, keep_last=3)
    for s in (1, 2):
        mgr.save(s, TrainState(weights={"w": torch.full((4,), float(s))}))
    f = mgr.path_for(2) / "trainable.safetensors"
    f.write_bytes(f.read_bytes()[:-3])
    logger = logging.getLogger("speeder_fast.checkpoint")
    logger.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.WARNING, logger="speeder_fast.checkpoint"):
            st = mgr.load_latest_valid(quarantine=True)
    finally:
        logger.removeHandler(caplog.handler)
    assert st.step == 1 and torch.equal(st.weights["w"], torch.ones(4))
    assert "step-00000002" in caplog.text and "trainable.safetensors" in caplog.text
    assert [p.name for p in mgr.list()] == ["step-00000001"]  # quarantined
    assert (tmp_path / "checkpoints" / "corrupt-step-00000002").is_dir()
    # All corrupt -> a clear error listing them.
    (mgr.path_for(1) / "MANIFEST.json").unlink()
    with pytest.raises(CheckpointError, match=r"(?s)no valid checkpoint.*step-00000001/MANIFEST\.json: manifest missing"):
        mgr.load_latest_valid()


def test_tied_weights_are_stored(tmp_path):
    """Weights that share storage (tied embeddings) are stored cloned, not refused by safetensors."""
    m = torch.nn.Sequential(torch.nn.Embedding(5, 4), torch.nn.Linear(4, 5, bias=False))
    m[1].weight = m[0].weight  # tied: shares storage
    both = {"0.weight": m[0].weight, "1.weight": m[1].weight}
    mgr = CheckpointManager(tmp_path)
    mgr.save(1, TrainState(weights=both))
    back = mgr.load(mgr.path_for(1)).weights
    assert torch.equal(back["0.weight"], back["1.weight"]) and torch.equal(back["0.weight"], m[0].weight.detach())


def test_finished_marker(tmp_path):
    assert not is_finished(tmp_path) and finished_summary(tmp_path) is None
    mark_finished(tmp_path, {"hr@1": 0.25})
    assert is_finished(tmp_path) and finished_summary(tmp_path) == {"hr@1": 0.25}


def test_manifest_and_files_layout(tmp_path):
    mgr = CheckpointManager(tmp_path)
    opt_state = torch.optim.AdamW(torch.nn.Linear(2, 2).parameters()).state_dict()
    p = mgr.save(4, TrainState(weights={"w": torch.ones(1)}, optimizer=opt_state, scheduler={"last_epoch": 3},
                               rng=[capture_rng(), capture_rng()], data={"epoch": 1}, config_text="x = 1\n"))
    names = sorted(str(f.relative_to(p)) for f in p.rglob("*") if f.is_file())
    assert names == ["MANIFEST.json", "config.toml", "optimizer.json", "optimizer.safetensors", "rng/rank0.json",
                     "rng/rank1.json", "scheduler.json", "trainable.safetensors", "trainer_state.json"]
    man = json.loads((p / "MANIFEST.json").read_text())
    assert set(man["files"]) == set(names) - {"MANIFEST.json"}
    trainer = json.loads((p / "trainer_state.json").read_text())
    assert trainer["world_size"] == 2 and trainer["data"] == {"epoch": 1} and trainer["step"] == 4
    st = mgr.load(p)
    assert len(st.rng) == 2 and st.scheduler == {"last_epoch": 3}


def test_keep_last_must_be_positive(tmp_path):
    with pytest.raises(CheckpointError, match="keep_checkpoints"):
        CheckpointManager(tmp_path, keep_last=0)
