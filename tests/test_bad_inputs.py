"""Malformed inputs -> a clear error naming the field/file, and nothing left half-written.

Covers configs (``config.load_config``/``validate``), checkpoints (``checkpoint``), torchrun
environments (``distributed``), error helpers (``errors``), and the same failures end to end through
the CLI (``python -m speeder_fast.train``): a malformed ``.inter`` with ``--prepare-only``, bad configs,
``--resume`` of corrupt checkpoints, a NaN loss (exit 4, last good checkpoint kept) and an OOM (exit 3).
Issue 14 adds: the one error contract of every CLI (``errors.run_cli``), a too-small catalogue, TOML
with a byte-order mark or a non-UTF-8 byte, ``--resume`` pointed at a checkpoint or a stray folder, and
``metrics.jsonl`` cut back on resume (docs/production.md "Input faults" lists them all).
"""

from __future__ import annotations

import importlib.util
import json
import re
import sys

import pytest
import torch

from speeder_fast import checkpoint as ck
from speeder_fast.checkpoint import CheckpointError, CheckpointManager, TrainState, capture_rng
from speeder_fast.config import Config, ConfigError, load_config, set_override, validate
from speeder_fast.distributed import DistEnv, ShardedSampler
from speeder_fast.errors import (DistributedError, NonFiniteLossError, NonFiniteMonitor, SpeederError, check_finite,
                                 friendly_oom, is_oom)

# ------------------------------------------------------------------------------------------- configs

# (TOML text, regex the error must match: it names the offending key/file)
BAD_TOML = [
    ("[train]\nbatch_sise = 4\n", r"unknown config key 'train\.batch_sise'"),
    ("[model]\nlora_r = \"eight\"\n", r"model\.lora_r: cannot parse 'eight' as int"),
    ("[model]\nlora_r = 2.5\n", r"model\.lora_r: expected an integer"),
    ("[train]\ngrad_clip = true\n", r"train\.grad_clip: expected a number"),
    ("[features]\nmodalities = 3\n", r"features\.modalities: expected a list"),
    ("[features]\nmodalities = [\"text\", \"audio\"]\n", r"features\.modalities: unknown modality 'audio'"),
    ("[features]\nmodalities = [\"text\", \"text\"]\n", r"features\.modalities: duplicate modalities \['text'\]"),
    ("[features]\nmodalities = []\n", r"features\.modalities: empty, but prompt\.paradigm=speeder"),
    ("model = 3\n", r"model: expected a table"),
    ("[[train.stages]]\nmodalities = [\"text\"]\nlr = 0.0\n", r"train\.stages\[0\]\.lr must be > 0"),
    ("[[train.stages]]\nmodalites = [\"text\"]\n", r"unknown config key 'train\.stages\[0\]\.modalites'"),
    ("[[train.stages]]\nmodalities = [\"image\"]\n", r"train\.stages\[0\]\.modalities: none of \['image'\]"),
    ("[[train.stages]]\nmodalities = [\"video\"]\n", r"train\.stages\[0\]\.modalities: unknown modality 'video'"),
    ("[[train.stages]]\nepochs = 0.0\n", r"train\.stages\[0\]: epochs = 0 and max_steps = 0"),
    ("[train]\nkeep_checkpoints = 0\n", r"train\.keep_checkpoints must be >= 1"),
    ("[train]\nwarmup_ratio = 1.5\n", r"train\.warmup_ratio must be in \[0, 1\]"),
    ("[train]\npacking = \"maybe\"\n", r"train\.packing: 'maybe'"),
    ("[model]\nprecision = \"fp8\"\n", r"model\.precision: 'fp8'"),
    ("[model]\nattn_impl = \"flash3\"\n", r"model\.attn_impl: 'flash3'"),
    ("[model]\nlora_dropout = 1.0\n", r"model\.lora_dropout must be in \[0, 1\)"),
    ("[data]\nmax_history = 300\n", r"model\.max_positions \(256\) < data\.max_history \(300\)"),
    ("[features]\nstore_dtype = \"int8\"\n", r"features\.store_dtype: 'int8'"),
    ("[eval]\nbatch_size = 0\n", r"eval\.batch_size must be >= 1"),
    ("[train\nbatch_size = 4\n", r"invalid TOML"),
]


@pytest.mark.parametrize("text,pattern", BAD_TOML, ids=[p for _, p in BAD_TOML])
def test_bad_config_file_names_the_field(tmp_path, text, pattern):
    p = tmp_path / "bad.toml"
    p.write_text(text)
    with pytest.raises(ConfigError, match=pattern):
        load_config(p)


def test_invalid_toml_names_the_file(tmp_path):
    p = tmp_path / "broken.toml"
    p.write_text("[train\n")
    with pytest.raises(ConfigError, match="broken.toml: invalid TOML"):
        load_config(p)
    with pytest.raises(ConfigError, match="config file not found: .*missing.toml"):
        load_config(tmp_path / "missing.toml")


@pytest.mark.parametrize("override,pattern", [
    ("train.batch_size=abc", r"train\.batch_size: cannot parse 'abc'"),
    ("model.gradient_checkpointing=perhaps", r"model\.gradient_checkpointing: expected a boolean"),
    ("nosuch.key=1", r"unknown config key 'nosuch'"),
    ("train.batch_size", r"--set expects key=value"),
])
def test_bad_override_names_the_field(override, pattern):
    with pytest.raises(ConfigError, match=pattern):
        set_override(Config(), override)


def test_several_problems_reported_together():
    cfg = Config()
    cfg.train.warmup_ratio = -1.0
    cfg.model.liger = "sometimes"
    with pytest.raises(ConfigError, match=r"(?s)train\.warmup_ratio.*model\.liger: 'sometimes'"):
        validate(cfg)


def test_nf4_without_bitsandbytes(monkeypatch):
    cfg = Config()
    cfg.model.precision = "nf4"
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # makes it un-importable
    with pytest.raises(ConfigError, match=r"model\.precision: nf4 needs bitsandbytes"):
        validate(cfg)
    monkeypatch.delitem(sys.modules, "bitsandbytes")
    if importlib.util.find_spec("bitsandbytes") is None:  # (no import: bitsandbytes takes seconds to load)
        pytest.skip("bitsandbytes is not installed")
    validate(cfg)  # importable again -> accepted


def test_config_error_has_no_side_effects(tmp_path):
    p = tmp_path / "bad.toml"
    p.write_text("output_dir = \"%s\"\n[train]\nbatch_size = 0\n" % (tmp_path / "runs"))
    with pytest.raises(ConfigError):
        load_config(p)
    assert sorted(x.name for x in tmp_path.iterdir()) == ["bad.toml"]


# --------------------------------------------------------------------------------------- checkpoints


def _two_checkpoints(tmp_path) -> CheckpointManager:
    mgr = CheckpointManager(tmp_path, keep_last=3)
    opt = torch.optim.AdamW(torch.nn.Linear(3, 2).parameters())
    for s in (1, 2):
        mgr.save(s, TrainState(weights={"w": torch.full((64,), float(s))}, optimizer=opt.state_dict(),
                               rng=[capture_rng()], data={"epoch": 0, "step_in_epoch": s}))
    return mgr


def _truncate(path, n=10):
    path.write_bytes(path.read_bytes()[:-n])


def _corrupt(path):
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


CORRUPTIONS = [
    ("truncated safetensors", lambda d: _truncate(d / "trainable.safetensors"),
     r"step-00000002/trainable\.safetensors: size \d+ bytes, manifest says \d+ \(truncated"),
    ("flipped byte", lambda d: _corrupt(d / "optimizer.safetensors"),
     r"step-00000002/optimizer\.safetensors: sha256 mismatch"),
    ("missing manifest", lambda d: (d / "MANIFEST.json").unlink(),
     r"step-00000002/MANIFEST\.json: manifest missing"),
    ("broken manifest", lambda d: (d / "MANIFEST.json").write_text("{not json"),
     r"step-00000002/MANIFEST\.json: invalid JSON"),
    ("missing rng file", lambda d: (d / "rng" / "rank0.json").unlink(),
     r"step-00000002/rng/rank0\.json: listed in the manifest but missing"),
    ("edited json", lambda d: (d / "trainer_state.json").write_text(
        (d / "trainer_state.json").read_text().replace('"step": 2', '"step": 9')),
     r"step-00000002/trainer_state\.json: (sha256 mismatch|size)"),
    ("future format", lambda d: (d / "MANIFEST.json").write_text(json.dumps({"format": 99, "files": {}})),
     r"MANIFEST\.json: checkpoint format 99 is not supported"),
]


@pytest.mark.parametrize("name,damage,pattern", CORRUPTIONS, ids=[c[0] for c in CORRUPTIONS])
def test_corrupt_checkpoint_is_named_and_skipped(tmp_path, name, damage, pattern):
    mgr = _two_checkpoints(tmp_path)
    damage(mgr.path_for(2))
    with pytest.raises(CheckpointError, match=pattern):
        mgr.load(mgr.path_for(2))
    st = mgr.load_latest_valid()  # falls back to the previous valid checkpoint
    assert st.step == 1 and st.data == {"epoch": 0, "step_in_epoch": 1}


def test_unverified_load_of_truncated_file_still_names_it(tmp_path):
    mgr = _two_checkpoints(tmp_path)
    _truncate(mgr.path_for(2) / "trainable.safetensors", 200)
    with pytest.raises(CheckpointError, match=r"trainable\.safetensors: cannot read safetensors"):
        mgr.load(mgr.path_for(2), verify=False)


def test_missing_checkpoint_dir(tmp_path):
    with pytest.raises(CheckpointError, match=r"nope: checkpoint directory does not exist"):
        CheckpointManager(tmp_path).load(tmp_path / "nope")


@pytest.mark.parametrize("bad_state,pattern", [
    (TrainState(weights={"w": [1.0, 2.0]}), r"weights\['w'\]: expected a tensor"),
    (TrainState(extra={"obj": object()}), r"cannot store extra\.obj: unsupported type object"),
    (TrainState(extra={"t": torch.ones(2)}), r"cannot store extra\.t: tensors/arrays are not allowed"),
    (TrainState(optimizer={"state": {0: {"fn": print}}}), r"cannot store state\.0\.fn: unsupported type"),
    (TrainState(data={"epoch": {1, 2}}), r"cannot store data\.epoch: unsupported type set"),
])
def test_unstorable_state_writes_nothing(tmp_path, bad_state, pattern):
    mgr = _two_checkpoints(tmp_path)
    before = sorted(p.name for p in mgr.root.iterdir())
    with pytest.raises(CheckpointError, match=pattern):
        mgr.save(3, bad_state)
    assert sorted(p.name for p in mgr.root.iterdir()) == before  # no step-3, no temp dir
    assert mgr.load_latest_valid().step == 2


def test_interrupted_write_leaves_only_previous(tmp_path, monkeypatch):
    mgr = _two_checkpoints(tmp_path)

    def crash(path, data):
        raise KeyboardInterrupt  # e.g. Ctrl-C / SIGTERM mid-write

    monkeypatch.setattr(ck, "_write_bytes", crash)
    with pytest.raises(KeyboardInterrupt):
        mgr.save(3, TrainState(weights={"w": torch.zeros(2)}))
    assert [p.name for p in mgr.list()] == ["step-00000001", "step-00000002"]
    assert not [p for p in mgr.root.iterdir() if p.name.startswith(".")]


def test_bad_optimizer_json_is_named(tmp_path):
    mgr = _two_checkpoints(tmp_path)
    d = mgr.path_for(2)
    meta = json.loads((d / "optimizer.json").read_text())
    meta["state"] = {"__dict__": [[0, {"exp_avg": {"__tensor__": "no.such.tensor"}}]]}
    (d / "optimizer.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"optimizer\.json: tensor 'no\.such\.tensor' .* missing"):
        mgr.load(d, verify=False)


def test_restore_rng_malformed():
    with pytest.raises(CheckpointError, match="RNG state is malformed"):
        ck.restore_rng({"python": [3, [1, 2], None]})


# ---------------------------------------------------------------------------------- distributed env

BAD_ENVS = [
    ({"WORLD_SIZE": "two"}, r"WORLD_SIZE='two' is not an integer"),
    ({"WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "h", "MASTER_PORT": "1"}, r"RANK is not set"),
    ({"WORLD_SIZE": "2", "RANK": "2", "LOCAL_RANK": "0"}, r"RANK=2 is outside \[0, WORLD_SIZE=2\)"),
    ({"WORLD_SIZE": "2", "RANK": "1"}, r"LOCAL_RANK is not set"),
    ({"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "0"}, r"MASTER_ADDR and MASTER_PORT must be set"),
    ({"WORLD_SIZE": "0"}, r"WORLD_SIZE=0 must be >= 1"),
    ({"WORLD_SIZE": "4", "RANK": "1", "LOCAL_RANK": "3", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "h",
      "MASTER_PORT": "1"}, r"LOCAL_RANK=3 is outside"),
    ({"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "h", "MASTER_PORT": "http"},
     r"MASTER_PORT='http' is not an integer"),
]


@pytest.mark.parametrize("env,pattern", BAD_ENVS, ids=[p for _, p in BAD_ENVS])
def test_bad_torchrun_env_names_the_variable(env, pattern):
    with pytest.raises(DistributedError, match=pattern):
        DistEnv.from_env(env)


def test_bad_sampler_args():
    with pytest.raises(DistributedError, match=r"rank 3 is outside \[0, world_size=2\)"):
        ShardedSampler(10, 2, 3)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        ShardedSampler(10, 1, 0, batch_size=0)


# ------------------------------------------------------------------------------------- errors module


def test_nonfinite_loss_named_step():
    check_finite(torch.tensor(1.5), 3)
    check_finite(0.25, 3)
    with pytest.raises(NonFiniteLossError, match="training loss is nan at step 7") as ei:
        check_finite(torch.tensor(float("nan")), 7)
    assert ei.value.step == 7 and isinstance(ei.value, SpeederError)
    with pytest.raises(NonFiniteLossError, match="inf at step 2"):
        check_finite(float("inf"), 2)


def test_nonfinite_monitor_reports_first_bad_step():
    mon = NonFiniteMonitor()
    for step, v in enumerate([1.0, 0.5, float("inf"), float("nan"), 0.1], start=1):
        mon.update(torch.tensor(v), step)
    with pytest.raises(NonFiniteLossError, match="inf at step 3"):
        mon.check()
    mon.reset()
    mon.update(torch.tensor(1.0), 9)
    mon.check()


def test_friendly_oom_message_names_keys_and_values():
    cfg = Config()
    cfg.train.batch_size, cfg.train.grad_accum = 8, 2
    exc = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB") if hasattr(
        torch, "OutOfMemoryError") else RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
    assert is_oom(exc) and not is_oom(ValueError("shape"))
    msg = friendly_oom(exc, cfg)
    assert "Tried to allocate 2.00 GiB" in msg
    assert "train.batch_size=8, train.grad_accum=2, train.max_tokens_per_batch=0" in msg
    assert "--set train.batch_size=4 --set train.grad_accum=4" in msg
    assert "--set model.gradient_checkpointing=true" in msg and "--set model.precision=bf16" in msg
    cfg.model.gradient_checkpointing, cfg.model.precision, cfg.train.batch_size = True, "nf4", 1
    cfg.train.max_tokens_per_batch = 4096
    msg = friendly_oom(RuntimeError("CUDA error: out of memory"), cfg)
    assert "gradient_checkpointing=true  (" not in msg and "precision=nf4  (" not in msg
    assert "--set train.max_tokens_per_batch=2048" in msg and "train.batch_size=" in msg


# ------------------------------------------------------------------- through the CLI / training loop
# (the tiny RecBole dataset and config helpers live in test_resume.py)


def _files_under(p):
    return sorted(str(f.relative_to(p)) for f in p.rglob("*") if f.is_file()) if p.exists() else []


BAD_INTER = [
    (7, "u1\t3\tyesterday", r"tiny\.inter:8: column 'timestamp': 'yesterday' is not a number"),
    (3, "u1\t3", r"tiny\.inter:4"),
]


@pytest.mark.parametrize("line,text,pattern", BAD_INTER, ids=["timestamp", "short-row"])
def test_prepare_only_bad_inter_names_file_and_line(tmp_path, monkeypatch, capsys, line, text, pattern):
    from test_resume import write_atomic_dataset

    from speeder_fast.train import main

    d = write_atomic_dataset(tmp_path / "d")
    rows = (d / "tiny.inter").read_text().splitlines()
    rows[line] = text
    (d / "tiny.inter").write_text("\n".join(rows) + "\n")
    cache = tmp_path / "cache"
    monkeypatch.setenv("SPEEDER_CACHE", str(cache))
    assert main(["--prepare-only", "--data", str(d), "--set", "data.user_kcore=0"]) == 2
    err = capsys.readouterr().err
    assert re.search(pattern, err), err
    assert "Traceback" not in err
    assert _files_under(cache) == []  # nothing half-written


@pytest.mark.parametrize("args,pattern", [
    (["--set", "train.batch_size=0"], r"config error: .*train\.batch_size"),
    (["--set", "train.stages=[{\"modalities\": [\"video\"]}]"], r"config error: .*unknown modality 'video'"),
    (["--set", "model.precision=fp8"], r"config error: .*model\.precision"),
])
def test_bad_config_through_cli_exit_2_one_message(tmp_path, monkeypatch, capsys, args, pattern):
    from speeder_fast.train import main

    monkeypatch.setenv("SPEEDER_CACHE", str(tmp_path / "cache"))
    assert main(["--output-dir", str(tmp_path / "out"), *args]) == 2
    err = capsys.readouterr().err
    assert re.search(pattern, err, re.S) and "Traceback" not in err, err
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()  # before any heavy work


def test_bad_config_file_through_cli_subprocess(tmp_path):
    """The real entry point: exit status 2, one message, no traceback."""
    import subprocess

    p = tmp_path / "bad.toml"
    p.write_text("[train]\nbatch_sise = 4\n")
    r = subprocess.run([sys.executable, "-m", "speeder_fast.train", "--config", str(p)], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2
    assert "unknown config key 'train.batch_sise'" in r.stderr and "Traceback" not in r.stderr


def test_resume_argument_errors(tmp_path, capsys):
    from speeder_fast.train import main

    assert main(["--resume", str(tmp_path / "nope")]) == 2
    assert "no config.toml" in capsys.readouterr().err
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.toml").write_text(to_toml_default())
    assert main(["--resume", str(tmp_path / "run"), "--set", "model.lora_r=4"]) == 2
    assert "model.lora_r cannot change when resuming" in capsys.readouterr().err


def to_toml_default() -> str:
    from speeder_fast.config import to_toml

    return to_toml(Config())


@pytest.fixture(scope="module")
def tiny_inputs(tmp_path_factory):
    import tiny
    from test_resume import write_atomic_dataset

    root = tmp_path_factory.mktemp("bad_inputs_tiny")
    return tiny.make_llm_dir(root / "llm"), write_atomic_dataset(root / "data")


def test_resume_with_only_corrupt_checkpoints_fails_clearly(tiny_inputs, tmp_path, monkeypatch, capsys):
    from test_resume import tiny_config

    from speeder_fast.config import to_toml
    from speeder_fast.train import main

    llm, data = tiny_inputs
    monkeypatch.setenv("SPEEDER_CACHE", str(tmp_path / "cache"))
    cfg = tiny_config(llm, data, tmp_path / "out", "run")
    run = tmp_path / "out" / "run"
    run.mkdir(parents=True)
    (run / "config.toml").write_text(to_toml(cfg))
    mgr = CheckpointManager(run, keep_last=2)
    mgr.save(2, TrainState(step=2, weights={"w": torch.ones(3)}, rng=[capture_rng()]))
    st = run / "checkpoints" / "step-00000002" / "trainer_state.json"
    st.write_text(st.read_text().replace('"step": 2', '"step": 3'))  # same size, different bytes
    assert main(["--resume", str(run), "--no-progress", "--no-eval"]) == 2
    err = capsys.readouterr().err
    assert "error: no valid checkpoint" in err and "trainer_state.json: sha256 mismatch" in err, err
    assert "Traceback" not in err


def test_nan_loss_stops_naming_step_and_keeps_last_good_checkpoint(tiny_inputs, tmp_path, monkeypatch, capsys):
    """A loss that turns NaN at step 5: exit 4 naming step 5, nothing saved after step 4, whose weights are finite."""
    from test_resume import tiny_config

    from speeder_fast.checkpoint import load_checkpoint
    from speeder_fast.config import to_toml
    from speeder_fast.model.llm import SpeederRecModel
    from speeder_fast.train import main

    llm, data = tiny_inputs
    monkeypatch.setenv("SPEEDER_CACHE", str(tmp_path / "cache"))
    cfg = tiny_config(llm, data, tmp_path / "out", "nan", eval_every=0, keep_checkpoints=5)
    (tmp_path / "c.toml").write_text(to_toml(cfg))
    orig = SpeederRecModel.forward
    calls = {"n": 0}

    def poisoned(self, *a, **k):
        calls["n"] += 1
        out = orig(self, *a, **k)
        return out * float("nan") if calls["n"] >= 5 else out  # grad_accum=1: call 5 = step 5

    monkeypatch.setattr(SpeederRecModel, "forward", poisoned)
    assert main(["--config", str(tmp_path / "c.toml"), "--no-progress", "--no-eval"]) == 4
    err = capsys.readouterr().err
    assert "training loss is nan at step 5" in err and "step-00000004" in err and "--resume" in err, err
    run = tmp_path / "out" / "nan"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000002", "step-00000004"]
    st = load_checkpoint(run / "checkpoints" / "step-00000004")
    assert st.step == 4 and all(torch.isfinite(t).all() for t in st.weights.values())
    assert not (run / "FINISHED.json").exists()


def test_cli_out_of_memory_prints_friendly_message(tmp_path, monkeypatch, capsys):
    """A CUDA OOM inside training -> the friendly_oom advice (current values + --set suggestions), exit 3."""
    import speeder_fast.training as training
    from speeder_fast.train import main

    def boom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(training, "train", boom)
    assert main(["--output-dir", str(tmp_path), "--no-progress"]) == 3
    err = capsys.readouterr().err
    assert "train.batch_size" in err and "--set" in err and "Traceback" not in err, err


# -------------------------------------------- issue 14: one error contract for every CLI, checkpoints never written


def _small_catalogue(folder):
    """10 items; each of 3 users interacted with 8 of them (what most of the catalogue means)."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = ["user_id:token\titem_id:token\ttimestamp:float"]
    for u in range(3):
        lines += [f"u{u}\ti{(u + j) % 10}\t{j}" for j in range(8)]
    (folder / "small.inter").write_text("\n".join(lines) + "\n")
    return folder


def test_prepare_only_small_catalogue_one_error_line_exit_2(tmp_path, monkeypatch, capsys):
    from speeder_fast.train import main

    d = _small_catalogue(tmp_path / "d")
    monkeypatch.setenv("SPEEDER_CACHE", str(tmp_path / "cache"))
    assert main(["--prepare-only", "--data", str(d), "--set", "data.user_kcore=0"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1, err
    assert err.startswith("error: data.n_candidates=20 needs 19 never-interacted items per user")
    assert "3 of 3 users have fewer" in err and "set data.n_candidates <= 3" in err
    assert _files_under(tmp_path / "cache") == []


def test_every_cli_maps_errors_to_the_same_exit_codes(tmp_path, monkeypatch, capsys):
    """train, evaluate, recommend, sasrec, profile, assets: SpeederError -> 2 (one error: line), out of
    memory -> 3, NaN -> 4; anything else is a bug and keeps its traceback (recommend no longer swallows
    every ValueError)."""
    import speeder_fast.evaluate as ev
    import speeder_fast.recommend as rec
    import speeder_fast.training.run as run_mod
    from speeder_fast import profile, sasrec
    from speeder_fast.data import DataFormatError

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.toml").write_text(to_toml_default())
    (tmp_path / "users.txt").write_text("u\n")

    def raising(exc):
        def f(*a, **k):
            raise exc
        return f

    cases = [
        (ev, "evaluate_run", lambda: ev.main(["--run", str(run)])),
        (run_mod, "load_run", lambda: rec.main(["--run", str(run), "--users", str(tmp_path / "users.txt")])),
    ]
    for mod, name, call in cases:
        for exc, code in ((DataFormatError("x.inter:3: column 'item_id' is empty"), 2),
                          (NonFiniteLossError(5, float("nan")), 4),
                          (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1 GiB"), 3)):
            monkeypatch.setattr(mod, name, raising(exc))
            assert call() == code, (name, exc)
            err = capsys.readouterr().err
            assert "Traceback" not in err and err.startswith("error:" if code != 3 else "out of memory:"), err
        monkeypatch.setattr(mod, name, raising(ValueError("a bug, not bad input")))
        with pytest.raises(ValueError, match="a bug"):
            call()
    # the data problem for real, through sasrec and profile (each used to end in a traceback)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "b.inter").write_text("user_id:token item_id:token timestamp\nu i 1\n")
    monkeypatch.setenv("SPEEDER_CACHE", str(tmp_path / "cache"))
    assert sasrec.main(["--data", str(bad), "--out", str(tmp_path / "sas"), "--device", "cpu"]) == 2
    assert "b.inter:1: header: the line is separated by spaces, not tabs" in capsys.readouterr().err
    assert profile.main(["train", "--data", str(bad), "--device", "cpu", "--out", str(tmp_path / "prof")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "b.inter:1" in err and "Traceback" not in err
    assert not (tmp_path / "sas").exists() and not (tmp_path / "prof").exists()


def test_error_hierarchy_keeps_value_error_where_callers_rely_on_it():
    from speeder_fast.data import CatalogueTooSmallError, DataFormatError
    from speeder_fast.errors import DataError, UsageError
    from speeder_fast.recommend import UsersFileError

    for cls in (ConfigError, DataFormatError, CatalogueTooSmallError, UsersFileError, DataError, UsageError):
        assert issubclass(cls, SpeederError) and issubclass(cls, ValueError) and cls.exit_code == 2
    assert NonFiniteLossError.exit_code == 4 and issubclass(CheckpointError, SpeederError)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_requested_without_cuda_is_a_config_error():
    from speeder_fast.utils import resolve_device

    with pytest.raises(ConfigError, match="device=cuda requested but no CUDA device"):
        resolve_device("cuda")


def test_toml_with_bom_loads_and_a_bad_byte_names_the_line(tmp_path):
    p = tmp_path / "excel.toml"
    p.write_bytes(b"\xef\xbb\xbf[train]\r\nbatch_size = 4\r\n")
    assert load_config(p).train.batch_size == 4
    p.write_bytes(b"[prompt]\nsystem = \"caf\xe9\"\n")
    with pytest.raises(ConfigError, match=r"excel\.toml:2: byte 0xe9 is not UTF-8"):
        load_config(p)


def _dead_end_config(root) -> Config:
    """A valid config whose data and model do not exist: a run that got past a check fails at once
    (instead of training the real default model)."""
    cfg = Config()
    cfg.data.source, cfg.model.llm = str(root / "no-such-data"), str(root / "no-such-model")
    cfg.output_dir = str(root / "out")
    return cfg


def _run_with_checkpoint(root):
    """A run folder (config.toml, tokenizer_additions.json, metrics.jsonl) with checkpoints step-2 and final."""
    from speeder_fast.config import to_toml

    run = root / "run"
    run.mkdir(parents=True)
    text = to_toml(_dead_end_config(root))
    (run / "config.toml").write_text(text)
    (run / "tokenizer_additions.json").write_text("{}")
    (run / "metrics.jsonl").write_text("".join(json.dumps({"type": "train", "global_step": s}) + "\n" for s in (1, 2)))
    CheckpointManager(run).save(2, TrainState(step=2, weights={"w": torch.ones(2)}, rng=[capture_rng()],
                                              config_text=text), aliases=("final",))
    return run


def _tree(p):
    return sorted((str(f.relative_to(p)), f.stat().st_mtime_ns) for f in p.rglob("*"))


@pytest.mark.parametrize("which", ["checkpoints/final", "checkpoints/step-00000002", "checkpoints"])
def test_resume_pointed_at_a_checkpoint_is_refused_and_nothing_written(tmp_path, capsys, which):
    from speeder_fast.train import main

    run = _run_with_checkpoint(tmp_path)
    before = _tree(run)
    assert main(["--resume", str(run / which), "--no-progress", "--no-eval"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1, err
    if which == "checkpoints":
        assert f"this is the checkpoints folder of run {run}" in err, err
    else:
        assert "this is a checkpoint, not a run folder" in err and f"resume its run folder {run}" in err, err
    assert _tree(run) == before  # no config.toml, metrics.jsonl or checkpoints/ inside the checkpoint


def test_library_train_refuses_checkpoint_and_stray_folders(tmp_path):
    """train(resume=True) itself: a checkpoint or a folder that is no run folder is refused before anything
    is written (it used to log 'starting from scratch' and train there)."""
    from speeder_fast.config import to_toml
    from speeder_fast.training import train

    cfg = _dead_end_config(tmp_path)
    run = _run_with_checkpoint(tmp_path)
    before = _tree(run)
    for target in (run / "checkpoints" / "final", run / "checkpoints" / "step-00000002"):
        with pytest.raises(CheckpointError, match="this is a checkpoint"):
            train(cfg, run_dir=target, resume=True)
    with pytest.raises(CheckpointError, match="this is a checkpoint"):
        train(cfg, run_dir=run / "checkpoints" / "final", resume=False)
    from speeder_fast.training.run import load_run  # evaluate / recommend --run

    with pytest.raises(CheckpointError, match=f"use its run folder {run} with --checkpoint final"):
        load_run(run / "checkpoints" / "final")
    assert _tree(run) == before
    stray = tmp_path / "stray"
    stray.mkdir()
    (stray / "config.toml").write_text(to_toml(cfg))
    with pytest.raises(CheckpointError, match=r"not a speeder_fast run folder .*train with --config"):
        train(cfg, run_dir=stray, resume=True)
    assert sorted(p.name for p in stray.iterdir()) == ["config.toml"]


def test_cut_metrics_log_keeps_records_up_to_the_checkpoint_step(tmp_path):
    from speeder_fast.training.run import cut_metrics_log

    recs = [{"type": "train", "global_step": s} for s in range(1, 7)] + [{"type": "eval", "global_step": 4}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs) + '{"type": "tr')
    assert cut_metrics_log(tmp_path, 4) == 3  # steps 5, 6 and the half-written last line
    kept = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["global_step"] for r in kept] == [1, 2, 3, 4, 4]
    assert cut_metrics_log(tmp_path, 4) == 0
    assert not [p for p in tmp_path.iterdir() if p.name != "metrics.jsonl"]  # no temp file left
