"""On-disk feature store: one safetensors file per (dataset, modality, encoder) + a manifest.

Layout under the store root (default ``$SPEEDER_CACHE/features``)::

    <dataset>/<modality>/<encoder-name>.safetensors     features [n_items, d] (float16|float32), mask [n_items] bool
    <dataset>/<modality>/<encoder-name>.manifest.json   encoder id, dims, item-table hash, options, created, key

``<encoder-name>`` is the encoder id without its fingerprint (e.g. ``llm-emb:SmolLM2-135M``), so
a changed encoder *replaces* its file instead of piling up new ones.

Staleness: a *key* = hash(format, dataset name, modality, full encoder id (with the weights'
fingerprint), item-table hash (ids + text), options, dtype) is written both in the manifest and
in the safetensors header metadata. On load the expected key must equal both, and the shapes
must match the item count; otherwise the entry is stale (the reason is logged) and it is rebuilt,
never silently used. A crash between writing the tensors and the manifest leaves a key mismatch,
hence a rebuild. Both files are written atomically (temp file + ``os.replace``).

Memory mapping: :func:`mmap_safetensors` parses the safetensors header (8-byte length + JSON) and
maps each tensor's byte range with ``numpy.memmap`` in copy-on-write mode, wrapped by
``torch.from_numpy`` without a copy. Pages are read from disk lazily when touched, several
processes share the page cache, and the file itself can never be modified through the tensor
(writes go to private copies of the pages). Only when the dtype has no numpy equivalent (bf16)
does it fall back to ``safetensors.safe_open`` (a copy).
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ..data.dataset import RecDataset
from ..errors import ConfigError
from ..utils import atomic_save_safetensors, atomic_write_json, cache_root, get_logger, stable_hash

log = get_logger("speeder_fast.features.store")

STORE_FORMAT = "speeder_fast.features/1"
_DTYPES = {"float16": torch.float16, "float32": torch.float32}
_NP = {"F16": np.float16, "F32": np.float32, "F64": np.float64, "BOOL": np.bool_, "U8": np.uint8,
       "I8": np.int8, "I16": np.int16, "I32": np.int32, "I64": np.int64}

BuildFn = Callable[[], "tuple[torch.Tensor, torch.Tensor]"]


def item_table_hash(dataset: RecDataset) -> str:
    """Hash of the item table: raw item ids (in index order) and every item text column."""
    h = hashlib.sha256()
    h.update(json.dumps(dataset.item_ids).encode())
    for col in sorted(dataset.item_text):
        h.update(col.encode() + b"\0" + json.dumps(dataset.item_text[col]).encode())
    return h.hexdigest()[:24]


def sequences_hash(dataset: RecDataset) -> str:
    """Hash of the interaction sequences (for features learned from interactions, e.g. SASRec)."""
    h = hashlib.sha256()
    for s in dataset.sequences:
        h.update(np.asarray(s, dtype=np.int64).tobytes() + b"|")
    return h.hexdigest()[:24]


def mmap_safetensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Memory-map every tensor of a safetensors file (copy-on-write); returns (tensors, metadata)."""
    path = Path(path)
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError(f"{path}: truncated safetensors header")
        (hlen,) = struct.unpack("<Q", raw)
        if hlen > 100_000_000:
            raise ValueError(f"{path}: implausible safetensors header length {hlen}")
        header = json.loads(f.read(hlen))
    size = path.stat().st_size
    meta = header.pop("__metadata__", {}) or {}
    base = 8 + hlen
    out: dict[str, torch.Tensor] = {}
    for name, info in header.items():
        begin, end = info["data_offsets"]
        if base + end > size:
            raise ValueError(f"{path}: tensor {name!r} extends past the end of the file (truncated?)")
        np_dtype = _NP.get(info["dtype"])
        if np_dtype is None:  # e.g. BF16: no numpy dtype -> regular (copying) read
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as sf:
                out[name] = sf.get_tensor(name)
            continue
        shape = tuple(info["shape"])
        if end == begin:
            out[name] = torch.from_numpy(np.zeros(shape, dtype=np_dtype))
            continue
        arr = np.memmap(path, dtype=np_dtype, mode="c", offset=base + begin, shape=shape)
        out[name] = torch.from_numpy(arr)
    return out, meta


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", s).strip("_")[:80] or "x"


def encoder_name(encoder_id: str) -> str:
    """The encoder id without its fingerprint: its first two ``:``-separated parts."""
    return ":".join(encoder_id.split(":")[:2])


class FeatureStore:
    """Per-item feature tensors cached on disk, checked for staleness, memory-mapped on load."""

    def __init__(self, root: str | Path | None = None) -> None:
        self.root = Path(root) if root else cache_root() / "features"

    def paths(self, dataset_name: str, modality: str, encoder_id: str) -> tuple[Path, Path]:
        d = self.root / _slug(dataset_name) / _slug(modality)
        stem = _slug(encoder_name(encoder_id))
        return d / f"{stem}.safetensors", d / f"{stem}.manifest.json"

    @staticmethod
    def key(dataset: RecDataset, modality: str, encoder_id: str, options: dict, dtype: str) -> str:
        return stable_hash({"format": STORE_FORMAT, "dataset": dataset.name, "modality": modality,
                            "encoder_id": encoder_id, "item_table": item_table_hash(dataset),
                            "options": options, "dtype": dtype})

    def stale_reason(self, dataset: RecDataset, modality: str, encoder_id: str, options: dict,
                     dtype: str = "float16") -> str | None:
        """None if a valid entry exists, else why it cannot be used."""
        tpath, mpath = self.paths(dataset.name, modality, encoder_id)
        if not tpath.is_file() or not mpath.is_file():
            return "not built yet"
        try:
            man = json.loads(mpath.read_text())
        except (OSError, json.JSONDecodeError) as e:
            return f"unreadable manifest ({e})"
        if man.get("format") != STORE_FORMAT:
            return f"format {man.get('format')!r} != {STORE_FORMAT!r}"
        if man.get("item_table_hash") != item_table_hash(dataset):
            return "item table changed (ids or text)"
        if man.get("encoder_id") != encoder_id:
            return f"encoder changed ({man.get('encoder_id')!r} -> {encoder_id!r})"
        if man.get("options") != json.loads(json.dumps(options, sort_keys=True, default=str)):
            return f"options changed ({man.get('options')} -> {options})"
        if man.get("dtype") != dtype:
            return f"dtype changed ({man.get('dtype')} -> {dtype})"
        want = self.key(dataset, modality, encoder_id, options, dtype)
        if man.get("key") != want:
            return "manifest key mismatch"
        return None

    def load(self, dataset: RecDataset, modality: str, encoder_id: str, options: dict,
             dtype: str = "float16") -> tuple[torch.Tensor, torch.Tensor] | None:
        """The memory-mapped (features, mask) if a valid entry exists, else None (reason logged)."""
        reason = self.stale_reason(dataset, modality, encoder_id, options, dtype)
        tpath, _ = self.paths(dataset.name, modality, encoder_id)
        if reason is None:
            try:
                tensors, meta = mmap_safetensors(tpath)
            except (OSError, ValueError, KeyError, json.JSONDecodeError) as e:
                reason = f"unreadable tensor file ({e})"
            else:
                want = self.key(dataset, modality, encoder_id, options, dtype)
                feats, mask = tensors.get("features"), tensors.get("mask")
                if meta.get("key") != want:
                    reason = "tensor file and manifest disagree (interrupted write?)"
                elif feats is None or mask is None:
                    reason = "tensor file lacks features/mask"
                elif feats.dim() != 2 or feats.shape[0] != dataset.n_items or tuple(mask.shape) != (dataset.n_items,):
                    reason = f"shape {tuple(feats.shape)}/{tuple(mask.shape)} does not fit {dataset.n_items} items"
                else:
                    return feats, mask.bool()
        if reason != "not built yet":
            log.info("feature store %s/%s/%s is stale: %s -> rebuilding", dataset.name, modality,
                     encoder_name(encoder_id), reason)
        return None

    def save(self, dataset: RecDataset, modality: str, encoder_id: str, options: dict, features: torch.Tensor,
             mask: torch.Tensor, dtype: str = "float16") -> None:
        """Validate and write an entry (tensors first, then manifest; both atomic)."""
        if dtype not in _DTYPES:
            raise ConfigError(f"features.store_dtype must be float16 or float32, got {dtype!r}")
        n = dataset.n_items
        if features.dim() != 2 or features.shape[0] != n:
            raise ValueError(f"{modality} features must be [n_items={n}, d], got {tuple(features.shape)}")
        if tuple(mask.shape) != (n,):
            raise ValueError(f"{modality} mask must be [n_items={n}], got {tuple(mask.shape)}")
        mask = mask.detach().to("cpu", torch.bool)
        feats = features.detach().to("cpu", torch.float32).clone()
        feats[~mask] = 0.0
        stored = feats.to(_DTYPES[dtype])
        if not torch.isfinite(stored).all():
            hint = " (values overflow float16: set features.store_dtype = 'float32')" if torch.isfinite(feats).all() else ""
            raise ValueError(f"{modality} features from {encoder_id} contain non-finite values{hint}")
        key = self.key(dataset, modality, encoder_id, options, dtype)
        tpath, mpath = self.paths(dataset.name, modality, encoder_id)
        atomic_save_safetensors({"features": stored, "mask": mask}, tpath,
                                metadata={"format": STORE_FORMAT, "key": key, "encoder_id": encoder_id})
        atomic_write_json(mpath, {
            "format": STORE_FORMAT, "key": key, "dataset": dataset.name, "modality": modality,
            "encoder_id": encoder_id, "n_items": n, "dim": int(feats.shape[1]), "dtype": dtype,
            "n_present": int(mask.sum()), "item_table_hash": item_table_hash(dataset),
            "options": json.loads(json.dumps(options, sort_keys=True, default=str)),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "file": tpath.name,
        })

    def get_or_build(self, dataset: RecDataset, modality: str, encoder_id: str, options: dict[str, Any],
                     build_fn: BuildFn, dtype: str = "float16") -> tuple[torch.Tensor, torch.Tensor]:
        """Return (features [n_items, d], mask [n_items] bool), building and storing on a miss.

        The result is always the memory-mapped stored copy (same dtype and values on a hit and
        on a miss).
        """
        hit = self.load(dataset, modality, encoder_id, options, dtype)
        if hit is not None:
            log.info("feature store hit: %s/%s/%s", dataset.name, modality, encoder_name(encoder_id))
            return hit
        t0 = time.perf_counter()
        feats, mask = build_fn()
        self.save(dataset, modality, encoder_id, options, feats, mask, dtype)
        log.info("built %s features for %s with %s in %.1f s", modality, dataset.name, encoder_id,
                 time.perf_counter() - t0)
        out = self.load(dataset, modality, encoder_id, options, dtype)
        if out is None:  # pragma: no cover - would mean the write itself is broken
            raise RuntimeError(f"feature store entry for {dataset.name}/{modality} unreadable right after writing")
        return out
