"""Small shared helpers: cache location, atomic writes, seeding, logging, hashing, devices."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import random
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np


def cache_root() -> Path:
    """``$SPEEDER_CACHE`` or ``~/.cache/speeder_fast`` (created on demand)."""
    root = Path(os.environ.get("SPEEDER_CACHE") or Path.home() / ".cache" / "speeder_fast")
    root.mkdir(parents=True, exist_ok=True)
    return root


def get_logger(name: str = "speeder_fast") -> logging.Logger:
    logger = logging.getLogger(name)
    root = logging.getLogger("speeder_fast")
    if not root.handlers:
        h = logging.StreamHandler()
        h.setFormatter(logging.Formatter("[%(asctime)s %(levelname)s %(name)s] %(message)s", "%H:%M:%S"))
        root.addHandler(h)
        root.setLevel(os.environ.get("SPEEDER_LOGLEVEL", "INFO"))
        root.propagate = False
    return logger


@contextlib.contextmanager
def atomic_path(path: str | Path, suffix: str = "") -> Iterator[Path]:
    """Yield a temp path next to ``path``; on success rename it over ``path``, else delete it.

    Nothing is ever left half-written at ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix or ".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def atomic_save_safetensors(tensors: dict, path: str | Path, metadata: dict | None = None) -> None:
    """Save a dict of torch tensors with safetensors, atomically."""
    from safetensors.torch import save_file

    with atomic_path(path, suffix=".safetensors") as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def stable_hash(obj: Any) -> str:
    """Short hash of a JSON-serialisable object (sorted keys)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    try:
        import torch

        torch.manual_seed(seed)
    except ImportError:  # pragma: no cover
        pass


def resolve_device(name: str = "auto") -> "torch.device":  # noqa: F821
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        from speeder_fast.errors import ConfigError

        raise ConfigError("device=cuda requested but no CUDA device is available (use device=auto or cpu)")
    return torch.device(name)
