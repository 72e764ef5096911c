"""The LLM side: loading (fp32 / bf16 / NF4 QLoRA + LoRA) and :class:`SpeederRecModel`.

``SpeederRecModel`` = a causal LM (frozen base, trainable LoRA) + optional MoME (MRC) + optional
SPAE tables. One method, :meth:`SpeederRecModel.hidden_states`, computes the decoder's last hidden
states for a :class:`~speeder_fast.model.prompts.PromptBatch`; the LM head is applied ONLY where
it is needed (answer positions), never to every prompt position:

* :meth:`forward` -> cross-entropy over the answer tokens (label token in score mode, title + eos in
  generate mode);
* :meth:`score` -> ``[B, N]`` logits of the candidate label tokens at the answer position (one
  forward ranks every candidate; always a valid answer);
* :meth:`generate` -> greedy continuation (HF ``generate`` from ``inputs_embeds``), matched
  against candidate titles by :func:`match_generated`.
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

from .item_head import ItemHead, chunked_softmax_ce, sampled_softmax_ce
from .loss import answer_token_loss, label_logits
from .mome import MoME
from .positions import SPAE
from .prompts import PromptBatch, PromptBuilder

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
    """

    def __init__(self, sampled: bool = False, chunk: int = 16384, negatives: int = 8192,
                 proposal: torch.Tensor | None = None, all_positions: bool = True) -> None:
        self.sampled, self.chunk, self.negatives, self.all_positions = bool(sampled), int(chunk), int(negatives), bool(all_positions)
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
    """

    def __init__(self, llm: nn.Module, mome: MoME | None = None, positions: SPAE | None = None,
                 packing: str = "auto", item_head: ItemHead | None = None) -> None:
        super().__init__()
        self.llm = llm
        self.mome = mome
        self.positions = positions
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
        # splice without position cues when the model has no SPAE (not a submodule: no parameters)
        object.__setattr__(self, "_no_cues", SPAE(1, 1, False, False))

    def set_packing(self, mode: str) -> bool:
        """Apply ``train.packing`` (auto | on | off) for the device the LLM is on; logs one line."""
        dev = self.embed.weight.device
        on, why = resolve_packing(mode, self.attn_impl, dev)
        self.packing = on
        log.info(f"packing: {'on' if on else 'off'} ({why}; attention {self.attn_impl})")
        return on

    # ------------------------------------------------------------------ inputs and hidden states
    def item_tokens(self, batch: PromptBatch) -> torch.Tensor:
        """MRC tokens of ``batch.unique_items`` [U, k, H] (cached catalogue in eval mode)."""
        assert self.mome is not None
        if self.training or torch.is_grad_enabled():
            return self.mome.encode(batch.unique_items)
        return self.mome.encode_catalog()[batch.unique_items]

    def embed_inputs(self, input_ids: torch.Tensor, slot_item: torch.Tensor, slot_abs: torch.Tensor,
                     slot_rel: torch.Tensor, item_tokens: torch.Tensor | None) -> torch.Tensor:
        """Input embeddings ``[..., H]`` of ``input_ids`` (any layout: ``[B, L]`` padded or ``[1, T]``
        packed): the token embeddings, with ``item_tokens.view(-1, H)[slot_item]`` (+ SPAE cues) spliced
        at the item slots; plain token embeddings when ``item_tokens`` is None."""
        if item_tokens is None:
            return F.embedding(input_ids, self.embed.weight)
        return self.splice(input_ids, slot_item, slot_abs, slot_rel, item_tokens)

    def input_embeds(self, batch: PromptBatch) -> torch.Tensor:
        """Input embeddings [B, L, H] of the padded batch: token embeddings, item tokens (+ SPAE cues) at slots."""
        return self.embed_inputs(batch.input_ids, batch.slot_item, batch.slot_abs, batch.slot_rel,
                                 self._batch_item_tokens(batch))

    def splice(self, input_ids: torch.Tensor, slot_item: torch.Tensor, slot_abs: torch.Tensor,
               slot_rel: torch.Tensor, item_tokens: torch.Tensor) -> torch.Tensor:
        """Token embeddings of ``input_ids`` with ``item_tokens.view(-1, H)[slot_item]`` (+ SPAE cues)
        at the item slots (``kernels.inject_positions``; any layout: padded or packed)."""
        pos = self.positions if self.positions is not None else self._no_cues
        return pos.splice(input_ids, self.embed.weight, slot_item, slot_abs, slot_rel, item_tokens)

    def _batch_item_tokens(self, batch: PromptBatch) -> torch.Tensor | None:
        """:meth:`item_tokens` of the batch, or None when it has no item slot (no MoME, or text-only)."""
        if self.mome is None or batch.unique_items.numel() == 0:  # shape check only, no device sync
            return None
        return self.item_tokens(batch)

    def uses_packing(self, batch: PromptBatch) -> bool:
        """True when ``batch`` runs packed (packing on and the batch carries its packed form)."""
        return self.packing and batch.packed is not None

    def _inputs(self, batch: PromptBatch) -> tuple[tuple[Any, ...], dict]:
        """``((input_ids, slot_item, slot_abs, slot_rel, item_tokens), decoder kwargs)`` of ``batch`` in the
        layout it runs in: the packed row (+ :meth:`PackedBatch.model_kwargs`), or the padded batch (a
        padding mask only when it is left-padded: under a plain causal mask real tokens of a
        right-padded row never see its padding, and only real positions are read)."""
        items = self._batch_item_tokens(batch)
        if self.uses_packing(batch):
            pb = batch.packed
            return (pb.input_ids, *pb.extras, items), pb.model_kwargs()
        mask = None if batch.right_padded else batch.attention_mask
        return (batch.input_ids, batch.slot_item, batch.slot_abs, batch.slot_rel, items), {"attention_mask": mask}

    def decode(self, embeds: torch.Tensor, **decoder_kwargs: Any) -> torch.Tensor:
        """The decoder's last hidden states (after the final norm) for ``embeds``, ``use_cache=False``."""
        out = self.decoder(inputs_embeds=embeds, use_cache=False, **decoder_kwargs)
        return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]

    def hidden_states(self, batch: PromptBatch) -> torch.Tensor:
        """Decoder last hidden states (after the final norm).

        Padded: ``[B, L, H]``. Packed (:meth:`uses_packing`): ``[1, T, H]`` over the real tokens
        only, decoder run with ``use_cache=False`` and ``position_ids`` / ``cu_seq_lens`` /
        ``max_length`` from :meth:`PackedBatch.model_kwargs` (no device-to-host sync here).
        Use :meth:`flat_rows` to address answer / loss positions in either layout.
        """
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
        """
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
        from the cached catalogue (:meth:`MoME.encode_catalog`, computed once).
        """
        inputs, kw = self._inputs(batch)
        return self.score_inputs(*inputs, self.answer_rows(batch, self.uses_packing(batch)), batch.label_token_ids,
                                 **kw)

    def score_inputs(self, input_ids: torch.Tensor, slot_item: torch.Tensor, slot_abs: torch.Tensor,
                     slot_rel: torch.Tensor, item_tokens: torch.Tensor | None, rows: torch.Tensor,
                     label_token_ids: torch.Tensor, item_keys: torch.Tensor | None = None,
                     **decoder_kwargs: Any) -> torch.Tensor:
        """The scoring path on plain tensors, shared by :meth:`score` and
        :class:`~speeder_fast.model.static.StaticScorer`: :meth:`embed_inputs` -> :meth:`decode` -> the
        hidden states at flat rows ``rows`` (int64 ``[B]`` of ``hidden.reshape(-1, H)``) ->
        :meth:`answer_scores` (``[B, N]`` label logits, or ``[B, n_items]`` item scores), fp32."""
        h = self.decode(self.embed_inputs(input_ids, slot_item, slot_abs, slot_rel, item_tokens), **decoder_kwargs)
        return self.answer_scores(h.reshape(-1, h.shape[-1]).index_select(0, rows), label_token_ids, item_keys)

    def answer_scores(self, last: torch.Tensor, label_token_ids: torch.Tensor,
                      item_keys: torch.Tensor | None = None) -> torch.Tensor:
        """Scores from answer-position hidden states ``last [B, H]``: item scores ``[B, n_items]``
        (item mode; ``item_keys`` defaults to :meth:`catalog_keys`) or label logits ``[B, N]``."""
        if self.item_head is not None:
            return self.item_head.scores(last, self.catalog_keys() if item_keys is None else item_keys)
        return self.label_logits_at(last, label_token_ids)

    # ------------------------------------------------------------------ next-item head
    def item_keys_of(self, items: torch.Tensor) -> torch.Tensor:
        """fp32 head vectors ``[U, H]`` of ``items`` (int64 ``[U]``), with gradient to the MoME."""
        return self.item_head.keys(self.mome.encode(items))

    @torch.no_grad()
    def catalog_keys(self) -> torch.Tensor:
        """fp32 head vectors of every item ``[n_items, H]`` from the cached MRC catalogue (recomputed
        only when the catalogue is: after ``train()``, a stage change or loading weights)."""
        src = self.mome.encode_catalog()
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
            keys = self.item_keys_of(torch.arange(n_items, device=q.device))
            return chunked_softmax_ce(q, keys, head.item_bias(), targets, st.chunk)
        neg, log_q = st.sample(n_items, q.device)
        return sampled_softmax_ce(q, self.item_keys_of(targets), head.item_bias(targets), self.item_keys_of(neg),
                                  head.item_bias(neg), log_q, targets, neg)

    @torch.no_grad()
    def generate(self, batch: PromptBatch, max_new_tokens: int, eos_token_id: int, pad_token_id: int) -> torch.Tensor:
        """Greedy continuation [B, T] of left-padded prompts (build them with ``padding_side='left'``)."""
        embeds = self.input_embeds(batch)
        out = self.llm.generate(
            inputs_embeds=embeds,
            attention_mask=batch.attention_mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=1,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
        )
        return out

    # ------------------------------------------------------------------ stages and checkpoints
    def set_stage(self, modalities: Sequence[str]) -> None:
        if self.mome is not None:
            self.mome.set_active(modalities)

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Everything a run trains: LoRA weights, MoME (experts, gate, LN), SPAE tables."""
        sd: dict[str, torch.Tensor] = {}
        for n, p in self.llm.named_parameters():
            if "lora_" in n:
                sd[f"llm.{n}"] = p.detach()
        for prefix, mod in (("mome", self.mome), ("positions", self.positions), ("item_head", self.item_head)):
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
        if self.mome is not None:
            self.mome._catalog = None
        self._keys_src = self._keys = None


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
