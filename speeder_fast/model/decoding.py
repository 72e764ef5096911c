"""Greedy decoding with a KV cache: plain (the LLaRA protocol) and constrained to candidate titles.

One loop serves both, for every paradigm (the prompt's soft tokens only enter through the prefill's
input embeddings):

1. **Prefill**: one decoder forward over the prompts (from the prefix KV cache when the model has
   one, :mod:`.prefix_cache`), filling a transformers ``DynamicCache``; the hidden state at each
   row's last prompt token gives the first answer token.
2. **Steps**: the chosen tokens are fed back one per row (``[B, 1]`` inputs, a 2-D key mask that
   hides padding, explicit position ids), until every row has finished.

Layouts: right-padded prompts (every prompt at column 0; padding keys stay in the cache, masked
from the first step on) and left-padded prompts (HF's layout; positions from the mask's cumsum).
With the prefix cache, a left-padded batch is rearranged on the device to ``[prefix | padding |
rest]``: the suffix keeps its columns, the prefix moves to columns ``0..P-1``, positions and the
attended key sets are those of the original prompt, so the result equals the uncached path.

**Plain** (``sequences=None``): argmax over the full vocabulary, a row stops at eos; the same tokens
as HF ``generate(do_sample=False)`` (tested).

**Constrained** (``sequences [B, N, S]``: each row's candidate answers, token ids + eos, ``-1``
padded): a batched walk down each row's prefix trie. The trie node after ``s`` decoded tokens is the
set of *alive* candidates (those whose first ``s`` tokens equal the decoded ones); its children are
their next tokens ``sequences[b, alive, s]``. Only those tokens' logits are computed (the LM-head
rows of ``[B, N]`` ids, :meth:`SpeederRecModel.token_logits_at`), every other token is masked
(never emitted); the argmax is emitted, the candidates that do not continue with it die, and a row
stops as soon as one candidate is alive (the first prefix that names exactly one candidate), or
when an eos was chosen (several candidates with identical sequences: the first is taken, counted in
``DecodeResult.ties``). No Python loop over examples or vocabulary: each step is a few ``[B, N]``
tensor ops. Ties between equal logits of different tokens go to the first candidate in candidate
order (argmax over the full vocabulary would take the lowest token id; equal fp32 logits do not
happen in practice).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .prefix_cache import new_cache

__all__ = ["DecodeResult", "greedy_decode"]


@dataclass
class DecodeResult:
    """Output of :func:`greedy_decode` (all on the model's device).

    Attributes:
        tokens: int64 ``[B, T]`` emitted tokens, ``pad_id`` after a row finished (plain mode: eos is
            emitted and kept; constrained: the decoded prefix of the chosen candidate).
        n_decoded: int64 ``[B]`` tokens chosen per row (plain: up to and including eos, or the cap;
            constrained: up to and including the token that made the candidate unique, 0 when a row
            has one candidate).
        choice: int64 ``[B]`` index of the chosen candidate (constrained), else None.
        ties: bool ``[B]``: the decoded sequence ended (eos) with several candidates alive, i.e.
            identical answer sequences (constrained), else None.
    """

    tokens: torch.Tensor
    n_decoded: torch.Tensor
    choice: torch.Tensor | None = None
    ties: torch.Tensor | None = None


def _prefill(model: Any, batch: Any) -> tuple[torch.Tensor, Any, torch.Tensor, torch.Tensor]:
    """Run the prompts once, filling a KV cache.

    Returns ``(h [B, H], cache, key_mask [B, L] int64, next_pos [B])``: the last prompt token's final
    hidden state, the cache (``L`` columns), which cached columns are real tokens, and the position of
    the first generated token.
    """
    B, L = batch.input_ids.shape
    mask = batch.attention_mask
    dev = batch.input_ids.device
    pkv = None
    if model.prefix_cache and batch.prefix and not model.training and not torch.is_grad_enabled():
        pkv = model.prefix_kv(batch.prefix)
    if batch.right_padded:
        # every prompt starts at column 0: causal attention without a mask is exact at real positions
        s0 = pkv.length if pkv is not None else 0
        cols = slice(s0, None)
        if L > s0:
            embeds = model.embed_inputs(batch.input_ids[:, cols], batch.slot_item[:, cols], batch.slot_abs[:, cols],
                                        batch.slot_rel[:, cols], model.batch_item_tokens(batch), batch.unique_items)
            cache = pkv.cache(B) if pkv is not None else new_cache(model._decoder_config())
            h = model.decode(embeds, cache, position_ids=torch.arange(s0, L, device=dev)[None])
            h = torch.cat([pkv.hidden.expand(B, -1, -1).to(h.dtype), h], 1) if pkv is not None else h
        else:  # prompts are the prefix only
            cache, h = pkv.cache(B), pkv.hidden.expand(B, -1, -1)
        last = h[torch.arange(B, device=dev), batch.answer_pos]
        return last, cache, mask, batch.answer_pos + 1
    ids, slot_item, slot_abs, slot_rel = batch.input_ids, batch.slot_item, batch.slot_abs, batch.slot_rel
    s0 = 0
    if pkv is not None:  # left padding: [pad | prefix | rest] -> [prefix | pad | rest], rest in place
        s0 = P = pkv.length
        mask = torch.cat([torch.ones_like(mask[:, :P]), mask[:, : L - P]], 1)
        pad = ~mask[:, P:].bool()
        ids = ids[:, P:].masked_fill(pad, 0)  # any valid id: masked from every query
        slot_item, slot_abs, slot_rel = (x[:, P:].masked_fill(pad, -1) for x in (slot_item, slot_abs, slot_rel))
    pos = (mask.cumsum(1) - 1).clamp(min=0)  # HF's positions: 0 at each row's first real token
    embeds = model.embed_inputs(ids, slot_item, slot_abs, slot_rel, model.batch_item_tokens(batch), batch.unique_items)
    cache = pkv.cache(B) if pkv is not None else new_cache(model._decoder_config())
    h = model.decode(embeds, cache, attention_mask=mask, position_ids=pos[:, s0:])
    return h[:, -1], cache, mask, pos[:, -1] + 1


@torch.no_grad()
def greedy_decode(model: Any, batch: Any, max_new_tokens: int, eos_id: int, pad_id: int,
                  sequences: torch.Tensor | None = None) -> DecodeResult:
    """Greedy decoding of ``batch`` (a :class:`~speeder_fast.model.prompts.PromptBatch` without
    answers, on the model's device; left or right padded) by ``model`` (a ``SpeederRecModel``).

    Args:
        max_new_tokens: cap of the plain mode (ignored when constrained: bounded by ``S``).
        eos_id / pad_id: end-of-sequence id (plain mode stops a row there) and the filler of
            finished rows.
        sequences: None (plain), or int64 ``[B, N, S]`` candidate answer ids, ``-1`` padded, each
            ending with ``eos_id`` (constrained; see the module docstring).

    Returns:
        :class:`DecodeResult`.

    Raises:
        ValueError: ``sequences`` of the wrong shape.
    """
    model.eval()
    B = batch.input_ids.shape[0]
    dev = batch.input_ids.device
    constrained = sequences is not None
    if constrained:
        if sequences.dim() != 3 or sequences.shape[0] != B:
            raise ValueError(f"sequences must be [B={B}, N, S], got {tuple(sequences.shape)}")
        sequences = sequences.to(dev)
        alive = sequences[:, :, 0] >= 0  # [B, N]
        done = alive.sum(1) <= 1
        limit = sequences.shape[2]
    else:
        done = torch.zeros(B, dtype=torch.bool, device=dev)
        limit = int(max_new_tokens)
    n_dec = torch.zeros(B, dtype=torch.long, device=dev)
    out: list[torch.Tensor] = []
    if limit > 0 and not bool(done.all()):
        h, cache, mask, pos = _prefill(model, batch)
        rows = torch.arange(B, device=dev)
        for s in range(limit):
            if constrained:
                tok = sequences[:, :, s]  # [B, N]: each candidate's next token
                allowed = alive & (tok >= 0)
                logits = model.token_logits_at(h, tok.clamp(min=0)).masked_fill(~allowed, float("-inf"))
                chosen = tok[rows, logits.argmax(1)]
            else:
                chosen = model._head(h).argmax(-1)
            active = ~done
            emitted = torch.where(active, chosen, torch.full_like(chosen, pad_id))
            out.append(emitted)
            n_dec += active.long()
            if constrained:
                alive = torch.where(active[:, None], alive & (tok == chosen[:, None]), alive)
                done = done | (alive.sum(1) <= 1) | (chosen == eos_id)
            else:
                done = done | (chosen == eos_id)
            if s + 1 >= limit or bool(done.all()):  # one host read per step: stop as soon as all rows are done
                break
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
            embeds = model.embed(emitted.clamp(min=0))[:, None]
            h = model.decode(embeds, cache, attention_mask=mask, position_ids=(pos + s)[:, None])[:, -1]
    tokens = torch.stack(out, 1) if out else torch.zeros(B, 0, dtype=torch.long, device=dev)
    if not constrained:
        return DecodeResult(tokens, n_dec)
    choice = alive.long().argmax(1)
    return DecodeResult(tokens, n_dec, choice, alive.sum(1) > 1)
