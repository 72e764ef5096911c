"""``build_item_features``: every requested modality, from the feature store or freshly built."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import Any

import torch

from ..config import FeatureConfig
from ..data.dataset import PreparedData
from ..errors import ConfigError
from ..utils import get_logger
from .store import FeatureStore, sequences_hash

log = get_logger("speeder_fast.features")

MODALITIES = ("text", "image", "collab")


def _image_source_fingerprint(source: str, item_ids: list[str]) -> str:
    from .image import image_paths, is_feature_file

    if is_feature_file(source):
        return ""  # the encoder id already hashes the file's bytes
    h = hashlib.blake2b(digest_size=12)
    for idx, p in sorted(image_paths(source, item_ids).items()):
        st = p.stat()
        h.update(f"{idx}:{p}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def text_store_entry(encoder: Any, feature_cfg: FeatureConfig) -> tuple[str, dict]:
    """``(encoder_id, options)``: the feature-store identity of ``encoder``'s text features.

    The encoder id names the encoder and fingerprints its weights and tokenizer (and, for
    ``llm-hidden``, the layer); the options add the template, ``text_max_tokens`` and the pooling.
    Both enter the store key, so another encoder, layer or pooling never reuses an entry.
    """
    return encoder.encoder_id, {"template": feature_cfg.text_template, "max_tokens": feature_cfg.text_max_tokens,
                                "pooling": encoder.pooling}


def build_item_features(prepared: PreparedData, feature_cfg: FeatureConfig, llm: Any = None,
                        device: str | torch.device = "cpu", store_root: str | Path | None = None,
                        sasrec_overrides: dict | None = None, batch_size: int = 256,
                        progress: bool = True) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Build or load the item features of ``feature_cfg.modalities``.

    Args:
        prepared: the prepared dataset (items ``0..n_items-1``).
        feature_cfg: modalities, text template/encoder, image source/encoder, SASRec size/epochs,
            store dtype.
        llm: for ``text_encoder = "llm"``: a model folder path, ``(tokenizer, embedding_weight)``,
            ``(tokenizer, model)`` or an :class:`~speeder_fast.features.text.LLMEmbeddingTextEncoder`;
            for ``"llm-hidden"``: a model folder path, ``(tokenizer, model)`` or an
            :class:`~speeder_fast.features.text.LLMHiddenTextEncoder`; unused for ``"minilm"`` or a
            sentence-encoder folder.
        device: where encoders run (CLIP, sentence encoder, SASRec training).
        store_root: feature store folder (default ``$SPEEDER_CACHE/features``).
        sasrec_overrides: extra :class:`~speeder_fast.features.sasrec.SASRecConfig` fields.

    Returns:
        ``{modality: (features [n_items, d], mask [n_items] bool)}`` (memory-mapped store copies,
        ``features.store_dtype``). An absent modality (image without ``image_source``) is logged
        and left out of the dict.
    """
    unknown = [m for m in feature_cfg.modalities if m not in MODALITIES]
    if unknown:
        raise ConfigError(f"features.modalities: unknown {unknown} (use {list(MODALITIES)})")
    store = FeatureStore(store_root)
    ds = prepared.dataset
    dtype = feature_cfg.store_dtype
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for mod in feature_cfg.modalities:
        if mod == "text":
            from .text import encode_item_texts, make_text_encoder

            enc = make_text_encoder(feature_cfg.text_encoder, llm, device, hidden_layer=feature_cfg.text_hidden_layer)
            enc_id, opts = text_store_entry(enc, feature_cfg)
            out[mod] = store.get_or_build(
                ds, mod, enc_id, opts,
                lambda enc=enc: encode_item_texts(ds, enc, feature_cfg.text_template, feature_cfg.text_max_tokens,
                                                  batch_size, device, progress), dtype)
        elif mod == "image":
            if not feature_cfg.image_source:
                log.info("modality 'image' skipped: features.image_source is empty (no bundled dataset has images)")
                continue
            from .image import build_image_features, image_encoder_id

            src = str(Path(feature_cfg.image_source).resolve())
            enc_id = image_encoder_id(src, feature_cfg.image_encoder)
            opts = {"source": src, "source_fingerprint": _image_source_fingerprint(src, ds.item_ids)}
            out[mod] = store.get_or_build(
                ds, mod, enc_id, opts,
                lambda: build_image_features(src, ds.item_ids, feature_cfg.image_encoder, device,
                                             max(1, batch_size // 4), progress), dtype)
            if not bool(out[mod][1].any()):
                log.warning("image features: no item of %s has an image in %s", ds.name, src)
        elif mod == "collab":
            from .sasrec import SASRecConfig, sasrec_item_embeddings, train_sasrec

            scfg = dataclasses.replace(SASRecConfig(dim=feature_cfg.sasrec_dim, epochs=feature_cfg.sasrec_epochs),
                                       **(sasrec_overrides or {}))
            opts = {k: v for k, v in dataclasses.asdict(scfg).items() if k not in ("threads", "eval_batch_size")}
            opts["sequences"] = sequences_hash(ds)

            def _collab(scfg=scfg):
                model, metrics = train_sasrec(prepared, scfg, device=device, progress=progress)
                log.info("SASRec collab encoder: test full NDCG@10 %.4f HR@10 %.4f; candidates HR@1 %s",
                         metrics["test_full"]["NDCG@10"], metrics["test_full"]["HR@10"],
                         f"{metrics['test_candidates']['HR@1']:.4f}" if "test_candidates" in metrics else "n/a")
                return sasrec_item_embeddings(model, prepared)

            out[mod] = store.get_or_build(ds, mod, "sasrec:v1", opts, _collab, dtype)
    return out
