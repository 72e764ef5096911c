"""Prefix KV cache: the fixed instruction's keys/values computed once per model state.

Every prompt of a run starts with the same plain-text prefix (``PromptBuilder.head_ids``: the
``system`` / ``item_instruction`` text and the history header; soft tokens never sit there), so its
keys and values in every decoder layer are the same for every example. :class:`PrefixKV` holds them
(``[1, Hkv, P, D]`` per layer) with the prefix's final hidden states (``[1, P, H]``); the decoder
then runs only on the rest of each prompt (the *suffix*), with position ids starting at ``P`` and a
transformers ``DynamicCache`` pre-filled with the prefix K/V broadcast over the batch
(:meth:`PrefixKV.cache`). The cache's ``update`` concatenates prefix and suffix keys in every layer,
so the attention kernels see exactly the keys of the uncached forward.

Layouts (all tested equal to the uncached path to fp32 tolerance, ``tests/test_prefix_cache.py``):

* right-padded batches (scoring, training, the next-item head): every row starts at column 0 with
  the prefix, so one ``[1, P]`` prefix serves the batch; no padding mask is needed (causal);
* packed rows: the prefix tokens of every example are dropped from the packed row, the suffix row
  keeps per-example ``cu_seq_lens_q`` and gets ``cu_seq_lens_k = cu_seq_lens_q + P * i`` (every
  example's keys are the prefix followed by its suffix); :mod:`.attention` recognises ``Lk = P + T``
  keys for a ``T``-token packed query row (``speeder_varlen*`` implementations only: transformers'
  own ``sdpa`` / ``eager`` cannot mix packing and a cache);
* generation (:mod:`.decoding`): right padding as above; left padding is rearranged on the device
  to ``[prefix | padding | suffix]`` with an explicit mask and positions;
* static / compiled scoring (:class:`~speeder_fast.model.static.StaticScorer`): the prefix tensors
  are inputs of the compiled function (one graph, no breaks).

Validity: K/V depend only on the LLM weights (base, LoRA, embedding rows) and the prefix ids. The
model drops its cached prefixes on ``train()`` / ``eval()``, on
:meth:`~speeder_fast.model.llm.SpeederRecModel.load_trainable_state_dict` and whenever an LLM
parameter changed in place (tensor version counters: an optimizer step, ``load_state_dict``,
``copy_``), so a stale cache is never served. What it cannot see: a write through ``param.data``
(no version bump) or parameters replaced by new objects; call ``model.invalidate_caches()`` after
either.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch


def cache_kwarg(decoder: torch.nn.Module) -> str:
    """Name of the decoder's cache argument: ``cache`` (transformers >= 5.2x) or ``past_key_values``."""
    params = inspect.signature(type(decoder).forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def new_cache(config: Any) -> Any:
    """An empty transformers ``DynamicCache`` for a model with ``config``."""
    from transformers import DynamicCache

    try:
        return DynamicCache(config=config)
    except TypeError:  # pragma: no cover - older signature
        return DynamicCache()


def cache_layers(cache: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``[(keys, values)]`` per layer of a filled ``DynamicCache`` (``[B, Hkv, S, D]`` each)."""
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers]
    return list(zip(cache.key_cache, cache.value_cache))  # pragma: no cover - transformers < 4.56


@dataclass
class PrefixKV:
    """Keys/values of one shared prompt prefix.

    Attributes:
        ids: the prefix token ids (host tuple, ``P`` of them).
        keys / values: per decoder layer, ``[1, Hkv, P, D]`` in the compute dtype (RoPE applied at
            positions ``0..P-1``; detached unless computed with gradients for a training step).
        hidden: ``[1, P, H]`` final (normed) hidden states of the prefix positions: the uncached
            forward's output rows there, so callers keep indexing the full ``[B, L, H]`` layout.
        config: the decoder config (to build caches).
    """

    ids: tuple[int, ...]
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    hidden: torch.Tensor
    config: Any

    @property
    def length(self) -> int:
        """P, the number of prefix tokens."""
        return len(self.ids)

    def cache(self, batch: int) -> Any:
        """A fresh ``DynamicCache`` holding the prefix K/V broadcast to ``batch`` rows (a view
        until the first layer update concatenates the suffix keys)."""
        c = new_cache(self.config)
        for i, (k, v) in enumerate(zip(self.keys, self.values)):
            c.update(k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1), i)
        return c


def compute_prefix(decoder: torch.nn.Module, embed: torch.nn.Module, config: Any, ids: tuple[int, ...]) -> PrefixKV:
    """Run ``decoder`` once on the prefix ``ids`` (``[1, P]``, positions ``0..P-1``) and keep its
    per-layer keys/values and final hidden states. Gradients flow when grad mode is on."""
    dev = embed.weight.device
    x = torch.as_tensor(ids, dtype=torch.long, device=dev)[None]
    cache = new_cache(config)
    out = decoder(inputs_embeds=embed(x), position_ids=torch.arange(len(ids), device=dev)[None],
                  use_cache=True, **{cache_kwarg(decoder): cache})
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    kv = cache_layers(cache)
    return PrefixKV(tuple(int(i) for i in ids), [k for k, _ in kv], [v for _, v in kv], hidden, config)


def suffix_packing(cu: torch.Tensor, n_prefix: int, n_tokens: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Drop the first ``n_prefix`` tokens of every example of a packed row.

    Args:
        cu: int32 ``[B + 1]`` cumulative lengths of the packed row (every example >= ``n_prefix``).
        n_prefix: P.
        n_tokens: T = ``cu[-1]`` as a host int (the packed row's length; no device read).

    Returns:
        ``(src [T - B*P], cu_q [B + 1], prefix_rows [B*P])``: packed indices of the suffix tokens, the
        suffix row's cumulative lengths (int32), and the packed indices of the prefix tokens. All
        computed on ``cu``'s device without a host sync.
    """
    b = cu.shape[0] - 1
    cul = cu.long()
    steps = torch.arange(b + 1, device=cu.device)
    cu_q = cul - n_prefix * steps
    t_suffix = n_tokens - b * n_prefix
    j = torch.arange(t_suffix, device=cu.device)
    seg = torch.searchsorted(cu_q[1:], j, right=True)
    src = cul[seg] + n_prefix + (j - cu_q[seg])
    prefix_rows = (cul[:-1, None] + torch.arange(n_prefix, device=cu.device)[None]).reshape(-1)
    return src, cu_q.to(torch.int32), prefix_rows
