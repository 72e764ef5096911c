"""Custom Triton kernels of speeder_fast, with a single dispatch point per kernel.

* :func:`mome_combine` -- masked gating of modality experts + weighted mix + output LayerNorm
  (``mome.py``, reference :func:`mome_combine_reference`).
* :func:`inject_positions` -- SPAE position cues added to item tokens, spliced into the text
  embeddings (``inject.py``, reference :func:`inject_positions_reference`).

``force``: ``"auto"`` runs Triton for CUDA tensors of a supported dtype (fp16/bf16/fp32) and the torch
reference otherwise; ``"triton"`` always runs Triton (CPU tensors need ``TRITON_INTERPRET=1``, as in
the tests); ``"torch"`` always runs the reference. Both paths are differentiable and work under
``torch.compile`` (the Triton launchers are ``torch.library`` custom ops with fake impls).
"""

from __future__ import annotations

from typing import Optional

import torch

from ._common import FORCE_CHOICES, HAS_TRITON, TRITON_DTYPES, poison_outputs
from .inject import (
    InjectPositionsFunction,
    inject_positions_reference,
    inject_positions_triton,
    segment_sum_triton,
)
from .mome import MomeCombineFunction, masked_gate_weights, mome_combine_reference, mome_combine_triton

__all__ = [
    "HAS_TRITON",
    "InjectPositionsFunction",
    "MomeCombineFunction",
    "inject_positions",
    "inject_positions_reference",
    "inject_positions_triton",
    "masked_gate_weights",
    "mome_combine",
    "mome_combine_reference",
    "mome_combine_triton",
    "poison_outputs",
    "segment_sum_triton",
    "use_triton",
]


def use_triton(force: str, *tensors: torch.Tensor) -> bool:
    """Resolve a ``force`` value (``auto`` / ``triton`` / ``torch``) for the given floating tensors."""
    if force not in FORCE_CHOICES:
        raise ValueError(f"force must be one of {FORCE_CHOICES}, got {force!r}")
    if force == "triton":
        return True
    if force == "torch":
        return False
    return HAS_TRITON and all(t.is_cuda and t.dtype in TRITON_DTYPES for t in tensors)


def mome_combine(
    expert_out: torch.Tensor,
    gate_logits: torch.Tensor,
    mask: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    eps: float = 1e-5,
    force: str = "auto",
) -> torch.Tensor:
    """MoME combine: ``[N, M, k, H]`` experts, ``[N, M, G]`` gates, ``[N, M]`` mask -> ``[N, k, H]``.

    See :func:`mome_combine_reference` for the exact semantics.
    """
    if use_triton(force, expert_out, gate_logits, ln_weight, ln_bias):
        return mome_combine_triton(expert_out, gate_logits, mask, ln_weight, ln_bias, eps)
    return mome_combine_reference(expert_out, gate_logits, mask, ln_weight, ln_bias, eps)


def inject_positions(
    input_ids: torch.Tensor,
    embed_table: torch.Tensor,
    slot_item: torch.Tensor,
    slot_abs: torch.Tensor,
    slot_rel: torch.Tensor,
    item_tokens: torch.Tensor,
    abs_table: Optional[torch.Tensor] = None,
    rel_table: Optional[torch.Tensor] = None,
    abs_scale: float = 1.0,
    force: str = "auto",
) -> torch.Tensor:
    """Embedding lookup with item tokens (+ position cues) spliced in at slot positions.

    See :func:`inject_positions_reference` for the exact semantics.
    """
    floats = [t for t in (embed_table, item_tokens, abs_table, rel_table) if t is not None]
    if use_triton(force, *floats):
        return inject_positions_triton(
            input_ids, embed_table, slot_item, slot_abs, slot_rel, item_tokens, abs_table, rel_table, abs_scale
        )
    return inject_positions_reference(
        input_ids, embed_table, slot_item, slot_abs, slot_rel, item_tokens, abs_table, rel_table, abs_scale
    )
