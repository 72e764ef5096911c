"""Item features per modality (text, image, collab) and the on-disk feature store.

Typical use::

    from speeder_fast.features import build_item_features
    feats = build_item_features(prepared, cfg.features, llm=model_path, device="cuda")
    text_x, text_mask = feats["text"]          # [n_items, d_text], [n_items] bool

See docs/features.md.
"""

from .build import MODALITIES, build_item_features
from .image import CLIPImageEncoder, build_image_features, image_paths, load_feature_file
from .sasrec import SASRec, SASRecConfig, load_sasrec, sasrec_item_embeddings, save_sasrec, train_sasrec
from .store import FeatureStore, item_table_hash, mmap_safetensors
from .text import LLMEmbeddingTextEncoder, SentenceTextEncoder, encode_item_texts, render_item_texts

__all__ = [
    "MODALITIES",
    "CLIPImageEncoder",
    "FeatureStore",
    "LLMEmbeddingTextEncoder",
    "SASRec",
    "SASRecConfig",
    "SentenceTextEncoder",
    "build_image_features",
    "build_item_features",
    "encode_item_texts",
    "image_paths",
    "item_table_hash",
    "load_feature_file",
    "load_sasrec",
    "mmap_safetensors",
    "render_item_texts",
    "sasrec_item_embeddings",
    "save_sasrec",
    "train_sasrec",
]
