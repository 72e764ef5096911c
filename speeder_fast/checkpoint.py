"""Crash-safe training checkpoints that resume a run exactly.

A checkpoint is a directory ``<run_dir>/checkpoints/step-<8 digits>/``::

    MANIFEST.json            format version + sha256 and size of every other file (written last)
    trainer_state.json       step, MPO stage, data-loader position, metric, world size, extra
    trainable.safetensors    trainable weights (name -> tensor; same name as training/run.py uses)
    optimizer.safetensors    optimizer state tensors (exp_avg, exp_avg_sq, step, ...)
    optimizer.json           the rest of the optimizer state_dict (param_groups: lr, betas, ...)
    scheduler.safetensors    LR-scheduler tensors (only if it has any)
    scheduler.json           the rest of the scheduler state_dict (only if a scheduler was given)
    rng/rank<r>.json         RNG states of rank r (torch CPU, current CUDA device, numpy, python)
    config.toml              the resolved config text of the run

No pickle anywhere: tensors go to safetensors, everything else to JSON (tuples, non-string dict
keys, NaN/Inf survive the round trip). The directory is first written as a hidden temp directory
next to the target, every file and the directory are fsync'ed, then it is renamed into place
(``os.replace``), and the parent directory is fsync'ed. A crash leaves either the complete new
checkpoint or none at all (plus a ``.tmp-*`` directory that the next :class:`CheckpointManager`
removes).

Named aliases (``checkpoints/best``, ``checkpoints/stage1``, ``checkpoints/final``) are complete
checkpoints too, made from a step checkpoint by hard-linking its files into a temp directory that is
renamed into place (a copy where hard links are impossible); files are never modified in place, so
sharing them is safe. Retention only ever deletes ``step-*`` directories, so ``best`` survives.
``<run_dir>/FINISHED.json`` marks a completed run.

Distributed runs: every rank calls ``distributed.gather_objects([capture_rng()])`` (a collective),
only rank 0 calls :meth:`CheckpointManager.save`, then all ranks ``barrier()``. On resume every rank
calls :meth:`CheckpointManager.load_latest_valid` and ``restore_rng(state.rng[rank])``.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import json
import math
import os
import random
import re
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .errors import CheckpointError
from .utils import atomic_write_json, get_logger, sha256_file

__all__ = [
    "CheckpointError", "TrainState", "CheckpointManager", "FORMAT_VERSION",
    "optimizer_state_to_tensors", "load_optimizer_state", "state_to_tensors", "state_from_tensors",
    "capture_rng", "restore_rng",
    "mark_finished", "is_finished", "finished_summary", "save_checkpoint", "load_checkpoint",
    "verify_checkpoint", "refuse_checkpoint_dir",
]

FORMAT_VERSION = 1
MANIFEST = "MANIFEST.json"
FINISHED = "FINISHED.json"
WEIGHTS = "trainable.safetensors"
TRAINER_STATE = "trainer_state.json"
_STEP_RE = re.compile(r"^step-(\d+)$")
log = get_logger("speeder_fast.checkpoint")


# --------------------------------------------------------------------------------------------------
# State container


@dataclass
class TrainState:
    """Everything needed to continue a run exactly (the loop fills it; :meth:`CheckpointManager.load`
    returns it).

    Attributes:
        step: global optimizer step at save time (the manager's ``save(step, ...)`` argument wins).
        stage: MPO stage index (0-based) the run is in.
        weights: trainable weights, name -> tensor (``SpeederRecModel.trainable_state_dict()``).
        optimizer: ``optimizer.state_dict()`` (AdamW: step/exp_avg/exp_avg_sq + param_groups), or None.
        scheduler: ``lr_scheduler.state_dict()``, or None.
        data: data-loader position; by convention ``{"epoch": int, "step_in_epoch": int,
            "global_step": int}`` plus anything the loop needs (JSON-serialisable).
        rng: per-rank RNG states, index = rank (``gather_objects([capture_rng()])``; ``[capture_rng()]``
            in a single process).
        config_text: the resolved config (``config.to_toml(cfg)``).
        metric: validation metric of this checkpoint (higher = better), or None.
        extra: any JSON-serialisable extras (e.g. best metric so far, per-stage history).
        path: set by ``load``: the directory it came from.
    """

    step: int = 0
    stage: int = 0
    weights: dict[str, torch.Tensor] = field(default_factory=dict)
    optimizer: dict | None = None
    scheduler: dict | None = None
    data: dict = field(default_factory=dict)
    rng: list[dict] = field(default_factory=list)
    config_text: str = ""
    metric: float | None = None
    extra: dict = field(default_factory=dict)
    path: Path | None = None


# --------------------------------------------------------------------------------------------------
# Pickle-free (de)serialisation of nested state dicts: tensors -> flat dict, the rest -> JSON skeleton


def _is_reserved(key: Any) -> bool:
    return isinstance(key, str) and key.startswith("__") and key.endswith("__")


def _tensor_for_file(obj: torch.Tensor, seen: set[int]) -> torch.Tensor:
    """Detached, contiguous CPU tensor; a clone when its storage was already used (safetensors refuses
    tensors that share memory, e.g. tied weights)."""
    t = obj.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    if t.numel():
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen:
            t = t.clone()
            ptr = t.untyped_storage().data_ptr()
        seen.add(ptr)
    return t


def _encode(obj: Any, tensors: dict[str, torch.Tensor], path: str, seen: set[int]) -> Any:
    if isinstance(obj, (torch.Tensor, np.ndarray)):
        name, i = path or "<root>", 1
        while name in tensors:  # keys like "a.b" and {"a": {"b": ...}} flatten to the same name
            name, i = f"{path}#{i}", i + 1
        if isinstance(obj, np.ndarray):
            tensors[name] = torch.from_numpy(np.ascontiguousarray(obj)).clone()
            return {"__ndarray__": name}
        tensors[name] = _tensor_for_file(obj, seen)
        return {"__tensor__": name}
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, tensors, f"{path}.{i}", seen) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, tensors, f"{path}.{i}", seen) for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not _is_reserved(k) for k in obj):
            return {k: _encode(v, tensors, f"{path}.{k}" if path else k, seen) for k, v in obj.items()}
        items = []
        for k, v in obj.items():
            if not (k is None or isinstance(k, (bool, int, float, str, tuple))):
                raise CheckpointError(f"cannot store {path or '<root>'}: dict key {k!r} of type "
                                      f"{type(k).__name__} (use str/int/float/bool/tuple keys)")
            items.append([_encode(k, {}, f"{path}.<key>", set()), _encode(v, tensors, f"{path}.{k}" if path else str(k), seen)])
        return {"__dict__": items}
    raise CheckpointError(f"cannot store {path or '<root>'}: unsupported type {type(obj).__name__} "
                          "(checkpoints hold tensors, numbers, strings, lists, tuples and dicts only; no pickle)")


def _decode(obj: Any, tensors: dict[str, torch.Tensor], where: str) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors, where) for v in obj]
    if isinstance(obj, dict):
        if len(obj) == 1:
            (k, v), = obj.items()
            if k in ("__tensor__", "__ndarray__"):
                if v not in tensors:
                    raise CheckpointError(f"{where}: tensor {v!r} referenced by the JSON part is missing")
                return tensors[v] if k == "__tensor__" else tensors[v].numpy()
            if k == "__tuple__":
                return tuple(_decode(x, tensors, where) for x in v)
            if k == "__dict__":
                return {_hashable(_decode(a, tensors, where)): _decode(b, tensors, where) for a, b in v}
        return {k: _decode(v, tensors, where) for k, v in obj.items()}
    return obj


def _hashable(k: Any) -> Any:
    return tuple(_hashable(x) for x in k) if isinstance(k, (list, tuple)) else k


def _json_only(obj: Any, what: str) -> Any:
    """JSON skeleton of ``obj`` (tuples and non-string keys preserved); tensors are refused."""
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _encode(obj, tensors, what, set())
    if tensors:
        raise CheckpointError(f"cannot store {next(iter(tensors))}: tensors/arrays are not allowed in "
                              "TrainState.data/extra (put them in weights, or convert to lists)")
    return skeleton


def state_to_tensors(state: Any) -> tuple[dict[str, torch.Tensor], Any]:
    """Split a nested state (dicts/lists/tuples/tensors/scalars) into ``(tensors, json_skeleton)``.

    ``tensors`` is a flat name -> CPU tensor dict for safetensors; ``json_skeleton`` is JSON-serialisable
    and references the tensors by name. Raises :class:`CheckpointError` naming the path of an
    unsupported value. Inverse: :func:`state_from_tensors`.
    """
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _encode(state, tensors, "", set())
    return tensors, skeleton


def state_from_tensors(tensors: dict[str, torch.Tensor], skeleton: Any, where: str = "state") -> Any:
    """Rebuild the nested state from :func:`state_to_tensors` output (``where`` names it in errors)."""
    return _decode(skeleton, tensors, where)


def optimizer_state_to_tensors(opt: torch.optim.Optimizer | dict) -> tuple[dict[str, torch.Tensor], dict]:
    """``(tensors, meta)`` for an optimizer (or its ``state_dict()``): tensors for safetensors, meta for JSON.

    Round-trips AdamW exactly: per-parameter ``step``/``exp_avg``/``exp_avg_sq`` (and ``max_exp_avg_sq``)
    bit for bit, and ``param_groups`` (lr, betas as a tuple, eps, weight_decay, amsgrad, foreach, ...).
    """
    sd = opt.state_dict() if isinstance(opt, torch.optim.Optimizer) else opt
    return state_to_tensors(sd)


def load_optimizer_state(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: Any) -> None:
    """Load what :func:`optimizer_state_to_tensors` produced into ``opt`` (tensors are moved to the
    parameters' devices by ``Optimizer.load_state_dict``). Raises :class:`CheckpointError` when the
    saved state does not fit the optimizer (different number of parameter groups/parameters)."""
    sd = state_from_tensors(tensors, meta, "optimizer")
    try:
        opt.load_state_dict(sd)
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"optimizer state does not match the optimizer: {e}") from e


# --------------------------------------------------------------------------------------------------
# RNG


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode("ascii")


def _unb64(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8).clone()


def capture_rng(generators: dict[str, torch.Generator | np.random.Generator] | None = None) -> dict:
    """JSON-serialisable RNG states of this process: python ``random``, numpy's global RandomState,
    torch CPU, the *current* CUDA device (only if CUDA is initialised), plus named extra generators
    (``torch.Generator`` or ``numpy.random.Generator``, e.g. a data-loader generator)."""
    np_state = np.random.get_state()
    py = random.getstate()
    out: dict[str, Any] = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": {"name": np_state[0], "keys": np_state[1].tolist(), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "torch_cpu": _b64(torch.get_rng_state()),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        dev = torch.cuda.current_device()
        out["torch_cuda"] = {"device": dev, "state": _b64(torch.cuda.get_rng_state(dev))}
    gens = {}
    for name, g in (generators or {}).items():
        if isinstance(g, torch.Generator):
            gens[name] = {"kind": "torch", "state": _b64(g.get_state())}
        elif isinstance(g, np.random.Generator):
            gens[name] = {"kind": "numpy", "state": g.bit_generator.state}
        else:
            raise CheckpointError(f"capture_rng: generator {name!r} has unsupported type {type(g).__name__}")
    if gens:
        out["generators"] = gens
    return out


def restore_rng(state: dict, generators: dict[str, torch.Generator | np.random.Generator] | None = None) -> None:
    """Restore what :func:`capture_rng` returned (CUDA only if available; named generators in place)."""
    try:
        py = state["python"]
        random.setstate((py[0], tuple(py[1]), py[2]))
        n = state["numpy"]
        np.random.set_state((n["name"], np.asarray(n["keys"], dtype=np.uint32), n["pos"], n["has_gauss"],
                             n["cached_gaussian"]))
        torch.set_rng_state(_unb64(state["torch_cpu"]))
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"RNG state is malformed: {e}") from e
    cuda = state.get("torch_cuda")
    if cuda is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(_unb64(cuda["state"]), torch.cuda.current_device())
    saved = state.get("generators", {})
    for name, g in (generators or {}).items():
        if name not in saved:
            raise CheckpointError(f"RNG state has no generator {name!r} (saved: {sorted(saved)})")
        s = saved[name]
        if isinstance(g, torch.Generator):
            g.set_state(_unb64(s["state"]))
        else:
            g.bit_generator.state = s["state"]


# --------------------------------------------------------------------------------------------------
# Low-level directory writing / reading


def _fsync_path(path: Path, directory: bool = False) -> None:
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0)
    try:
        fd = os.open(path, flags)
    except OSError:  # pragma: no cover - e.g. directories on platforms without O_DIRECTORY
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - some filesystems refuse fsync on directories
        pass
    finally:
        os.close(fd)


def _write_bytes(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _dumps(obj: Any, what: str) -> bytes:
    try:
        return (json.dumps(obj, indent=1, sort_keys=True, allow_nan=True) + "\n").encode()
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"cannot store {what}: {e} (values must be JSON-serialisable)") from e


def _save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata={"format": "pt"})
    _fsync_path(path)


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except Exception as e:  # safetensors raises SafetensorError / OSError / ValueError
        raise CheckpointError(f"{path}: cannot read safetensors file ({type(e).__name__}: {e})") from e


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as e:
        raise CheckpointError(f"{path}: file missing") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: invalid JSON ({e})") from e


def _remove_dir(path: Path) -> None:
    """Delete a directory so that a half-deleted one never looks like a checkpoint (rename first)."""
    if not path.exists():
        return
    trash = path.parent / f".trash-{path.name}-{uuid.uuid4().hex[:8]}"
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def save_checkpoint(target: str | Path, state: TrainState, step: int | None = None,
                    world_size: int | None = None, export: Callable[[Path], Any] | None = None) -> Path:
    """Write ``state`` to directory ``target`` atomically (temp dir + fsync + rename).

    Everything is serialised in memory first, so an unsupported value raises :class:`CheckpointError`
    before anything touches the disk. An existing ``target`` is replaced only after the new one is
    complete. ``export(tmp_dir)`` may write more files into the checkpoint before it is sealed (the
    training loop writes the peft adapter folder, ``adapter/``): they are fsync'ed, listed in the
    manifest (verified like every other file) and renamed into place with the rest. Returns ``target``.
    """
    target = Path(target)
    step = int(state.step if step is None else step)
    opt_t, opt_meta = state_to_tensors(state.optimizer) if state.optimizer is not None else ({}, None)
    sch_t, sch_meta = state_to_tensors(state.scheduler) if state.scheduler is not None else ({}, None)
    weights: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for n, t in state.weights.items():
        if not isinstance(t, torch.Tensor):
            raise CheckpointError(f"cannot store weights[{n!r}]: expected a tensor, got {type(t).__name__}")
        weights[str(n)] = _tensor_for_file(t, seen)
    metric = None if state.metric is None else float(state.metric)
    rng = list(state.rng)
    trainer = {
        "format": FORMAT_VERSION, "step": step, "stage": int(state.stage), "data": _json_only(state.data, "data"),
        "metric": metric, "world_size": int(world_size if world_size is not None else max(1, len(rng))),
        "n_rng": len(rng), "extra": _json_only(state.extra, "extra"), "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "torch_version": torch.__version__,
    }
    blobs: dict[str, bytes] = {TRAINER_STATE: _dumps(trainer, "trainer_state (data/extra/metric)")}
    if opt_meta is not None:
        blobs["optimizer.json"] = _dumps(opt_meta, "optimizer state")
    if sch_meta is not None:
        blobs["scheduler.json"] = _dumps(sch_meta, "scheduler state")
    for r, st in enumerate(rng):
        blobs[f"rng/rank{r}.json"] = _dumps(st, f"rng[{r}]")
    blobs["config.toml"] = state.config_text.encode()
    tensor_files = {WEIGHTS: weights}
    if opt_meta is not None:
        tensor_files["optimizer.safetensors"] = opt_t
    if sch_t:
        tensor_files["scheduler.safetensors"] = sch_t

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".tmp-{target.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        (tmp / "rng").mkdir()
        for name, tensors in tensor_files.items():
            _save_tensors(tmp / name, tensors)
        for name, data in blobs.items():
            _write_bytes(tmp / name, data)
        files = sorted(list(tensor_files) + list(blobs))
        if export is not None:
            export(tmp)
            extra = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file())
            extra = [f for f in extra if f not in files]
            for f in extra:
                _fsync_path(tmp / f)
            for d in sorted({(tmp / f).parent for f in extra}, reverse=True):
                _fsync_path(d, directory=True)
            files += extra
        manifest = {"format": FORMAT_VERSION, "step": step,
                    "files": {f: {"sha256": sha256_file(tmp / f), "bytes": (tmp / f).stat().st_size} for f in files}}
        _write_bytes(tmp / MANIFEST, _dumps(manifest, "manifest"))
        _fsync_path(tmp / "rng", directory=True)
        _fsync_path(tmp, directory=True)
        if target.exists():
            _remove_dir(target)
        os.replace(tmp, target)
        _fsync_path(target.parent, directory=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def verify_checkpoint(path: str | Path) -> dict:
    """Check ``MANIFEST.json`` of checkpoint ``path``: every listed file exists with the recorded size
    and sha256. Returns the manifest; raises :class:`CheckpointError` naming the bad file."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: checkpoint directory does not exist")
    mpath = path / MANIFEST
    if not mpath.exists():
        raise CheckpointError(f"{mpath}: manifest missing (incomplete or not a checkpoint)")
    manifest = _read_json(mpath)
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise CheckpointError(f"{mpath}: malformed manifest (no 'files' table)")
    if manifest.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{mpath}: checkpoint format {manifest.get('format')!r} is not supported "
                              f"(this version reads format {FORMAT_VERSION})")
    for name, info in manifest["files"].items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"{f}: listed in the manifest but missing")
        size = f.stat().st_size
        if size != info.get("bytes"):
            raise CheckpointError(f"{f}: size {size} bytes, manifest says {info.get('bytes')} (truncated or overwritten)")
        digest = sha256_file(f)
        if digest != info.get("sha256"):
            raise CheckpointError(f"{f}: sha256 mismatch (file corrupt): {digest[:12]}... != manifest "
                                  f"{str(info.get('sha256'))[:12]}...")
    return manifest


def load_checkpoint(path: str | Path, verify: bool = True) -> TrainState:
    """Read a checkpoint directory into a :class:`TrainState` (tensors on CPU).

    With ``verify`` (default) the manifest is checked first (:func:`verify_checkpoint`). Any missing,
    truncated or corrupt file raises :class:`CheckpointError` naming it.
    """
    path = Path(path)
    manifest = verify_checkpoint(path) if verify else _read_json(path / MANIFEST)
    files = manifest["files"]
    trainer = _read_json(path / TRAINER_STATE)
    if not isinstance(trainer, dict) or "step" not in trainer:
        raise CheckpointError(f"{path / TRAINER_STATE}: malformed (no 'step')")
    weights = _load_tensors(path / WEIGHTS)
    optimizer = scheduler = None
    if "optimizer.json" in files:
        t = _load_tensors(path / "optimizer.safetensors")
        optimizer = state_from_tensors(t, _read_json(path / "optimizer.json"), str(path / "optimizer.json"))
    if "scheduler.json" in files:
        t = _load_tensors(path / "scheduler.safetensors") if "scheduler.safetensors" in files else {}
        scheduler = state_from_tensors(t, _read_json(path / "scheduler.json"), str(path / "scheduler.json"))
    rng = [_read_json(path / f"rng/rank{r}.json") for r in range(int(trainer.get("n_rng", 0)))]
    cfg_text = (path / "config.toml").read_text() if (path / "config.toml").exists() else ""
    metric = trainer.get("metric")
    return TrainState(step=int(trainer["step"]), stage=int(trainer.get("stage", 0)), weights=weights,
                      optimizer=optimizer, scheduler=scheduler, data=_decode(trainer.get("data") or {}, {}, str(path / TRAINER_STATE)), rng=rng,
                      config_text=cfg_text, metric=None if metric is None else float(metric),
                      extra=_decode(trainer.get("extra") or {}, {}, str(path / TRAINER_STATE)), path=path)


# --------------------------------------------------------------------------------------------------
# Manager: naming, retention, aliases (best/stage/final), fallback


def _alias_dir(src: Path, target: Path) -> Path:
    """Make ``target`` a complete copy of checkpoint ``src`` atomically (hard links, else copies)."""
    tmp = target.parent / f".tmp-{target.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        for f in sorted(src.rglob("*")):
            dst = tmp / f.relative_to(src)
            if f.is_dir():
                dst.mkdir(parents=True, exist_ok=True)
                continue
            dst.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(f, dst)
            except OSError:
                shutil.copy2(f, dst)
                _fsync_path(dst)
        for d in [p for p in tmp.rglob("*") if p.is_dir()] + [tmp]:
            _fsync_path(d, directory=True)
        if target.exists():
            _remove_dir(target)
        os.replace(tmp, target)
        _fsync_path(target.parent, directory=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


class CheckpointManager:
    """Checkpoints of one run under ``<run_dir>/checkpoints``: ``step-*`` with retention, plus aliases.

    Args:
        run_dir: the run directory.
        keep_last: keep the newest ``keep_last`` step checkpoints (>= 1; ``train.keep_checkpoints``).
            Aliases (``best``, ``stage1``, ``final``, ...) are separate directories, never pruned.
        clean_stale: remove ``.tmp-*`` / ``.trash-*`` leftovers of a crashed save (rank 0 only).
        export: ``export(checkpoint_tmp_dir)`` writes extra files into every checkpoint that becomes
            ``best`` or gets the ``final`` alias, before it is sealed (:func:`save_checkpoint`); the
            training loop writes the peft adapter folder ``adapter/`` with it.

    Only one process may write (rank 0); any number may read.
    """

    BEST = "best"

    #: aliases whose checkpoints get the ``export`` files (with ``best``)
    EXPORT_ALIASES = ("final",)

    def __init__(self, run_dir: str | Path, keep_last: int = 2, clean_stale: bool = True,
                 export: Callable[[Path], Any] | None = None) -> None:
        if keep_last < 1:
            raise CheckpointError(f"keep_last must be >= 1 (train.keep_checkpoints), got {keep_last}")
        self.export = export
        self.run_dir = Path(run_dir)
        self.root = self.run_dir / "checkpoints"
        self.keep_last = int(keep_last)
        if clean_stale and self.root.is_dir():
            for p in self.root.iterdir():
                if p.is_dir() and (p.name.startswith(".tmp-") or p.name.startswith(".trash-")):
                    log.warning("removing leftover of an interrupted checkpoint write: %s", p)
                    shutil.rmtree(p, ignore_errors=True)

    # -- naming / listing
    def path_for(self, step: int) -> Path:
        """``checkpoints/step-<8 digits>`` for ``step``."""
        return self.root / f"step-{int(step):08d}"

    def list(self) -> list[Path]:
        """Complete step checkpoints (by name; not verified), oldest first."""
        if not self.root.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.root.iterdir() if p.is_dir() and (m := _STEP_RE.match(p.name))]
        return [p for _, p in sorted(found)]

    def latest(self) -> Path | None:
        """The newest step checkpoint directory (not verified; see :meth:`load_latest_valid`)."""
        items = self.list()
        return items[-1] if items else None

    def best(self) -> Path | None:
        """``checkpoints/best`` if it exists (the checkpoint with the highest metric so far)."""
        p = self.root / self.BEST
        return p if (p / MANIFEST).is_file() else None

    def best_info(self) -> dict | None:
        """``{"step", "metric"}`` of ``checkpoints/best`` (from its trainer_state.json), or None."""
        p = self.best()
        if p is None:
            return None
        try:
            t = json.loads((p / TRAINER_STATE).read_text())
        except (OSError, json.JSONDecodeError) as e:
            log.warning("ignoring unreadable %s: %s", p / TRAINER_STATE, e)
            return None
        return {"step": t.get("step"), "metric": t.get("metric")}

    # -- writing
    def save(self, step: int, state: TrainState, metric: float | None = None, is_best: bool | None = None,
             aliases: tuple[str, ...] | list[str] = (), world_size: int | None = None) -> Path:
        """Write ``checkpoints/step-<step>`` atomically, refresh aliases, apply retention.

        Args:
            step: global optimizer step (names the directory).
            state: the state; ``metric`` overrides ``state.metric`` when given.
            metric: validation metric, higher = better (None = not evaluated).
            is_best: force (True) / forbid (False) making it ``checkpoints/best``; None = best iff
                ``metric`` is finite and higher than the current best's (or there is no best yet).
            aliases: extra names to point at this checkpoint, e.g. ``("stage1",)`` or ``("final",)``.
            world_size: recorded in trainer_state.json (default: ``len(state.rng)``).
        Returns the step checkpoint directory.
        """
        for a in aliases:
            if not a or a.startswith(".") or "/" in a or os.sep in a or _STEP_RE.match(a) or a.startswith("corrupt-"):
                raise CheckpointError(f"invalid checkpoint alias {a!r} (a plain name, not step-N/corrupt-*)")
        if metric is not None:
            state = dataclasses.replace(state, metric=float(metric))
        m = state.metric
        if is_best is None:
            info = self.best_info()
            prev = None if info is None else info.get("metric")
            is_best = m is not None and math.isfinite(m) and (prev is None or not math.isfinite(prev) or m > prev)
        exported = self.export is not None and (is_best or any(a in self.EXPORT_ALIASES for a in aliases))
        target = save_checkpoint(self.path_for(step), state, step=step, world_size=world_size,
                                 export=self.export if exported else None)
        names = list(aliases) + ([self.BEST] if is_best else [])
        for a in names:
            _alias_dir(target, self.root / a)
        self._prune()
        log.info("saved checkpoint %s%s", target, f" (also as {', '.join(names)})" if names else "")
        return target

    def _prune(self) -> None:
        items = self.list()
        for p in items[: max(0, len(items) - self.keep_last)]:
            _remove_dir(p)

    # -- reading
    def load(self, path: str | Path, verify: bool = True) -> TrainState:
        """Load one checkpoint (a path, or an alias/step name under ``checkpoints/``); the manifest is
        verified and :class:`CheckpointError` names a missing/truncated/corrupt file."""
        p = Path(path)
        if not p.is_absolute() and not p.exists() and (self.root / p).exists():
            p = self.root / p
        return load_checkpoint(p, verify=verify)

    def load_latest_valid(self, quarantine: bool = False) -> TrainState | None:
        """Load the newest step checkpoint that verifies; fall back to older ones, logging a warning
        that names each corrupt one. Returns None when there is no step checkpoint at all; raises
        :class:`CheckpointError` (listing every problem) when some exist but none is valid.

        With ``quarantine`` (rank 0 only) a corrupt checkpoint is renamed to ``corrupt-step-*`` so it
        neither shadows later saves nor counts towards retention.
        """
        errors = []
        for p in reversed(self.list()):
            try:
                return load_checkpoint(p)
            except CheckpointError as e:
                log.warning("checkpoint %s is corrupt, trying an older one: %s", p, e)
                errors.append(str(e))
                if quarantine:
                    with contextlib.suppress(OSError):
                        os.replace(p, p.parent / f"corrupt-{p.name}")
        if errors:
            raise CheckpointError("no valid checkpoint in " + str(self.root) + ":\n  " + "\n  ".join(errors))
        return None


# --------------------------------------------------------------------------------------------------
# A checkpoint is never a run folder


def refuse_checkpoint_dir(path: str | Path, what: str = "--resume") -> None:
    """Raise :class:`CheckpointError` when ``path`` is a checkpoint or a run's ``checkpoints/`` folder.

    A run writes ``config.toml``, ``metrics.jsonl``, ``checkpoints/`` ... into its folder, so a
    checkpoint given where a run folder is expected (``--resume RUN/checkpoints/final``) would be
    written into; this refuses it instead, naming the run folder to use. A checkpoint is a folder
    holding ``MANIFEST.json`` (or, when that is lost, ``trainer_state.json`` or
    ``trainable.safetensors``), which a run folder never holds.

    Args:
        path: the folder given as a run folder.
        what: how the caller names the argument (``--resume``, ``--run``) in the message.
    """
    p = Path(path)
    if p.name == "checkpoints" and (p.parent / "config.toml").is_file() and not (p / "config.toml").exists():
        raise CheckpointError(f"{what} {p}: this is the checkpoints folder of run {p.parent}; use {what} {p.parent}")
    if any((p / f).is_file() for f in (MANIFEST, TRAINER_STATE, WEIGHTS)):
        if p.parent.name == "checkpoints":
            where = f"its run folder {p.parent.parent}" + (f" with --checkpoint {p.name}" if what == "--run" else "")
        else:
            where = "the run folder that holds it"
        verb = "resume" if what == "--resume" else "use"
        raise CheckpointError(f"{what} {p}: this is a checkpoint, not a run folder (a run would write into it); "
                              f"{verb} {where}")


# --------------------------------------------------------------------------------------------------
# Finished marker


def mark_finished(run_dir: str | Path, summary: dict) -> Path:
    """Write ``<run_dir>/FINISHED.json`` (atomically) with ``summary`` (JSON-serialisable metrics)."""
    p = Path(run_dir) / FINISHED
    atomic_write_json(p, {"finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "summary": summary})
    return p


def is_finished(run_dir: str | Path) -> bool:
    """True when the run completed (``mark_finished`` was called); ``--resume`` can exit 0 then."""
    return (Path(run_dir) / FINISHED).is_file()


def finished_summary(run_dir: str | Path) -> dict | None:
    """The summary passed to :func:`mark_finished`, or None if the run is not finished."""
    p = Path(run_dir) / FINISHED
    if not p.is_file():
        return None
    data = _read_json(p)
    return data.get("summary") if isinstance(data, dict) else None
