"""Image modality: CLIP vision features of item images, or a user-supplied feature file.

Sources (``FeatureConfig.image_source``)
    * a **folder** of image files named by raw item id: ``<item_id>.jpg|.jpeg|.png|.webp``
      (case-insensitive extension; if an item has several, the first in that order is used);
    * a **CSV** ``item_id,path`` (header optional; relative paths are relative to the CSV's folder);
    * a **feature file**: ``.npy`` ``[n, d]`` or ``.safetensors`` (tensor ``features``, or its only
      tensor) with the raw item ids of its rows in a sidecar ``<stem>.ids.txt`` / ``<stem>.txt``
      (one id per line) or ``<stem>.ids.json`` / ``<stem>.json`` (a JSON list), or, for
      safetensors, in the metadata key ``item_ids`` (a JSON list).

Encoder (``FeatureConfig.image_encoder``, a local folder)
    ``transformers.CLIPVisionModelWithProjection`` -> ``image_embeds`` (the projected embedding,
    i.e. the space CLIP aligns with text; its size is ``projection_dim``). If the checkpoint has
    no visual projection weights the pooled output of ``CLIPVisionModel`` is used instead (size
    ``hidden_size``) and the encoder id says so. Preprocessing: the ``CLIPImageProcessor`` saved
    with the model. Batched, on GPU when one is given.

Items without an image get presence mask 0 and a zero row: a missing image is never a zero
vector pretending to be an image. None of the bundled datasets has images.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..errors import ConfigError, DataFormatError
from ..utils import get_logger
from .text import fingerprint_dir

log = get_logger("speeder_fast.features.image")

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp")
FEATURE_EXTS = (".npy", ".safetensors")


def is_feature_file(source: str | Path) -> bool:
    return Path(source).suffix.lower() in FEATURE_EXTS


def image_paths(source: str | Path, item_ids: Sequence[str]) -> dict[int, Path]:
    """Map item index -> image file from a folder or an ``item_id,path`` CSV.

    Unknown item ids are ignored (counted in a log line); a CSV row naming a missing file or a
    duplicate item id is an error naming the line.
    """
    src = Path(source)
    index = {iid: i for i, iid in enumerate(item_ids)}
    found: dict[int, Path] = {}
    unknown = 0
    if src.is_dir():
        by_item: dict[str, list[Path]] = {}
        for f in src.iterdir():
            if f.is_file() and f.suffix.lower() in IMAGE_EXTS:
                by_item.setdefault(f.stem, []).append(f)
        for iid, files in sorted(by_item.items()):
            if iid not in index:
                unknown += 1
                continue
            files.sort(key=lambda f: (IMAGE_EXTS.index(f.suffix.lower()), f.name))
            if len(files) > 1:
                log.warning("item %s has %d images in %s; using %s", iid, len(files), src, files[0].name)
            found[index[iid]] = files[0]
    elif src.is_file() and src.suffix.lower() == ".csv":
        from ..data.readers import iter_text_lines  # UTF-8 (BOM allowed); a bad byte names the line

        for ln, row in enumerate(csv.reader(line for _, line in iter_text_lines(src)), start=1):
            if not row or all(not c.strip() for c in row):
                continue
            if len(row) != 2:
                raise DataFormatError(f"{src}:{ln}: expected 2 fields item_id,path, got {len(row)}")
            iid, path = row[0].strip(), row[1].strip()
            if ln == 1 and (iid.lower(), path.lower()) == ("item_id", "path"):
                continue
            p = Path(path) if Path(path).is_absolute() else src.parent / path
            if iid not in index:
                unknown += 1
                continue
            if index[iid] in found:
                raise DataFormatError(f"{src}:{ln}: item_id {iid!r} listed twice")
            if not p.is_file():
                raise FileNotFoundError(f"{src}:{ln}: image file {p} for item {iid!r} does not exist")
            found[index[iid]] = p
    else:
        raise FileNotFoundError(f"image_source {src}: not a folder of images, an item_id,path .csv, "
                                "or a .npy/.safetensors feature file")
    if unknown:
        log.info("image_source %s: %d entries name items not in the dataset (ignored)", src, unknown)
    return found


class CLIPImageEncoder:
    """Frozen CLIP vision tower from a local folder (model + ``CLIPImageProcessor``)."""

    def __init__(self, path: str | Path, device: str | torch.device = "cpu") -> None:
        from transformers import CLIPImageProcessor, CLIPVisionModel, CLIPVisionModelWithProjection

        self.path = Path(path)
        if not self.path.is_dir():
            raise FileNotFoundError(f"image encoder: {self.path} is not a local CLIP folder")
        self.device = torch.device(device)
        self.processor = CLIPImageProcessor.from_pretrained(str(self.path))
        model, info = CLIPVisionModelWithProjection.from_pretrained(str(self.path), output_loading_info=True)
        if any("visual_projection" in k for k in info.get("missing_keys", [])):
            log.warning("%s has no visual_projection weights: using CLIPVisionModel pooled output", self.path)
            model = CLIPVisionModel.from_pretrained(str(self.path))
            self.output = "pooler_output"
            self.dim = int(model.config.hidden_size)
        else:
            self.output = "image_embeds"
            self.dim = int(model.config.projection_dim)
        self.model = model.to(self.device).eval()
        self._id = f"clip:{self.path.name}:{self.output}:{fingerprint_dir(self.path)}"

    @property
    def encoder_id(self) -> str:
        return self._id

    @torch.no_grad()
    def encode_files(self, files: Sequence[Path], batch_size: int = 64, progress: bool = True) -> torch.Tensor:
        """[len(files), dim] float32 on CPU; an unreadable image is an error naming the file."""
        from PIL import Image
        from tqdm.auto import tqdm

        out = torch.zeros(len(files), self.dim, dtype=torch.float32)
        for s in tqdm(range(0, len(files), batch_size), desc="image (CLIP)", disable=not progress):
            imgs = []
            for f in files[s:s + batch_size]:
                try:
                    with Image.open(f) as im:
                        imgs.append(im.convert("RGB"))
                except Exception as e:  # PIL raises many types
                    raise DataFormatError(f"cannot read image {f}: {e}") from e
            pix = self.processor(images=imgs, return_tensors="pt")["pixel_values"].to(self.device)
            res = self.model(pixel_values=pix)
            out[s:s + len(imgs)] = getattr(res, self.output).float().cpu()
        return out


def _sidecar_ids(path: Path) -> list[str] | None:
    stem = path.with_suffix("")
    for cand in (Path(f"{stem}.ids.txt"), Path(f"{stem}.txt"), Path(f"{stem}.ids.json"), Path(f"{stem}.json")):
        if cand.is_file():
            if cand.suffix == ".json":
                try:
                    ids = json.loads(cand.read_text(encoding="utf-8-sig"))
                except (json.JSONDecodeError, UnicodeDecodeError) as e:
                    raise DataFormatError(f"{cand}: invalid JSON ({e})") from e
                if not isinstance(ids, list):
                    raise DataFormatError(f"{cand}: expected a JSON list of item ids")
                return [str(x) for x in ids]
            from ..data.readers import iter_text_lines

            return [ln.strip() for _, ln in iter_text_lines(cand) if ln.strip()]
    return None


def load_feature_file(path: str | Path, item_ids: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Align a ``.npy`` / ``.safetensors`` feature file to the dataset's items.

    Returns (features [n_items, d] float32, mask [n_items] bool); items absent from the file get
    mask 0 and a zero row. Errors (naming the file): wrong rank, row/id count mismatch, duplicate
    ids, non-finite values, no id list.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"image feature file {p} does not exist")
    ids = None
    if p.suffix.lower() == ".npy":
        arr = np.load(p, allow_pickle=False)
        feats = torch.from_numpy(np.asarray(arr, dtype=np.float32))
    else:
        from safetensors import safe_open

        with safe_open(str(p), framework="pt") as f:
            keys = list(f.keys())
            key = "features" if "features" in keys else (keys[0] if len(keys) == 1 else None)
            if key is None:
                raise DataFormatError(f"{p}: expected a tensor named 'features' (or exactly one tensor), found {keys}")
            feats = f.get_tensor(key).float()
            meta = f.metadata() or {}
        if "item_ids" in meta:
            try:
                ids = [str(x) for x in json.loads(meta["item_ids"])]
            except json.JSONDecodeError as e:
                raise DataFormatError(f"{p}: metadata item_ids is not a JSON list ({e})") from e
    if feats.dim() != 2:
        raise DataFormatError(f"{p}: features must be 2-D [n, d], got shape {tuple(feats.shape)}")
    if ids is None:
        ids = _sidecar_ids(p)
    if ids is None:
        raise FileNotFoundError(f"{p}: no item-id list (expected {p.with_suffix('')}.ids.txt, .txt, .ids.json or "
                                ".json next to it, or safetensors metadata 'item_ids')")
    if len(ids) != feats.shape[0]:
        raise DataFormatError(f"{p}: {feats.shape[0]} feature rows but {len(ids)} item ids")
    if len(set(ids)) != len(ids):
        raise DataFormatError(f"{p}: duplicate item ids in its id list")
    if not torch.isfinite(feats).all():
        bad = int((~torch.isfinite(feats)).any(1).nonzero()[0, 0])
        raise DataFormatError(f"{p}: non-finite value in row {bad} (item {ids[bad]!r})")
    index = {iid: i for i, iid in enumerate(item_ids)}
    src_rows, dst_rows = [], []
    for r, iid in enumerate(ids):
        if iid in index:
            src_rows.append(r)
            dst_rows.append(index[iid])
    if len(src_rows) < len(ids):
        log.info("%s: %d rows name items not in the dataset (ignored)", p, len(ids) - len(src_rows))
    out = torch.zeros(len(item_ids), feats.shape[1], dtype=torch.float32)
    mask = torch.zeros(len(item_ids), dtype=torch.bool)
    if src_rows:
        out[torch.tensor(dst_rows)] = feats[torch.tensor(src_rows)]
        mask[torch.tensor(dst_rows)] = True
    return out, mask


def image_encoder_id(source: str | Path, encoder_path: str | Path = "") -> str:
    """Store id of the image features: the encoder for image files, the file itself for feature files."""
    from ..utils import sha256_file

    if is_feature_file(source):
        return f"file:{Path(source).name}:{sha256_file(source)[:16]}"
    if not encoder_path:
        raise ConfigError("features.image_encoder is empty but features.image_source is a folder/CSV of images: "
                         "give a local CLIP folder, or a .npy/.safetensors feature file as image_source")
    return f"clip:{Path(encoder_path).name}:{fingerprint_dir(encoder_path)}"


def build_image_features(source: str | Path, item_ids: Sequence[str], encoder_path: str | Path = "",
                         device: str | torch.device = "cpu", batch_size: int = 64,
                         progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(features [n_items, d] float32, mask [n_items] bool) from any supported image source."""
    if is_feature_file(source):
        feats, mask = load_feature_file(source, item_ids)
    else:
        if not encoder_path:
            raise ConfigError("features.image_encoder must name a local CLIP folder to encode image files")
        files = image_paths(source, item_ids)
        enc = CLIPImageEncoder(encoder_path, device)
        rows = sorted(files)
        feats = torch.zeros(len(item_ids), enc.dim, dtype=torch.float32)
        mask = torch.zeros(len(item_ids), dtype=torch.bool)
        if rows:
            feats[torch.tensor(rows)] = enc.encode_files([files[r] for r in rows], batch_size, progress)
            mask[torch.tensor(rows)] = True
    log.info("image features from %s: %d/%d items have an image (dim %d)", source, int(mask.sum()),
             len(item_ids), feats.shape[1])
    return feats, mask
