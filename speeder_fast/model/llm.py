"""The LLM side: loading (fp32 / bf16 / NF4 QLoRA + LoRA) and :class:`SpeederRecModel`.

``SpeederRecModel`` = a causal LM (frozen base, trainable LoRA) + optional MoME (MRC) + optional
SPAE tables. One method, :meth:`SpeederRecModel.hidden_states`, computes the decoder's last hidden
states for a :class:`~speeder_fast.model.prompts.PromptBatch`; the LM head is applied ONLY where
it is needed (answer positions), never to every prompt position:

* :meth:`forward` -> cross-entropy over the answer tokens (label token in score mode, title + eos in
  generate mode);
* :meth:`score` -> ``[B, N]`` logits of the candidate label tokens at the answer position (one
  forward ranks every candidate; always a valid answer);
* :meth:`generate` -> greedy continuation (:mod:`.decoding`, KV cache), matched against candidate
  titles by :func:`match_generated`; :meth:`generate_constrained` -> greedy decoding restricted to
  the candidates' titles (a batched trie walk), stopped at the first prefix naming one candidate.

At inference the fixed instruction that starts every prompt (``PromptBatch.prefix``) is served
from a prefix KV cache (:mod:`.prefix_cache`, switch :attr:`SpeederRecModel.prefix_cache`): its
keys/values are computed once per model state and the decoder runs only on the rest of each prompt.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from speeder_fast.config import ModelConfig
from speeder_fast.utils import get_logger

from .fusion import SasrecFusion, fuse_scores
from .item_head import ItemHead, chunked_softmax_ce, sampled_softmax_ce
from .loss import answer_token_loss, label_logits
from .mome import MoME
from .positions import SPAE
from .prefix_cache import PrefixKV, cache_kwarg, compute_prefix, new_cache, suffix_packing
from .prompts import PromptBatch, PromptBuilder
from .user_state import UserState

log = get_logger("speeder_fast.model")


def resolve_llm_path(name: str) -> str:
    """Local folder for ``name`` (an existing path, or an asset name via ``speeder_fast.assets``)."""
    if Path(name).expanduser().is_dir():
        return str(Path(name).expanduser())
    from speeder_fast.assets import resolve_model

    return str(resolve_model(name))


def load_tokenizer(name: str) -> Any:
    """The tokenizer of ``name`` (pad token defaults to eos)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve_llm_path(name))
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def compute_dtype(precision: str, device: torch.device) -> torch.dtype:
    """dtype the decoder computes in: bf16 for bf16 (and NF4 on CUDA), else fp32."""
    if precision == "bf16" or (precision == "nf4" and device.type == "cuda"):
        return torch.bfloat16
    return torch.float32


#: attention implementations that run packed rows with a real varlen kernel (packing pays there)
VARLEN_IMPLS = ("speeder_varlen_fa", "speeder_varlen_torch", "speeder_varlen")


def resolve_packing(mode: str, attn_impl: str, device: torch.device) -> tuple[bool, str]:
    """``train.packing`` -> (on, why). ``auto``: on iff a varlen kernel is active on CUDA."""
    mode = (mode or "auto").lower()
    if mode not in ("auto", "on", "off"):
        raise ValueError(f"train.packing: {mode!r} is not auto, on or off")
    if mode != "auto":
        return mode == "on", "requested"
    if device.type == "cuda" and attn_impl in VARLEN_IMPLS:
        return True, f"auto: {attn_impl} on CUDA"
    if device.type != "cuda":
        return False, f"auto: {device.type} (padded batches; set train.packing=on to pack)"
    return False, f"auto: attention {attn_impl} has no varlen kernel"


def load_llm(cfg: ModelConfig, device: torch.device, tokenizer: Any, seed: int = 0) -> nn.Module:
    """Load the causal LM of ``cfg.llm`` at ``cfg.precision``, add LoRA, freeze the base.

    ``tokenizer`` may carry added special tokens (candidate labels); the embedding table is then
    resized (new rows: mean of the old rows + small seeded noise; they stay frozen and are saved
    with checkpoints).
    """
    from transformers import AutoModelForCausalLM

    from .attention import select_attention
    from .liger import apply_liger

    path = resolve_llm_path(cfg.llm)
    impl = select_attention(cfg.attn_impl, device, logger=log, dtype=compute_dtype(cfg.precision, device))
    kw: dict[str, Any] = {"attn_implementation": impl}
    if cfg.precision == "nf4":
        from transformers import BitsAndBytesConfig

        kw["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype("nf4", device),
        )
        kw["device_map"] = {"": str(device) if device.type == "cpu" else device.index or 0}
        kw["dtype"] = torch.float32 if device.type == "cpu" else torch.bfloat16
    else:
        kw["dtype"] = torch.bfloat16 if cfg.precision == "bf16" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(path, **kw)
    if cfg.precision != "nf4":
        model.to(device)
    n_vocab = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > n_vocab:
        old = model.get_input_embeddings().weight
        mean = old.detach().float().mean(0)
        g = torch.Generator().manual_seed(seed)
        noise = torch.randn(len(tokenizer) - n_vocab, old.shape[1], generator=g) * old.detach().float().std() * 0.1
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        with torch.no_grad():
            w = model.get_input_embeddings().weight
            w[n_vocab:] = (mean.to(noise) + noise).to(w.device, w.dtype)
    for p in model.parameters():
        p.requires_grad_(False)
    if cfg.precision == "nf4":
        from peft import prepare_model_for_kbit_training

        if device.type != "cuda":
            log.info("model.precision=nf4 on %s: bitsandbytes' own CPU 4-bit kernels, fp32 compute (slow; QLoRA "
                     "is meant for CUDA)", device.type)
        with _peft_reads_deprecated_attribute():
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing)
    elif cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.lora_r > 0:
        from peft import LoraConfig, get_peft_model

        names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
        targets = [t for t in cfg.lora_targets if t in names]
        if not targets:
            raise ValueError(f"model.lora_targets {cfg.lora_targets} match no module of {cfg.llm}")
        torch.manual_seed(seed)
        lcfg = LoraConfig(
            r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, target_modules=targets, task_type="CAUSAL_LM"
        )
        with _peft_reads_deprecated_attribute():
            model = get_peft_model(model, lcfg)
    for n, p in model.named_parameters():
        p.requires_grad_("lora_" in n)
    # after LoRA / quantisation: liger binds fused forwards onto the existing module instances
    model.speeder_liger = apply_liger(model, cfg.liger, device=device, logger=log)
    model.speeder_attn_impl = impl
    return model


@contextlib.contextmanager
def _peft_reads_deprecated_attribute() -> Iterator[None]:
    """peft (<= 0.21) reads ``PreTrainedModel.is_gradient_checkpointing``, which transformers 5 deprecated
    with a FutureWarning on every model load; ignore exactly that warning around peft's calls."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


def base_model(llm: nn.Module) -> nn.Module:
    """The underlying ``*ForCausalLM`` (through a peft wrapper if any)."""
    return llm.get_base_model() if hasattr(llm, "get_base_model") else llm


def embedding_rms(llm: nn.Module) -> float:
    """RMS norm of the input embedding rows (the scale new soft tokens are initialised to)."""
    w = base_model(llm).get_input_embeddings().weight.detach().float()
    return float(w.pow(2).mean(1).sqrt().mean())


class ItemLossSettings:
    """How the next-item head is trained (``train.item_*``): full or sampled softmax.

    Args:
        sampled: use the sampled softmax (else the exact full softmax, chunked).
        chunk: catalogue items per logit chunk of the full softmax.
        negatives: S, negatives drawn per step (sampled softmax).
        proposal: None (uniform over the catalogue) or fp32 ``[n_items]`` sampling weights (e.g.
            training counts + 1); normalised here.
        all_positions: train every history line end (else only the answer position).
        modality_loss: with per-modality keys (:attr:`ItemHead.parts` > 1), the weight of one extra
            softmax loss per active modality on that modality's score alone (+ the item bias), so
            each modality must rank the catalogue by itself (``train.item_modality_loss``; 0 = off).
    """

    def __init__(self, sampled: bool = False, chunk: int = 16384, negatives: int = 8192,
                 proposal: torch.Tensor | None = None, all_positions: bool = True, modality_loss: float = 0.0) -> None:
        self.sampled, self.chunk, self.negatives, self.all_positions = bool(sampled), int(chunk), int(negatives), bool(all_positions)
        self.modality_loss = float(modality_loss)
        self.proposal = None if proposal is None else (proposal.double() / proposal.double().sum()).float()

    def sample(self, n_items: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """``(negatives int64 [S], log Q fp32 [S])`` drawn with replacement (global torch RNG)."""
        S = self.negatives
        if self.proposal is None:
            neg = torch.randint(0, n_items, (S,), device=device)
            return neg, torch.full((S,), -math.log(n_items), device=device)
        p = self.proposal.to(device)
        neg = torch.multinomial(p, S, replacement=True)
        return neg, p.index_select(0, neg).log()


class SpeederRecModel(nn.Module):
    """LLM + (optional) MoME + (optional) SPAE; the recommender used for training and evaluation.

    With ``mome=None`` (``verbose`` / ``titles`` paradigms) the prompts carry no item slots and the
    input embeddings are the plain token embeddings.

    ``prefix_cache`` (config ``eval.prefix_cache``): at inference (eval mode, no grad) serve the
    shared prompt prefix from its cached keys/values (:meth:`prefix_kv`); ``prefix_train`` (config
    ``train.prefix_share``): in training, run the prefix once per forward (``[1, P]`` with
    gradients, broadcast over the batch) instead of once per example.
    """

    def __init__(self, llm: nn.Module, mome: MoME | None = None, positions: SPAE | None = None,
                 packing: str = "auto", item_head: ItemHead | None = None, prefix_cache: bool = True,
                 prefix_train: bool = False, user_state: UserState | None = None) -> None:
        super().__init__()
        self.llm = llm
        self.mome = mome
        self.positions = positions
        #: per-slot collaborative user state (model.user_state=sasrec); needs the collab modality
        self.user_state = user_state
        if user_state is not None and (mome is None or "collab" not in mome.modalities):
            raise ValueError("model.user_state=sasrec adds SASRec's state to the collab item slots: it needs a MoME "
                             "with the collab modality")
        #: score fusion with the run's SASRec (model.sasrec_fusion; set after training, scoring only)
        self.fusion: SasrecFusion | None = None
        #: next-item head (answer_mode=item); tied to ``mome``, which then must exist
        self.item_head = item_head
        if item_head is not None and mome is None:
            raise ValueError("the next-item head scores items by their MRC vectors: it needs a MoME")
        self.item_loss = ItemLossSettings()
        self._keys_src: torch.Tensor | None = None
        self._keys: torch.Tensor | None = None
        base = base_model(llm)
        self.decoder = base.get_decoder() if hasattr(base, "get_decoder") else base.model
        self.lm_head = base.get_output_embeddings()
        self.embed = base.get_input_embeddings()
        #: liger applied by load_llm (then the answer-token loss uses liger's fused linear + CE)
        self.use_liger = bool(getattr(llm, "speeder_liger", False))
        self.attn_impl = str(getattr(llm, "speeder_attn_impl", None) or getattr(base.config, "_attn_implementation", "sdpa"))
        self.packing = False
        self.set_packing(packing)
        #: serve the shared prompt prefix from its cached K/V at inference (eval.prefix_cache)
        self.prefix_cache = bool(prefix_cache)
        #: share the prefix forward across the batch in training (train.prefix_share)
        self.prefix_train = bool(prefix_train)
        self._prefixes: dict[tuple[int, ...], PrefixKV] = {}
        self._prefix_state: tuple | None = None
        self._llm_params: list[torch.Tensor] | None = None
        #: how many times a prefix's K/V were computed for the cache (tests, benchmarks)
        self.prefix_computations = 0
        self._cache_kw = cache_kwarg(self.decoder)
        # splice without position cues when the model has no SPAE (not a submodule: no parameters)
        object.__setattr__(self, "_no_cues", SPAE(1, 1, False, False))

    def set_packing(self, mode: str) -> bool:
        """Apply ``train.packing`` (auto | on | off) for the device the LLM is on; logs one line."""
        dev = self.embed.weight.device
        on, why = resolve_packing(mode, self.attn_impl, dev)
        self.packing = on
        log.info(f"packing: {'on' if on else 'off'} ({why}; attention {self.attn_impl})")
        return on

    # ------------------------------------------------------------------ prefix KV cache
    def train(self, mode: bool = True) -> "SpeederRecModel":
        """``nn.Module.train``; entering training mode drops the cached prefix K/V (weights are about
        to change), like the MRC catalogue."""
        if mode:
            self.invalidate_caches()
        return super().train(mode)

    def invalidate_caches(self) -> None:
        """Drop every cached inference tensor: prefix K/V, MRC catalogue, item-head keys. Call it
        after changing weights in a way the version counters miss (writes through ``param.data``)."""
        self._prefixes.clear()
        self._prefix_state = None
        self._llm_params = None
        if self.mome is not None:
            self.mome.clear_cache()
        self._keys_src = self._keys = None

    def _llm_state(self) -> tuple:
        """Fingerprint of everything the prefix K/V depend on: every LLM parameter's in-place version
        counter (optimizer steps, ``copy_``, ``load_state_dict`` bump it), the LLM's train/eval flag
        (dropout), the attention implementation and the embedding table's storage, dtype and
        device. The parameter list is collected once (walking the peft module tree costs
        milliseconds; reading ~700 counters ~0.1 ms) and again after :meth:`invalidate_caches` /
        ``train()``. Not seen: peft's ``disable_adapter()`` context (call :meth:`invalidate_caches`
        around it, or switch :attr:`prefix_cache` off)."""
        if self._llm_params is None:
            self._llm_params = list(self.llm.parameters())
        w = self.embed.weight  # storage / dtype / device: catches .to(...) and .half() of the model
        return (self.llm.training, self.attn_impl, w.data_ptr(), w.dtype, w.device,
                tuple(p._version for p in self._llm_params))

    @torch.no_grad()
    def prefix_kv(self, ids: Sequence[int]) -> PrefixKV:
        """Cached :class:`PrefixKV` of the prefix ``ids`` for the current weights (computed on first
        use and after any weight change; at most 4 distinct prefixes are kept)."""
        key = tuple(int(i) for i in ids)
        state = self._llm_state()
        if state != self._prefix_state:
            self._prefixes.clear()
            self._prefix_state = state
        pkv = self._prefixes.get(key)
        if pkv is None:
            if len(self._prefixes) >= 4:
                self._prefixes.pop(next(iter(self._prefixes)))
            pkv = compute_prefix(self.decoder, self.embed, self._decoder_config(), key)
            self._prefixes[key] = pkv
            self.prefix_computations += 1
        return pkv

    def _decoder_config(self) -> Any:
        return getattr(self.decoder, "config", None) or base_model(self.llm).config

    def prefix_for(self, batch: PromptBatch, packed: bool | None = None) -> PrefixKV | None:
        """The prefix K/V ``batch`` can be served with, or None (run it uncached).

        None when the switch is off, the batch declares no prefix, a padded batch is left-padded
        (its prefix does not start at column 0; :mod:`.decoding` rearranges those itself), or a
        packed batch runs on an attention that cannot take a cached prefix (transformers' own
        ``sdpa`` / ``eager``). Inference (eval mode, no grad): the cached :meth:`prefix_kv`.
        Training / grad mode: with :attr:`prefix_train`, the prefix computed now with gradients,
        once for the batch; else None.
        """
        training = self.training or torch.is_grad_enabled()
        if not batch.prefix or not (self.prefix_train if training else self.prefix_cache):
            return None
        packed = self.uses_packing(batch) if packed is None else packed
        if not packed and not batch.right_padded:
            return None
        if packed and not str(self.attn_impl).startswith("speeder_varlen"):
            return None
        if training:
            # gradient checkpointing drops every cache in training layers (transformers), so no prefix there
            if self._checkpointing():
                return None
            return compute_prefix(self.decoder, self.embed, self._decoder_config(), tuple(batch.prefix))
        return self.prefix_kv(batch.prefix)

    def _checkpointing(self) -> bool:
        """True when a decoder layer runs under gradient checkpointing (transformers then drops caches)."""
        return any(getattr(m, "gradient_checkpointing", False) for m in self.decoder.modules())

    def decode(self, embeds: torch.Tensor, cache: Any = None, **decoder_kwargs: Any) -> torch.Tensor:
        """The decoder's last hidden states (after the final norm) for ``embeds``; ``cache``: a
        transformers cache to read and extend (the prefix KV cache, decoding steps), else
        ``use_cache=False``."""
        if cache is not None:
            decoder_kwargs[self._cache_kw] = cache
            decoder_kwargs["use_cache"] = True
        else:
            decoder_kwargs.setdefault("use_cache", False)
        out = self.decoder(inputs_embeds=embeds, **decoder_kwargs)
        return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]

    def decode_after_prefix(self, embeds: torch.Tensor, pkv: PrefixKV) -> torch.Tensor:
        """``[B, P + L, H]``: the hidden states of a right-padded batch whose rows all start with
        ``pkv``'s prefix, given the embeddings ``[B, L, H]`` of the columns after it (positions
        ``P..P+L-1``); the prefix rows are ``pkv.hidden``."""
        B, L = embeds.shape[:2]
        P = pkv.length
        hp = pkv.hidden.expand(B, -1, -1)
        if L == 0:
            return hp
        pos = torch.arange(P, P + L, device=embeds.device)[None]
        h = self.decode(embeds, pkv.cache(B), position_ids=pos)
        return torch.cat([hp.to(h.dtype), h], 1)

    # ------------------------------------------------------------------ inputs and hidden states
    def item_tokens(self, batch: PromptBatch) -> torch.Tensor:
        """MRC tokens of ``batch.unique_items`` [U, k, H] (cached catalogue in eval mode)."""
        assert self.mome is not None
        if self.training or torch.is_grad_enabled():
            return self.mome.encode(batch.unique_items)
        return self.mome.encode_catalog()[batch.unique_items]

    def embed_inputs(self, input_ids: torch.Tensor, slot_item: torch.Tensor, slot_abs: torch.Tensor,
                     slot_rel: torch.Tensor, item_tokens: torch.Tensor | None,
                     token_items: torch.Tensor | None = None, rows: torch.Tensor | None = None,
                     n_rows: int | None = None) -> torch.Tensor:
        """Input embeddings ``[..., H]`` of ``input_ids`` (any layout: ``[B, L]`` padded or ``[1, T]``
        packed): the token embeddings, with ``item_tokens.view(-1, H)[slot_item]`` (+ SPAE cues) spliced
        at the item slots; plain token embeddings when ``item_tokens`` is None.

        With a :attr:`user_state` (``model.user_state=sasrec``, collab active in the stage) SASRec's
        projected state is added at the history slots. It needs ``token_items`` (int64 ``[U]``, the item
        id of each row of ``item_tokens``; None = row ``i`` is item ``i``, the cached catalogue) and,
        for a packed row, ``rows`` (int64, the prompt of each position, like ``input_ids``) with
        ``n_rows`` prompts; padded ``[B, L]`` inputs default to row ``b``."""
        if item_tokens is None:
            return F.embedding(input_ids, self.embed.weight)
        embeds = self.splice(input_ids, slot_item, slot_abs, slot_rel, item_tokens)
        us = self.user_state
        if us is not None and "collab" in self.mome.active:
            if rows is None:
                B, L = input_ids.shape
                rows, n_rows = torch.arange(B, device=input_ids.device)[:, None].expand(B, L), B
            if token_items is None:
                token_items = torch.arange(item_tokens.shape[0], device=input_ids.device)
            add = us(slot_item, slot_abs, rows, int(n_rows), token_items, self.mome.k)
            embeds = embeds + add.to(embeds.dtype)
        return embeds

    def input_embeds(self, batch: PromptBatch) -> torch.Tensor:
        """Input embeddings [B, L, H] of the padded batch: token embeddings, item tokens (+ SPAE cues) at slots."""
        return self.embed_inputs(batch.input_ids, batch.slot_item, batch.slot_abs, batch.slot_rel,
                                 self.batch_item_tokens(batch), batch.unique_items)

    def splice(self, input_ids: torch.Tensor, slot_item: torch.Tensor, slot_abs: torch.Tensor,
               slot_rel: torch.Tensor, item_tokens: torch.Tensor) -> torch.Tensor:
        """Token embeddings of ``input_ids`` with ``item_tokens.view(-1, H)[slot_item]`` (+ SPAE cues)
        at the item slots (``kernels.inject_positions``; any layout: padded or packed)."""
        pos = self.positions if self.positions is not None else self._no_cues
        return pos.splice(input_ids, self.embed.weight, slot_item, slot_abs, slot_rel, item_tokens)

    def batch_item_tokens(self, batch: PromptBatch) -> torch.Tensor | None:
        """:meth:`item_tokens` of the batch, or None when it has no item slot (no MoME, or text-only)."""
        if self.mome is None or batch.unique_items.numel() == 0:  # shape check only, no device sync
            return None
        return self.item_tokens(batch)

    def uses_packing(self, batch: PromptBatch) -> bool:
        """True when ``batch`` runs packed (packing on and the batch carries its packed form)."""
        return self.packing and batch.packed is not None

    def _hidden_padded_prefix(self, batch: PromptBatch, pkv: PrefixKV) -> torch.Tensor:
        """``[B, L, H]`` of a right-padded batch whose rows start with ``pkv``'s prefix: the decoder
        runs on columns ``P..L-1`` only (:meth:`decode_after_prefix`)."""
        cols = slice(pkv.length, None)
        embeds = self.embed_inputs(batch.input_ids[:, cols], batch.slot_item[:, cols], batch.slot_abs[:, cols],
                                   batch.slot_rel[:, cols], self.batch_item_tokens(batch), batch.unique_items)
        return self.decode_after_prefix(embeds, pkv)

    def _hidden_packed_prefix(self, batch: PromptBatch, pkv: PrefixKV) -> torch.Tensor:
        """``[1, T, H]`` of a packed batch whose examples start with ``pkv``'s prefix: the decoder
        runs on the packed suffixes only (``T - B*P`` tokens, ``cu_seq_lens_k = cu_q + P*i``), the
        prefix rows are ``pkv.hidden``. No host sync (every size is a host int)."""
        pb = batch.packed
        P = pkv.length
        T, B = pb.num_tokens, pb.num_examples
        src, cu_q, prefix_rows = suffix_packing(pb.cu_seqlens, P, T)
        hp = pkv.hidden[0].repeat(B, 1)  # [B*P, H]
        if T == B * P:
            return hp.unsqueeze(0)
        slot_item, slot_abs, slot_rel = (e.index_select(1, src) for e in pb.extras)
        embeds = self.embed_inputs(pb.input_ids.index_select(1, src), slot_item, slot_abs, slot_rel,
                                   self.batch_item_tokens(batch), batch.unique_items,
                                   pb.seq_index.index_select(0, src)[None], B)
        cu_k = cu_q + P * torch.arange(B + 1, device=cu_q.device, dtype=cu_q.dtype)
        h = self.decode(embeds, pkv.cache(1), position_ids=pb.position_ids.index_select(1, src),
                        cu_seq_lens_q=cu_q, cu_seq_lens_k=cu_k, max_length_q=pb.max_seqlen - P,
                        max_length_k=pb.max_seqlen)[0]
        full = h.new_zeros(T, h.shape[-1]).index_copy(0, prefix_rows, hp.to(h.dtype)).index_copy(0, src, h)
        return full.unsqueeze(0)

    def _inputs(self, batch: PromptBatch) -> tuple[tuple[Any, ...], dict]:
        """``((input_ids, slot_item, slot_abs, slot_rel, item_tokens, token_items[, rows, n_rows]), decoder
        kwargs)`` of ``batch`` in the layout it runs in: the packed row (+ :meth:`PackedBatch.model_kwargs`),
        or the padded batch (a padding mask only when it is left-padded: under a plain causal mask
        real tokens of a right-padded row never see its padding, and only real positions are read)."""
        items = self.batch_item_tokens(batch)
        if self.uses_packing(batch):
            pb = batch.packed
            return ((pb.input_ids, *pb.extras, items, batch.unique_items, pb.seq_index[None], pb.num_examples),
                    pb.model_kwargs())
        mask = None if batch.right_padded else batch.attention_mask
        return ((batch.input_ids, batch.slot_item, batch.slot_abs, batch.slot_rel, items, batch.unique_items),
                {"attention_mask": mask})

    def hidden_states(self, batch: PromptBatch) -> torch.Tensor:
        """Decoder last hidden states (after the final norm).

        Padded: ``[B, L, H]``. Packed (:meth:`uses_packing`): ``[1, T, H]`` over the real tokens
        only, decoder run with ``use_cache=False`` and ``position_ids`` / ``cu_seq_lens`` /
        ``max_length`` from :meth:`PackedBatch.model_kwargs` (no device-to-host sync here).
        Use :meth:`flat_rows` to address answer / loss positions in either layout.

        With a prefix (:meth:`prefix_for`), the decoder runs on the suffix only, reading the
        prefix's cached keys/values; the output has the same layout (prefix rows = the cached
        prefix hidden states) and equals the uncached one to fp32 rounding.
        """
        packed = self.uses_packing(batch)
        pkv = self.prefix_for(batch, packed)
        if pkv is not None:
            return self._hidden_packed_prefix(batch, pkv) if packed else self._hidden_padded_prefix(batch, pkv)
        inputs, kw = self._inputs(batch)
        return self.decode(self.embed_inputs(*inputs), **kw)

    def flat_rows(self, batch: PromptBatch, padded_flat: torch.Tensor, packed: bool) -> torch.Tensor:
        """Map flat padded indices ``b * L + p`` to rows of ``hidden.reshape(-1, H)`` (device gather)."""
        if not packed:
            return padded_flat
        return batch.packed.padded_to_packed.reshape(-1).index_select(0, padded_flat)

    def answer_rows(self, batch: PromptBatch, packed: bool) -> torch.Tensor:
        """Rows of ``hidden.reshape(-1, H)`` at each example's answer position, [B]."""
        B, L = batch.input_ids.shape
        flat = torch.arange(B, device=batch.answer_pos.device) * L + batch.answer_pos
        return self.flat_rows(batch, flat, packed)

    # ------------------------------------------------------------------ heads
    def _head(self, h: torch.Tensor) -> torch.Tensor:
        return self.lm_head(h).float()

    def _plain_head(self) -> bool:
        """The LM head is a plain float Linear (not 4-bit / adapted) with no forward hooks: the
        fused helpers may bypass the module call (hooked heads, e.g. instrumentation, keep it)."""
        w = getattr(self.lm_head, "weight", None)
        hooked = bool(self.lm_head._forward_hooks or self.lm_head._forward_pre_hooks)
        return type(self.lm_head) is nn.Linear and w is not None and w.is_floating_point() and not hooked

    def forward(self, batch: PromptBatch, label_loss: bool = False) -> torch.Tensor:
        """Mean training loss of ``batch`` (the LM head / item head applied at answer rows only).

        * item mode (the batch carries ``item_targets``, :attr:`item_head` set): cross-entropy of the
          next-item head over the catalogue at every history line end (:meth:`item_loss_of`);
        * ``label_loss`` (score mode): cross-entropy over the ``N`` candidate label logits at the
          answer position (exactly what :meth:`score` ranks);
        * otherwise the full-vocabulary cross-entropy over the answer tokens.

        A batch with a ``fold`` (cross-fitting) reads that fold's collab table (:meth:`MoME.using_fold`).
        """
        with self.fold_scope(batch.fold):  # cross-fitting: this batch's collab table
            return self._forward(batch, label_loss)

    def fold_scope(self, fold: int | None) -> Any:
        """Context in which the MoME reads collab fold ``fold``'s table (:meth:`MoME.using_fold`;
        cross-fitting, ``features.sasrec_crossfit``); a no-op for None or a model without a MoME."""
        if fold is None or self.mome is None:
            return contextlib.nullcontext()
        return self.mome.using_fold(fold)

    def _forward(self, batch: PromptBatch, label_loss: bool) -> torch.Tensor:
        packed = self.uses_packing(batch)
        h = self.hidden_states(batch)
        if self.item_head is not None:
            return self.item_loss_of(h, batch, packed)
        if label_loss:
            return F.cross_entropy(self._label_logits(h, batch, packed), batch.target_idx)
        H = h.shape[-1]
        sel = h.reshape(-1, H).index_select(0, self.flat_rows(batch, batch.loss_pos, packed))
        if self.use_liger and sel.is_cuda and self._plain_head():  # chunked fused linear + CE, no [A, V] logits
            return answer_token_loss(sel, self.lm_head.weight, batch.loss_targets, use_liger=True,
                                     lm_head_bias=self.lm_head.bias)
        return F.cross_entropy(self._head(sel), batch.loss_targets)  # [A, V] logits for answer rows only

    def _label_logits(self, h: torch.Tensor, batch: PromptBatch, packed: bool) -> torch.Tensor:
        last = h.reshape(-1, h.shape[-1]).index_select(0, self.answer_rows(batch, packed))  # [B, H]
        return self.label_logits_at(last, batch.label_token_ids)

    def token_logits_at(self, last: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """fp32 ``[B, N]`` logits of per-row token ids ``tokens`` (int64 ``[B, N]``, valid ids) from
        hidden states ``last [B, H]``: only those rows of the LM head (plain head), else the full
        head's logits gathered (4-bit / hooked heads)."""
        if self._plain_head():
            w = self.lm_head.weight.index_select(0, tokens.reshape(-1)).view(*tokens.shape, -1)  # [B, N, H]
            out = torch.einsum("bnh,bh->bn", w, last.to(w.dtype))
            if self.lm_head.bias is not None:
                out = out + self.lm_head.bias.index_select(0, tokens.reshape(-1)).view_as(tokens)
            return out.float()
        return self._head(last).gather(1, tokens)

    def label_logits_at(self, last: torch.Tensor, label_token_ids: torch.Tensor) -> torch.Tensor:
        """[B, N] fp32 logits of ``label_token_ids`` from answer-position hidden states ``last`` [B, H]."""
        if self._plain_head():  # only the N label rows of the head, never [B, V]
            return label_logits(last, self.lm_head.weight, label_token_ids, self.lm_head.bias).float()
        return self._head(last).index_select(1, label_token_ids)

    def score(self, batch: PromptBatch) -> torch.Tensor:
        """fp32 scores at each example's answer position: ``[B, N]`` candidate label-token logits
        (score mode), or ``[B, n_items]`` next-item scores of the whole catalogue (item mode).

        One decoder forward per batch; the head is applied at the answer position only (and only
        for the label tokens in score mode). In eval mode under ``no_grad`` the MRC item tokens come
        from the cached catalogue (:meth:`MoME.encode_catalog`, computed once). A batch with a ``fold``
        (cross-fitting) reads that fold's collab table.
        """
        with self.fold_scope(batch.fold):
            h = self.hidden_states(batch)
            rows = self.answer_rows(batch, self.uses_packing(batch))
            out = self.answer_scores(h.reshape(-1, h.shape[-1]).index_select(0, rows), batch.label_token_ids)
        return self.fused_scores(out, batch.slot_item, batch.slot_abs, batch.unique_items)

    def fused_scores(self, scores: torch.Tensor, slot_item: torch.Tensor, slot_abs: torch.Tensor,
                     token_items: torch.Tensor | None) -> torch.Tensor:
        """``scores`` [B, n_items] fused with the run's SASRec (:attr:`fusion`, ``model.sasrec_fusion``:
        ``log_softmax(scores) + w * log_softmax(SASRec)``, :mod:`.fusion`) when the model has a fusion
        with a weight > 0 and the head is item mode; else ``scores`` unchanged. ``slot_item`` /
        ``slot_abs`` are the padded ``[B, L]`` slot arrays, ``token_items`` the item id of each row of
        the item-token table (None: row ``i`` is item ``i``, the cached catalogue)."""
        fu = self.fusion
        if fu is None or fu.weight <= 0 or self.item_head is None or self.mome is None:
            return scores
        return fuse_scores(scores, self.fusion_log_probs(slot_item, slot_abs, token_items), fu.weight)

    def fusion_log_probs(self, slot_item: torch.Tensor, slot_abs: torch.Tensor,
                         token_items: torch.Tensor | None) -> torch.Tensor:
        """fp32 ``[B, n_items]``: :attr:`fusion`'s SASRec log-softmax after each prompt's newest history
        item, from the padded ``[B, L]`` slot arrays (``token_items`` as in :meth:`fused_scores`)."""
        B, L = slot_abs.shape
        if token_items is None:
            token_items = torch.arange(self.mome.n_items, device=slot_abs.device)
        rows = torch.arange(B, device=slot_abs.device)[:, None].expand(B, L)
        return self.fusion.log_probs(slot_item, slot_abs, rows, B, token_items, self.mome.k)

    def score_inputs(self, input_ids: torch.Tensor, slot_item: torch.Tensor, slot_abs: torch.Tensor,
                     slot_rel: torch.Tensor, item_tokens: torch.Tensor | None, rows: torch.Tensor,
                     label_token_ids: torch.Tensor, item_keys: torch.Tensor | None = None,
                     prefix: PrefixKV | None = None) -> torch.Tensor:
        """The scoring path of a right-padded batch on plain tensors (what
        :class:`~speeder_fast.model.static.StaticScorer` compiles): :meth:`embed_inputs` ->
        :meth:`decode` (or, with ``prefix``, :meth:`decode_after_prefix`: the inputs are then the columns
        after the prefix) -> the hidden states at flat rows ``rows`` (int64 ``[B]`` of the full
        ``[B, P + L]`` layout) -> :meth:`answer_scores`, fp32 (the same pieces as :meth:`score`)."""
        embeds = self.embed_inputs(input_ids, slot_item, slot_abs, slot_rel, item_tokens)
        h = self.decode(embeds) if prefix is None else self.decode_after_prefix(embeds, prefix)
        out = self.answer_scores(h.reshape(-1, h.shape[-1]).index_select(0, rows), label_token_ids, item_keys)
        return self.fused_scores(out, slot_item, slot_abs, None)

    def answer_scores(self, last: torch.Tensor, label_token_ids: torch.Tensor,
                      item_keys: torch.Tensor | None = None) -> torch.Tensor:
        """Scores from answer-position hidden states ``last [B, H]``: item scores ``[B, n_items]``
        (item mode; ``item_keys`` defaults to :meth:`catalog_keys`) or label logits ``[B, N]``."""
        if self.item_head is not None:
            return self.item_head.scores(last, self.catalog_keys() if item_keys is None else item_keys)
        return self.label_logits_at(last, label_token_ids)

    # ------------------------------------------------------------------ next-item head
    def item_keys_of(self, items: torch.Tensor) -> torch.Tensor:
        """fp32 head vectors ``[U, D]`` of ``items`` (int64 ``[U]``), with gradient to the MoME
        (``D = H``, or ``M * H`` with per-modality keys, :attr:`ItemHead.parts` > 1)."""
        if self.item_head.parts > 1:
            return self.item_head.keys(self.mome.expert_vectors(items), items)
        return self.item_head.keys(self.mome.encode(items), items)

    @torch.no_grad()
    def catalog_keys(self) -> torch.Tensor:
        """fp32 head vectors of every item ``[n_items, D]`` from the cached MRC catalogue (recomputed
        only when the catalogue is: after ``train()``, a stage change or loading weights)."""
        src = self.mome.expert_catalog() if self.item_head.parts > 1 else self.mome.encode_catalog()
        if src is not self._keys_src:
            self._keys_src, self._keys = src, self.item_head.keys(src)
        return self._keys

    def item_loss_of(self, h: torch.Tensor, batch: PromptBatch, packed: bool) -> torch.Tensor:
        """Next-item cross-entropy of hidden states ``h`` (any layout) for ``batch``.

        Positions: ``batch.item_pos`` (every history line end, :attr:`ItemLossSettings.all_positions`)
        or only the answer position. Loss: the chunked full softmax over the catalogue, or the
        logQ-corrected sampled softmax (:class:`ItemLossSettings`; see :mod:`.item_head`).
        """
        st, head = self.item_loss, self.item_head
        H = h.shape[-1]
        if st.all_positions:
            rows, targets = self.flat_rows(batch, batch.item_pos, packed), batch.item_targets
        else:
            rows, targets = self.answer_rows(batch, packed), batch.target_items
        q = head.query(h.reshape(-1, H).index_select(0, rows))
        n_items = self.mome.n_items
        if not st.sampled:
            keys, bias = self.item_keys_of(torch.arange(n_items, device=q.device)), head.item_bias()

            def loss_of(qq: torch.Tensor, cols: slice) -> torch.Tensor:
                return chunked_softmax_ce(qq, keys[:, cols], bias, targets, st.chunk)
        else:
            neg, log_q = st.sample(n_items, q.device)
            tk, nk = self.item_keys_of(targets), self.item_keys_of(neg)
            tb, nb = head.item_bias(targets), head.item_bias(neg)

            def loss_of(qq: torch.Tensor, cols: slice) -> torch.Tensor:
                return sampled_softmax_ce(qq, tk[:, cols], tb, nk[:, cols], nb, log_q, targets, neg)
        loss = loss_of(q, slice(None))
        if head.parts > 1 and st.modality_loss > 0:  # each modality's score on its own (late fusion only)
            Hh = head.hidden_size
            for j in range(head.parts):
                if bool(self.mome.active_mask[j]):
                    cols = slice(j * Hh, (j + 1) * Hh)
                    loss = loss + st.modality_loss * loss_of(q[:, cols], cols)
        return loss

    @torch.no_grad()
    def generate(self, batch: PromptBatch, max_new_tokens: int, eos_token_id: int, pad_token_id: int) -> torch.Tensor:
        """Greedy continuation ``[B, T]`` (int64; ``pad_token_id`` after a row's eos; ``T <=
        max_new_tokens``) of left- or right-padded prompts: the plain LLaRA protocol, the same tokens
        as HF ``generate(do_sample=False)``. See :func:`~speeder_fast.model.decoding.greedy_decode`
        for the token counts."""
        from .decoding import greedy_decode

        return greedy_decode(self, batch, max_new_tokens, eos_token_id, pad_token_id).tokens

    @torch.no_grad()
    def generate_constrained(self, batch: PromptBatch, sequences: torch.Tensor, eos_token_id: int,
                             pad_token_id: int) -> Any:
        """Greedy decoding constrained to the candidates' answer sequences ``sequences`` (int64
        ``[B, N, S]``, ``-1`` padded, each ending with eos; :meth:`PromptBuilder.answer_sequences`),
        stopped per row at the first prefix that names one candidate. Returns a
        :class:`~speeder_fast.model.decoding.DecodeResult` (``choice`` = candidate index)."""
        from .decoding import greedy_decode

        return greedy_decode(self, batch, 0, eos_token_id, pad_token_id, sequences=sequences)

    # ------------------------------------------------------------------ stages and checkpoints
    def set_stage(self, modalities: Sequence[str]) -> None:
        if self.mome is not None:
            self.mome.set_active(modalities)

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Everything a run trains: LoRA weights, MoME (experts, gate, LN), SPAE tables, the item head and
        the user-state projection (not the frozen SASRec behind it)."""
        sd: dict[str, torch.Tensor] = {}
        for n, p in self.llm.named_parameters():
            if "lora_" in n:
                sd[f"llm.{n}"] = p.detach()
        us_proj = self.user_state.proj if self.user_state is not None else None  # the frozen SASRec is RUN/sasrec.safetensors
        for prefix, mod in (("mome", self.mome), ("positions", self.positions), ("item_head", self.item_head),
                            ("user_state.proj", us_proj)):
            if mod is not None:
                for n, p in mod.named_parameters():
                    sd[f"{prefix}.{n}"] = p.detach()
        return sd

    def load_trainable_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        """Inverse of :meth:`trainable_state_dict`; every expected key must be present."""
        own = self.trainable_state_dict()
        missing = sorted(set(own) - set(sd))
        unexpected = sorted(set(sd) - set(own))
        if missing or unexpected:
            raise KeyError(f"checkpoint mismatch: missing {missing[:5]} (+{max(0, len(missing) - 5)}), "
                           f"unexpected {unexpected[:5]} (+{max(0, len(unexpected) - 5)})")
        params = dict(self.named_parameters())
        with torch.no_grad():
            for k, v in sd.items():
                params[k].copy_(v.to(params[k].device, params[k].dtype))
        self.invalidate_caches()


def match_generated(builder: PromptBuilder, generated: torch.Tensor, candidates: torch.Tensor) -> tuple[list[str], torch.Tensor]:
    """Decode generations and match them to candidate titles.

    Returns ``(texts, pred_idx)``; ``pred_idx[b]`` is the candidate whose (truncated) title equals
    the generated text exactly. When no or several candidates match that way (titles that collide
    after ``prompt.title_tokens`` truncation, ``builder.full_title_text``), the candidate whose full
    title equals the text is taken if there is exactly one; otherwise ``-1`` (invalid).
    """
    texts = [builder.decode_answer(row.tolist()) for row in generated.cpu()]
    cands = candidates.cpu().tolist()
    pred = torch.full((len(texts),), -1, dtype=torch.long)
    full = getattr(builder, "full_title_text", {})
    for b, (t, row) in enumerate(zip(texts, cands)):
        hits = [j for j, item in enumerate(row) if builder.title_text[item] == t]
        if len(hits) != 1 and full:
            hits = [j for j, item in enumerate(row) if full.get(item) == t]
        if len(hits) == 1:
            pred[b] = hits[0]
    return texts, pred
