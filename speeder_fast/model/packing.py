"""Padding-free packing of variable-length examples.

A padded batch ``[B, L]`` wastes compute on padding (prompts here vary by tens of tokens). Packing
concatenates the real tokens of all examples into one row ``[1, T]`` (``T = sum(lengths)``) and
records where each example starts (``cu_seqlens``), so that a varlen attention kernel (see
:mod:`speeder_fast.model.attention`) keeps the examples apart and every linear layer runs on
``T`` rows instead of ``B * L``.

Everything here is meant to run at **collate time on the CPU**: the index arrays, ``max_seqlen``
(a Python int) and the answer-position maps are built once per batch from host tensors, then the
:class:`PackedBatch` is moved to the GPU with :meth:`PackedBatch.to`. The model never has to read a
length back from the device, so the packed forward does no host sync of its own (transformers'
``create_causal_mask`` still does one packed-sequence check per forward; see ``docs/fastpath.md``).

Conventions: ``attention_mask`` is 1 on real tokens and 0 on padding, left, right or anywhere; the
real tokens of each row are kept in order. Per-example positions (``answer_pos``) are counted from
the example's first real token (for right padding that is the padded position too).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

__all__ = [
    "PackedBatch",
    "pack_padded",
]


@dataclass
class PackedBatch:
    """One packed batch: ``B`` examples, ``T`` real tokens in total, laid out as one row.

    Attributes:
        input_ids: ``[1, T]`` token ids (or whatever the first packed tensor was).
        position_ids: ``[1, T]`` int64, restarting at 0 for every example (RoPE positions).
        cu_seqlens: ``[B + 1]`` int32 cumulative lengths (``cu_seqlens[i]`` = first packed index of
            example ``i``; ``cu_seqlens[-1] == T``), the flash-attn / ``varlen_attn`` layout.
        max_seqlen: longest example, a host-side Python int (computed once at collate time).
        seq_index: ``[T]`` int64, which example each packed token belongs to.
        lengths: ``[B]`` int64 real lengths.
        flat_index: ``[T]`` int64 index of each packed token in the flattened padded ``[B * L]``
            layout (used by :meth:`unpack` / :meth:`pack_like`).
        padded_to_packed: ``[B, L]`` int64 map from padded position to packed index (``-1`` on
            padding).
        extras: further ``[1, T]`` tensors packed alongside ``input_ids`` (labels, item-slot ids...).
        padded_shape: ``(B, L)`` of the padded source.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int
    seq_index: torch.Tensor
    lengths: torch.Tensor
    flat_index: torch.Tensor
    padded_to_packed: torch.Tensor
    extras: tuple[torch.Tensor, ...] = field(default_factory=tuple)
    padded_shape: tuple[int, int] = (0, 0)

    @property
    def num_examples(self) -> int:
        return int(self.lengths.shape[0])

    @property
    def num_tokens(self) -> int:
        return int(self.seq_index.shape[0])

    def to(self, device: torch.device | str, non_blocking: bool = True) -> "PackedBatch":
        """Copy every tensor to ``device`` (``max_seqlen`` stays a host int)."""

        def mv(t: torch.Tensor) -> torch.Tensor:
            return t.to(device, non_blocking=non_blocking)

        return replace(
            self,
            input_ids=mv(self.input_ids),
            position_ids=mv(self.position_ids),
            cu_seqlens=mv(self.cu_seqlens),
            seq_index=mv(self.seq_index),
            lengths=mv(self.lengths),
            flat_index=mv(self.flat_index),
            padded_to_packed=mv(self.padded_to_packed),
            extras=tuple(mv(e) for e in self.extras),
        )

    def pin_memory(self) -> "PackedBatch":
        """Pinned copies (for ``non_blocking`` host-to-device transfers from a DataLoader)."""
        return replace(
            self,
            input_ids=self.input_ids.pin_memory(),
            position_ids=self.position_ids.pin_memory(),
            cu_seqlens=self.cu_seqlens.pin_memory(),
            seq_index=self.seq_index.pin_memory(),
            lengths=self.lengths.pin_memory(),
            flat_index=self.flat_index.pin_memory(),
            padded_to_packed=self.padded_to_packed.pin_memory(),
            extras=tuple(e.pin_memory() for e in self.extras),
        )

    def model_kwargs(self) -> dict:
        """Keyword arguments for a transformers decoder forward on the packed row.

        ``position_ids`` drive RoPE; ``cu_seq_lens_q/k`` and ``max_length_q/k`` are transformers'
        ``FlashAttentionKwargs`` names, so the same dict works with ``speeder_varlen*`` and with
        HF's own ``flash_attention_2``; HF ``sdpa``/``eager`` recover the boundaries from
        ``position_ids``. No ``attention_mask`` is passed: there is no padding.
        """
        return {
            "position_ids": self.position_ids,
            "cu_seq_lens_q": self.cu_seqlens,
            "cu_seq_lens_k": self.cu_seqlens,
            "max_length_q": self.max_seqlen,
            "max_length_k": self.max_seqlen,
        }

    def pack_positions(self, pos: torch.Tensor) -> torch.Tensor:
        """Packed index of per-example position ``pos[b]`` (counted from example ``b``'s first
        real token): ``cu_seqlens[:-1] + pos``. Works for ``pos`` of shape ``[B]`` or ``[B, K]``.
        """
        starts = self.cu_seqlens[:-1].to(device=pos.device, dtype=torch.long)
        return (starts.view(-1, *([1] * (pos.dim() - 1))) + pos.long())

    def last_positions(self) -> torch.Tensor:
        """Packed index of the last real token of every example, ``[B]`` (``cu_seqlens[1:] - 1``)."""
        return self.cu_seqlens[1:].long() - 1

    def padded_positions_to_packed(self, pos: torch.Tensor) -> torch.Tensor:
        """Packed index of padded-layout position ``pos[b]`` (``[B]`` or ``[B, K]``); ``-1`` where
        that padded position is padding."""
        rows = torch.arange(pos.shape[0], device=pos.device).view(-1, *([1] * (pos.dim() - 1)))
        return self.padded_to_packed.to(pos.device)[rows.expand_as(pos), pos.long()]

    def unpack(self, x: torch.Tensor, fill: float | int = 0) -> torch.Tensor:
        """Scatter a packed ``[1, T, ...]`` (or ``[T, ...]``) tensor back to padded ``[B, L, ...]``,
        with ``fill`` at padding."""
        if x.dim() >= 2 and x.shape[0] == 1 and x.shape[1] == self.num_tokens:
            x = x[0]
        if x.dim() == 0 or x.shape[0] != self.num_tokens:
            raise ValueError(f"unpack: expected {self.num_tokens} packed rows, got shape {tuple(x.shape)}")
        b, length = self.padded_shape
        out = x.new_full((b * length, *x.shape[1:]), fill)
        out = out.index_copy(0, self.flat_index.to(x.device), x)
        return out.view(b, length, *x.shape[1:])

    def pack_like(self, x: torch.Tensor) -> torch.Tensor:
        """Gather a padded ``[B, L, ...]`` tensor into packed ``[1, T, ...]`` (real tokens only)."""
        b, length = self.padded_shape
        if tuple(x.shape[:2]) != (b, length):
            raise ValueError(f"pack_like: expected leading shape {(b, length)}, got {tuple(x.shape)}")
        flat = x.reshape(b * length, *x.shape[2:])
        return flat.index_select(0, self.flat_index.to(x.device)).unsqueeze(0)


def _check_2d(name: str, t: torch.Tensor, shape: tuple[int, ...] | None = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"pack_padded: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 2:
        raise ValueError(f"pack_padded: {name} must be 2-D [B, L], got shape {tuple(t.shape)}")
    if shape is not None and tuple(t.shape) != shape:
        raise ValueError(f"pack_padded: {name} has shape {tuple(t.shape)}, expected {shape} like input_ids")


def pack_padded(input_ids: torch.Tensor, attention_mask: torch.Tensor, *extra: torch.Tensor) -> PackedBatch:
    """Pack a padded batch into one padding-free row.

    Args:
        input_ids: ``[B, L]`` token ids (any dtype; packed as is).
        attention_mask: ``[B, L]`` with 1 on real tokens and 0 on padding (bool or integer).
        *extra: more ``[B, L]`` tensors to pack the same way (labels, slot ids, ...), returned in
            :attr:`PackedBatch.extras` in the same order.

    Returns:
        A :class:`PackedBatch`. Intended for host tensors at collate time: on a GPU tensor the
        ``nonzero`` and ``max`` here synchronise.

    Raises:
        ValueError: on shape mismatches, a mask that is not 0/1, or an example with no real token.
    """
    _check_2d("input_ids", input_ids)
    shape = tuple(input_ids.shape)
    _check_2d("attention_mask", attention_mask, shape)
    for i, e in enumerate(extra):
        _check_2d(f"extra[{i}]", e, shape)
    b, length = shape
    if attention_mask.dtype != torch.bool:
        bad = (attention_mask != 0) & (attention_mask != 1)
        if bool(bad.any()):
            r, c = (int(v) for v in bad.nonzero()[0])
            raise ValueError(f"pack_padded: attention_mask must be 0/1, got {attention_mask[r, c].item()} at [{r}, {c}]")
    mask = attention_mask.bool()
    lengths = mask.sum(dim=1)
    empty = (lengths == 0).nonzero()
    if empty.numel():
        raise ValueError(f"pack_padded: example {int(empty[0, 0])} has no real token (all padding)")
    flat_index = mask.reshape(-1).nonzero().squeeze(1)  # [T], row-major => examples in order
    cu = torch.zeros(b + 1, dtype=torch.int32, device=mask.device)
    cu[1:] = torch.cumsum(lengths, 0).to(torch.int32)
    seq_index = torch.repeat_interleave(torch.arange(b, device=mask.device), lengths)
    t = int(flat_index.shape[0])
    position_ids = torch.arange(t, device=mask.device) - cu[:-1].long()[seq_index]
    padded_to_packed = torch.full((b * length,), -1, dtype=torch.long, device=mask.device)
    padded_to_packed[flat_index] = torch.arange(t, device=mask.device)

    def pk(x: torch.Tensor) -> torch.Tensor:
        return x.reshape(-1).index_select(0, flat_index).unsqueeze(0)

    return PackedBatch(
        input_ids=pk(input_ids),
        position_ids=position_ids.unsqueeze(0),
        cu_seqlens=cu,
        max_seqlen=int(lengths.max()),
        seq_index=seq_index,
        lengths=lengths.long(),
        flat_index=flat_index,
        padded_to_packed=padded_to_packed.view(b, length),
        extras=tuple(pk(e) for e in extra),
        padded_shape=(b, length),
    )
