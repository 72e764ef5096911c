"""Text modality: item text from a template, encoded by a frozen encoder.

Rendering (:func:`render_item_texts`)
    ``FeatureConfig.text_template`` is a ``str.format`` template over the item's text columns
    (``title``, ``description``, ``brand``, ``categories`` and any extra column of
    ``RecDataset.item_text``). A field that is missing or empty renders as ``""`` *and* drops the
    separator that follows it when that separator is only punctuation/whitespace (so
    ``"{title}. {brand}. {description}"`` with no brand gives ``"Lamp. A lamp."``, not
    ``"Lamp. . A lamp."``). Whitespace is collapsed. An item whose fields are all empty has
    empty text and presence mask 0 (its feature row is zeros and must not be used).

Encoders (frozen, deterministic, batched with a progress bar)
    * :class:`LLMEmbeddingTextEncoder` (``text_encoder = "llm"``, default): the mean of the LLM's
      input-embedding rows of the item's tokens (no special tokens, at most ``text_max_tokens``
      tokens). No extra model: it needs only the tokenizer and the embedding matrix, given as
      objects or read from the model folder (the embedding tensor alone is read from the
      safetensors shards when it can be found; otherwise the model is loaded).
    * :class:`SentenceTextEncoder` (``text_encoder = <local path>``): ``transformers.AutoModel``
      + attention-mask mean pooling of the last hidden state.
"""

from __future__ import annotations

import hashlib
import json
import re
import string
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..config import FeatureConfig
from ..data.dataset import RecDataset
from ..errors import ConfigError
from ..utils import get_logger

log = get_logger("speeder_fast.features.text")

_SEP_ONLY = re.compile(r"^[\s.,;:|/\-–—]*$")
_WS = re.compile(r"\s+")
_EMBED_KEYS = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "tok_embeddings.weight",
               "embed_in.weight")


def template_fields(template: str) -> list[str]:
    """Field names used by a ``str.format`` template (raises ValueError on a malformed one)."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as e:
        raise ConfigError(f"features.text_template: malformed template {template!r}: {e}") from e
    out = []
    for _, name, spec, conv in parsed:
        if name is None:
            continue
        if not name.isidentifier():
            raise ConfigError(f"features.text_template: field {{{name}}} must be a plain column name")
        if spec or conv:
            raise ConfigError(f"features.text_template: field {{{name}}} must not have a format spec/conversion")
        out.append(name)
    return out


def render_template(template: str, fields: dict[str, str]) -> str:
    """Render one item; empty fields vanish together with a punctuation-only separator after them."""
    parts: list[str] = []
    drop_next_sep = False
    for literal, name, _, _ in string.Formatter().parse(template):
        if literal and not (drop_next_sep and _SEP_ONLY.match(literal)):
            parts.append(literal)
        drop_next_sep = False
        if name is None:
            continue
        value = _WS.sub(" ", str(fields.get(name, "") or "")).strip()
        if value:
            parts.append(value)
        else:
            drop_next_sep = True
    # a dangling separator can remain after the last non-empty field ("Lamp, " for "{title}, {brand}")
    return _WS.sub(" ", "".join(parts)).strip().rstrip(",;:|/-–— ").strip()


def render_item_texts(dataset: RecDataset, template: str) -> tuple[list[str], np.ndarray]:
    """(texts, present) for every item: ``present[i]`` is False when all used fields are empty."""
    names = template_fields(template)
    missing = [n for n in names if n not in dataset.item_text]
    if missing and template != FeatureConfig.text_template:  # the default names every usual column: no warning
        log.warning("text template fields %s are not columns of %s (rendered empty); columns: %s",
                    missing, dataset.name, dataset.text_fields())
    cols = {n: dataset.item_text.get(n) for n in names}
    for n, col in cols.items():
        if col is not None and len(col) != dataset.n_items:
            raise ValueError(f"{dataset.name}: item_text[{n!r}] has {len(col)} entries, expected {dataset.n_items}")
    texts, present = [], np.zeros(dataset.n_items, dtype=bool)
    for i in range(dataset.n_items):
        fields = {n: (col[i] if col is not None else "") for n, col in cols.items()}
        present[i] = any(str(v or "").strip() for v in fields.values())
        texts.append(render_template(template, fields) if present[i] else "")
    return texts, present


def _batches(n: int, size: int):
    for s in range(0, n, size):
        yield s, min(n, s + size)


def _fingerprint_tensor(w: torch.Tensor) -> str:
    h = hashlib.blake2b(digest_size=12)
    h.update(str((tuple(w.shape), str(w.dtype))).encode())
    h.update(w.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


def _fingerprint_tokenizer(tok: Any) -> str:
    probe = "The quick brown fox: 12 Ünïcode items, (brand) & more!"
    ids = tok(probe, add_special_tokens=False)["input_ids"]
    return hashlib.blake2b(json.dumps([type(tok).__name__, len(tok), ids]).encode(), digest_size=8).hexdigest()


def fingerprint_dir(path: str | Path) -> str:
    """Cheap identity of a model folder: file names + sizes + the hash of its config/tokenizer JSONs."""
    p = Path(path)
    h = hashlib.blake2b(digest_size=12)
    for f in sorted(p.rglob("*")):
        if f.is_file():
            h.update(f"{f.relative_to(p)}:{f.stat().st_size}".encode())
            if f.suffix == ".json" and f.stat().st_size < 50_000_000:
                h.update(f.read_bytes())
    return h.hexdigest()


def _read_embedding_from_safetensors(path: Path) -> torch.Tensor | None:
    from safetensors import safe_open

    for shard in sorted(path.glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as f:
            for key in f.keys():
                if key.endswith(_EMBED_KEYS):
                    return f.get_tensor(key)
    return None


class LLMEmbeddingTextEncoder:
    """Mean of the LLM input-embedding rows of an item's tokens (a frozen lookup, no forward pass)."""

    pooling = "mean-input-embeddings"

    def __init__(self, tokenizer: Any, embedding_weight: torch.Tensor, name: str = "") -> None:
        if embedding_weight.dim() != 2:
            raise ValueError(f"embedding_weight must be [vocab, dim], got {tuple(embedding_weight.shape)}")
        self.tokenizer = tokenizer
        self.weight = embedding_weight.detach()
        self.name = name or str(getattr(tokenizer, "name_or_path", "") or "llm")
        self._id: str | None = None

    @classmethod
    def from_model(cls, tokenizer: Any, model: torch.nn.Module, name: str = "") -> "LLMEmbeddingTextEncoder":
        """From a loaded (possibly PEFT-wrapped) causal LM: uses ``model.get_input_embeddings()``."""
        return cls(tokenizer, model.get_input_embeddings().weight, name or getattr(model, "name_or_path", ""))

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "LLMEmbeddingTextEncoder":
        """Tokenizer + input-embedding matrix of a local model folder (no full model load if avoidable)."""
        from transformers import AutoTokenizer

        p = Path(path)
        if not p.is_dir():
            raise FileNotFoundError(f"text encoder 'llm': model folder {p} does not exist")
        tok = AutoTokenizer.from_pretrained(str(p))
        weight = _read_embedding_from_safetensors(p)
        if weight is None:
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(str(p), dtype=torch.float32)
            weight = model.get_input_embeddings().weight.detach().clone()
            del model
        return cls(tok, weight, name=p.name)

    @property
    def encoder_id(self) -> str:
        if self._id is None:
            self._id = (f"llm-emb:{Path(self.name).name}:{_fingerprint_tensor(self.weight)}"
                        f":{_fingerprint_tokenizer(self.tokenizer)}")
        return self._id

    @property
    def dim(self) -> int:
        return int(self.weight.shape[1])

    @torch.no_grad()
    def encode(self, texts: Sequence[str], max_tokens: int = 128, batch_size: int = 256,
               device: str | torch.device = "cpu", progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """(features [n, dim] float32 on CPU, mask [n] bool: text non-empty and >= 1 token)."""
        from tqdm.auto import tqdm

        device = torch.device(device)
        w = self.weight.to(device=device, dtype=torch.float32)
        n = len(texts)
        feats = torch.zeros(n, w.shape[1], dtype=torch.float32)
        mask = torch.zeros(n, dtype=torch.bool)
        for s, e in tqdm(list(_batches(n, batch_size)), desc="text (llm embeddings)", disable=not progress):
            batch = [t if t.strip() else "" for t in texts[s:e]]
            ids = self.tokenizer(batch, add_special_tokens=False, truncation=True, max_length=max_tokens)["input_ids"]
            lens = np.asarray([len(x) for x in ids], dtype=np.int64)
            flat = np.fromiter((t for x in ids for t in x), dtype=np.int64, count=int(lens.sum()))
            if len(flat) and (flat.max() >= w.shape[0] or flat.min() < 0):
                raise ValueError(f"tokenizer produced id {int(flat.max())} >= embedding rows {w.shape[0]}")
            offsets = np.concatenate([[0], np.cumsum(lens)[:-1]]).astype(np.int64)
            out = F.embedding_bag(torch.from_numpy(flat).to(device), w, torch.from_numpy(offsets).to(device),
                                  mode="mean")  # empty bags -> zeros
            feats[s:e] = out.cpu()
            mask[s:e] = torch.from_numpy(lens > 0)
        return feats, mask


class SentenceTextEncoder:
    """A frozen ``transformers.AutoModel`` text encoder from a local folder, mean-pooled."""

    pooling = "mean-last-hidden"

    def __init__(self, path: str | Path, device: str | torch.device = "cpu") -> None:
        from transformers import AutoModel, AutoTokenizer

        self.path = Path(path)
        if not self.path.is_dir():
            raise FileNotFoundError(f"text encoder: {self.path} is not a local model folder "
                                    "(nothing can be downloaded here; pass a path)")
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.path))
        self.model = AutoModel.from_pretrained(str(self.path), dtype=torch.float32).to(device).eval()
        self.device = torch.device(device)
        self._id = f"hf:{self.path.name}:{fingerprint_dir(self.path)}"

    @property
    def encoder_id(self) -> str:
        return self._id

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    @torch.no_grad()
    def encode(self, texts: Sequence[str], max_tokens: int = 128, batch_size: int = 64,
               device: str | torch.device | None = None, progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        from tqdm.auto import tqdm

        dev = torch.device(device) if device is not None else self.device
        self.model.to(dev)
        n = len(texts)
        feats = torch.zeros(n, self.dim, dtype=torch.float32)
        mask = torch.tensor([bool(t.strip()) for t in texts], dtype=torch.bool)
        idx = torch.nonzero(mask).flatten().tolist()
        for s, e in tqdm(list(_batches(len(idx), batch_size)), desc="text (encoder)", disable=not progress):
            rows = idx[s:e]
            enc = self.tokenizer([texts[i] for i in rows], padding=True, truncation=True, max_length=max_tokens,
                                 return_tensors="pt").to(dev)
            hid = self.model(**enc).last_hidden_state.float()
            am = enc["attention_mask"].unsqueeze(-1).to(hid.dtype)
            feats[rows] = ((hid * am).sum(1) / am.sum(1).clamp_min(1.0)).cpu()
        return feats, mask


def make_text_encoder(spec: str, llm: Any = None, device: str | torch.device = "cpu"):
    """Resolve ``FeatureConfig.text_encoder``.

    ``spec == "llm"``: ``llm`` is a model folder path, a ``(tokenizer, embedding_weight)`` or
    ``(tokenizer, model)`` pair, or an :class:`LLMEmbeddingTextEncoder`. Otherwise ``spec`` is a
    local sentence-encoder folder.
    """
    if spec != "llm":
        return SentenceTextEncoder(spec, device)
    if isinstance(llm, LLMEmbeddingTextEncoder):
        return llm
    if isinstance(llm, (str, Path)):
        return LLMEmbeddingTextEncoder.from_pretrained(llm)
    if isinstance(llm, (tuple, list)) and len(llm) == 2:
        tok, obj = llm
        if isinstance(obj, torch.Tensor):
            return LLMEmbeddingTextEncoder(tok, obj)
        if hasattr(obj, "get_input_embeddings"):
            return LLMEmbeddingTextEncoder.from_model(tok, obj)
    raise ConfigError("text_encoder='llm' needs the LLM: a model folder path, (tokenizer, embedding_weight) "
                     f"or (tokenizer, model); got {type(llm).__name__}")


def encode_item_texts(dataset: RecDataset, encoder: Any, template: str, max_tokens: int = 128,
                      batch_size: int = 256, device: str | torch.device = "cpu",
                      progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Render every item's text and encode it: (features [n_items, d] float32, mask [n_items] bool)."""
    texts, present = render_item_texts(dataset, template)
    feats, mask = encoder.encode(texts, max_tokens=max_tokens, batch_size=batch_size, device=device,
                                 progress=progress)
    mask = mask & torch.from_numpy(present)
    feats[~mask] = 0.0
    log.info("text features for %s: %d/%d items have text (encoder %s, dim %d)", dataset.name, int(mask.sum()),
             dataset.n_items, encoder.encoder_id, feats.shape[1])
    return feats, mask
