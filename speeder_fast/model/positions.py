"""SPAE: absolute history-position and relative recency embeddings, spliced with the item tokens.

History item ``i`` of a length-``n`` history (``i = 0`` oldest) gets, on each of its ``k`` soft
tokens, ``abs_table[i] + rel_table[n - 1 - i]`` added to its MRC token. Candidates get neither.
The splice itself is one vectorised op over the whole batch,
:func:`speeder_fast.kernels.inject_positions` (embedding lookup at text positions, item token +
position cues at slots): no per-sample loop, no host synchronisation.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from speeder_fast import kernels


class SPAE(nn.Module):
    """Learned absolute [P, H] and relative [P, H] position tables (either can be switched off).

    Args:
        hidden_size: H.
        max_positions: P (>= the longest history).
        absolute / relative: which tables exist.
        init_std: standard deviation of the (small) initial values.
        abs_scale: multiplier of the absolute embedding in the splice.
        kernels_force: ``auto`` | ``triton`` | ``torch`` (``model.use_kernels``).
    """

    def __init__(
        self,
        hidden_size: int,
        max_positions: int,
        absolute: bool = True,
        relative: bool = True,
        init_std: float = 0.02,
        abs_scale: float = 1.0,
        kernels_force: str = "auto",
    ) -> None:
        super().__init__()
        self.kernels_force = kernels_force
        self.abs_scale = float(abs_scale)
        self.abs_table = nn.Parameter(torch.randn(max_positions, hidden_size) * init_std) if absolute else None
        self.rel_table = nn.Parameter(torch.randn(max_positions, hidden_size) * init_std) if relative else None

    def splice(
        self,
        input_ids: torch.Tensor,
        embed_table: torch.Tensor,
        slot_item: torch.Tensor,
        slot_abs: torch.Tensor,
        slot_rel: torch.Tensor,
        item_tokens: torch.Tensor,
    ) -> torch.Tensor:
        """Input embeddings [B, L, H] in ``embed_table``'s dtype (see module docstring)."""
        dt = embed_table.dtype
        return kernels.inject_positions(
            input_ids,
            embed_table,
            slot_item,
            slot_abs,
            slot_rel,
            item_tokens.to(dt),
            None if self.abs_table is None else self.abs_table.to(dt),
            None if self.rel_table is None else self.rel_table.to(dt),
            abs_scale=self.abs_scale,
            force=self.kernels_force,
        )

