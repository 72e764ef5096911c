"""Position-cue injection + embedding splice (SPAE cues added to MRC item tokens, spliced into text).

Reference it must match: :func:`inject_positions_reference` in this file (pure torch)::

    out[p] = embed_table[input_ids[p]]                                   if slot_item[p] < 0 (text)
    out[p] = item_tokens.view(-1, H)[slot_item[p]]
             + abs_scale * abs_table[slot_abs[p]]   (if abs_table is not None and slot_abs[p] >= 0)
             + rel_table[slot_rel[p]]               (if rel_table is not None and slot_rel[p] >= 0)
                                                                         if slot_item[p] >= 0 (item)

``input_ids`` is ``[B, L]`` or packed ``[T]``; the slot tensors have the same shape (int64, -1 = none);
output ``input_ids.shape + (H,)`` in ``item_tokens.dtype``, math in fp32. Position cues at text
positions are ignored (cues only decorate item slots). The ids at item slots are never read
(placeholder ids may be out of the vocabulary). Text ids must be valid rows of ``embed_table``.

Triton design:

* forward: each program handles ``BLOCK_P`` positions x ``BLOCK_H`` features (looping over H chunks
  when H > 4096); text rows gather from the embedding table, item rows gather item / abs / rel rows;
  both gathers are masked loads, so each output row reads exactly one source row (+ cue rows).
* backward (scatter-add of the output gradient into item / abs / rel rows; several positions may
  target the same row): a **segmented reduction**, no atomics, deterministic. One small kernel
  writes, for every position, its target row in a single combined row space (item rows, then abs
  rows, then rel rows; a sentinel where it contributes nothing); the 3T int32 keys are sorted once
  (``torch.sort(stable=True)``, on device, no host sync); one program per target row finds its
  segment by binary search in the sorted keys, sums the gradient rows in fp32 (times ``abs_scale``
  for abs rows) and writes the row (rows without any slot get exact zeros). So the whole backward
  is 2 Triton launches + 1 sort. The embedding gradient (only when ``embed_table.requires_grad``)
  uses the same reduction over text positions.

Eager calls skip the ``torch.library`` custom-op dispatch (host time); under ``torch.compile`` the
launchers run as opaque custom ops with fake implementations.
"""

from __future__ import annotations

from typing import Optional

import torch

from ._common import (
    HAS_TRITON,
    alloc,
    check_float_dtype,
    check_triton_device,
    eager_or_op,
    next_pow2,
    record_launch,
    tl,
    triton,
    warps_for,
)


# ----------------------------------------------------------------------------------------------
# pure-torch reference
# ----------------------------------------------------------------------------------------------
def inject_positions_reference(
    input_ids: torch.Tensor,
    embed_table: torch.Tensor,
    slot_item: torch.Tensor,
    slot_abs: torch.Tensor,
    slot_rel: torch.Tensor,
    item_tokens: torch.Tensor,
    abs_table: Optional[torch.Tensor],
    rel_table: Optional[torch.Tensor],
    abs_scale: float = 1.0,
) -> torch.Tensor:
    """Pure-torch injection + splice (the specification of the Triton kernel)."""
    _check_inputs(input_ids, embed_table, slot_item, slot_abs, slot_rel, item_tokens, abs_table, rel_table)
    h = item_tokens.shape[-1]
    ct = torch.float64 if item_tokens.dtype == torch.float64 else torch.float32
    ids = input_ids.reshape(-1)
    si = slot_item.reshape(-1)
    is_item = (si >= 0).unsqueeze(-1)
    items = item_tokens.reshape(-1, h)
    val = items[si.clamp(min=0)].to(ct)
    if abs_table is not None:
        sa = slot_abs.reshape(-1)
        use = is_item & (sa >= 0).unsqueeze(-1)
        val = val + abs_scale * torch.where(use, abs_table[sa.clamp(min=0)].to(ct), 0.0)
    if rel_table is not None:
        sr = slot_rel.reshape(-1)
        use = is_item & (sr >= 0).unsqueeze(-1)
        val = val + torch.where(use, rel_table[sr.clamp(min=0)].to(ct), 0.0)
    text_ids = torch.where(is_item.squeeze(-1), torch.zeros_like(ids), ids)  # placeholder ids never read
    text = embed_table[text_ids].to(ct)
    out = torch.where(is_item, val, text)
    return out.to(item_tokens.dtype).reshape(*input_ids.shape, h)


def _check_inputs(
    input_ids: torch.Tensor,
    embed_table: torch.Tensor,
    slot_item: torch.Tensor,
    slot_abs: torch.Tensor,
    slot_rel: torch.Tensor,
    item_tokens: torch.Tensor,
    abs_table: Optional[torch.Tensor],
    rel_table: Optional[torch.Tensor],
) -> None:
    op = "inject_positions"
    if input_ids.dim() not in (1, 2):
        raise ValueError(f"{op}: input_ids must be [B, L] or [T], got shape {tuple(input_ids.shape)}")
    for name, s in (("slot_item", slot_item), ("slot_abs", slot_abs), ("slot_rel", slot_rel)):
        if s.shape != input_ids.shape:
            raise ValueError(f"{op}: {name} shape {tuple(s.shape)} != input_ids shape {tuple(input_ids.shape)}")
        if s.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"{op}: {name} must be an integer tensor (int64), got {s.dtype}")
    if item_tokens.dim() != 3:
        raise ValueError(f"{op}: item_tokens must be [N, k, H], got shape {tuple(item_tokens.shape)}")
    h = item_tokens.shape[-1]
    if embed_table.dim() != 2 or embed_table.shape[1] != h:
        raise ValueError(f"{op}: embed_table must be [V, H={h}], got {tuple(embed_table.shape)}")
    for name, tab in (("abs_table", abs_table), ("rel_table", rel_table)):
        if tab is not None and (tab.dim() != 2 or tab.shape[1] != h):
            raise ValueError(f"{op}: {name} must be [rows, H={h}], got {tuple(tab.shape)}")


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------
if HAS_TRITON:

    @triton.jit
    def _inject_fwd_kernel(
        IDS,
        SLOT_ITEM,
        SLOT_ABS,
        SLOT_REL,
        EMB,
        ITEMS,
        ABS,
        REL,
        OUT,
        T,
        H,
        stride_emb,
        stride_items,
        stride_abs,
        stride_rel,
        abs_scale,
        HAS_ABS: tl.constexpr,
        HAS_REL: tl.constexpr,
        BLOCK_P: tl.constexpr,
        BLOCK_H: tl.constexpr,
    ):
        pid = tl.program_id(0)
        offs_p = pid.to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
        p_in = offs_p < T
        si = tl.load(SLOT_ITEM + offs_p, mask=p_in, other=-1).to(tl.int64)
        is_item = si >= 0
        is_text = p_in & (si < 0)
        ids = tl.load(IDS + offs_p, mask=is_text, other=0).to(tl.int64)
        if HAS_ABS:
            sa = tl.load(SLOT_ABS + offs_p, mask=is_item, other=-1).to(tl.int64)
            use_a = sa >= 0
        if HAS_REL:
            sr = tl.load(SLOT_REL + offs_p, mask=is_item, other=-1).to(tl.int64)
            use_r = sr >= 0
        for h0 in range(0, H, BLOCK_H):
            offs_h = h0 + tl.arange(0, BLOCK_H)
            h_in = offs_h < H
            hm = h_in[None, :]
            e = tl.load(EMB + ids[:, None] * stride_emb + offs_h[None, :], mask=is_text[:, None] & hm, other=0.0)
            v = tl.load(ITEMS + si[:, None] * stride_items + offs_h[None, :], mask=is_item[:, None] & hm, other=0.0)
            v = v.to(tl.float32)
            if HAS_ABS:
                a = tl.load(ABS + sa[:, None] * stride_abs + offs_h[None, :], mask=use_a[:, None] & hm, other=0.0)
                v += abs_scale * a.to(tl.float32)
            if HAS_REL:
                r = tl.load(REL + sr[:, None] * stride_rel + offs_h[None, :], mask=use_r[:, None] & hm, other=0.0)
                v += r.to(tl.float32)
            out = tl.where(is_item[:, None], v, e.to(tl.float32))
            tl.store(OUT + offs_p[:, None] * H + offs_h[None, :], out.to(OUT.dtype.element_ty), mask=p_in[:, None] & hm)

    @triton.jit
    def _lower_bound(KEYS, n_keys, target, n_iters):
        """First index i in the sorted KEYS[0:n_keys] with KEYS[i] >= target (scalar binary search)."""
        lo = target * 0
        hi = lo + n_keys
        for _ in range(n_iters):
            active = lo < hi
            mid = (lo + hi) // 2
            v = tl.load(KEYS + mid, mask=mid < n_keys, other=0)
            go_right = v < target
            lo = tl.where(active, tl.where(go_right, mid + 1, lo), lo)
            hi = tl.where(active, tl.where(go_right, hi, mid), hi)
        return lo

    @triton.jit
    def _build_keys_kernel(
        SLOT_ITEM,
        SLOT_ABS,
        SLOT_REL,
        KEYS,
        T,
        n_item_rows,
        abs_off,
        n_abs,
        rel_off,
        n_rel,
        sentinel,
        BLOCK: tl.constexpr,
    ):
        """KEYS[0:T] = item row, KEYS[T:2T] = abs_off + abs row, KEYS[2T:3T] = rel_off + rel row of
        each position (sentinel where the position contributes nothing: text, no cue, part disabled)."""
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        p_in = offs < T
        si = tl.load(SLOT_ITEM + offs, mask=p_in, other=-1).to(tl.int64)
        is_item = si >= 0
        sa = tl.load(SLOT_ABS + offs, mask=is_item, other=-1).to(tl.int64)
        sr = tl.load(SLOT_REL + offs, mask=is_item, other=-1).to(tl.int64)
        k_item = tl.where(si < n_item_rows, si, -1)
        k_abs = tl.where(sa < n_abs, sa, -1)
        k_rel = tl.where(sr < n_rel, sr, -1)
        k_item = tl.where(k_item >= 0, k_item, sentinel)
        k_abs = tl.where(k_abs >= 0, k_abs + abs_off, sentinel)
        k_rel = tl.where(k_rel >= 0, k_rel + rel_off, sentinel)
        tl.store(KEYS + offs, k_item.to(tl.int32), mask=p_in)
        tl.store(KEYS + T + offs, k_abs.to(tl.int32), mask=p_in)
        tl.store(KEYS + 2 * T + offs, k_rel.to(tl.int32), mask=p_in)

    @triton.jit
    def _segment_rows_kernel(
        SRC,
        SORTED_KEYS,
        PERM,
        OUT,
        n_keys,
        T,
        H,
        stride_src,
        n_iters,
        scale_lo,
        scale_hi,
        scale_val,
        BLOCK_J: tl.constexpr,
        BLOCK_H: tl.constexpr,
    ):
        """OUT[r, :] = scale(r) * sum_{j : SORTED_KEYS[j] == r} SRC[PERM[j] % T, :]  (fp32 accumulation).

        One program per output row; the segment bounds come from two binary searches in the sorted
        keys (no extra launches); scale(r) = scale_val for r in [scale_lo, scale_hi), else 1.
        Rows without any key get exact zeros (every row is written).
        """
        r = tl.program_id(0).to(tl.int64)
        start = _lower_bound(SORTED_KEYS, n_keys, r, n_iters)
        end = _lower_bound(SORTED_KEYS, n_keys, r + 1, n_iters)
        scale = tl.where(r >= scale_lo, tl.where(r < scale_hi, scale_val, 1.0), 1.0)
        for h0 in range(0, H, BLOCK_H):
            offs_h = h0 + tl.arange(0, BLOCK_H)
            h_in = offs_h < H
            acc = tl.zeros([BLOCK_J, BLOCK_H], dtype=tl.float32)
            for j0 in range(start, end, BLOCK_J):
                offs_j = j0 + tl.arange(0, BLOCK_J)
                j_in = offs_j < end
                p = tl.load(PERM + offs_j, mask=j_in, other=0).to(tl.int64) % T
                src = tl.load(SRC + p[:, None] * stride_src + offs_h[None, :], mask=j_in[:, None] & h_in[None, :], other=0.0)
                acc += src.to(tl.float32)
            res = tl.sum(acc, axis=0) * scale
            tl.store(OUT + r * H + offs_h, res.to(OUT.dtype.element_ty), mask=h_in)


# ----------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------
def _row_stride(t: torch.Tensor) -> torch.Tensor:
    """Tables are gathered by row: the feature dim must be contiguous (no copy of a big table otherwise)."""
    return t if t.stride(-1) == 1 else t.contiguous()


def inject_positions_fwd_triton(
    input_ids: torch.Tensor,
    embed_table: torch.Tensor,
    slot_item: torch.Tensor,
    slot_abs: torch.Tensor,
    slot_rel: torch.Tensor,
    item_tokens: torch.Tensor,
    abs_table: Optional[torch.Tensor],
    rel_table: Optional[torch.Tensor],
    abs_scale: float,
) -> torch.Tensor:
    """Launch the forward splice kernel -> ``input_ids.shape + (H,)`` in ``item_tokens.dtype``.

    Shapes are validated by the public wrappers; this only checks what the kernel itself needs.
    """
    op = "inject_positions"
    check_triton_device(item_tokens, op)
    check_float_dtype(item_tokens, "item_tokens", op)
    check_float_dtype(embed_table, "embed_table", op)
    for name, tab in (("abs_table", abs_table), ("rel_table", rel_table)):
        if tab is not None:
            check_float_dtype(tab, name, op)
    h = item_tokens.shape[-1]
    t = input_ids.numel()
    out = alloc((t, h), item_tokens.dtype, item_tokens.device)
    if t == 0 or h == 0:
        return out.reshape(*input_ids.shape, h)
    ids = input_ids.reshape(-1).contiguous()
    si = slot_item.reshape(-1).contiguous()
    sa = slot_abs.reshape(-1).contiguous()
    sr = slot_rel.reshape(-1).contiguous()
    emb = _row_stride(embed_table)
    items = item_tokens.reshape(-1, h)
    items = _row_stride(items)
    abs_t = _row_stride(abs_table) if abs_table is not None else items  # dummy pointer when disabled
    rel_t = _row_stride(rel_table) if rel_table is not None else items
    block_h = min(next_pow2(h), 4096)
    block_p = max(1, min(16, 8192 // block_h))
    warps = warps_for(block_p * block_h, elems_per_thread=32, max_warps=8)
    grid = (triton.cdiv(t, block_p),)
    compiled = _inject_fwd_kernel[grid](
        ids, si, sa, sr, emb, items, abs_t, rel_t, out,
        t, h,
        emb.stride(0), items.stride(0), abs_t.stride(0), rel_t.stride(0),
        float(abs_scale),
        HAS_ABS=abs_table is not None, HAS_REL=rel_table is not None,
        BLOCK_P=block_p, BLOCK_H=block_h, num_warps=warps,
    )  # fmt: skip
    record_launch("inject_positions_fwd", compiled, grid)
    return out.reshape(*input_ids.shape, h)


def _launch_segment_rows(
    src: torch.Tensor, keys: torch.Tensor, n_rows: int, scale_range: tuple[int, int], scale: float, out: torch.Tensor
) -> None:
    """Sort int32 ``keys`` (values >= n_rows are ignored) and reduce ``src`` rows into ``out``."""
    sorted_keys, perm = torch.sort(keys, stable=True)
    h = src.shape[1]
    n_keys = keys.numel()
    block_h = min(next_pow2(h), 4096)
    block_j = max(1, min(16, 8192 // block_h))
    warps = warps_for(block_j * block_h, elems_per_thread=32, max_warps=8)
    grid = (n_rows,)
    compiled = _segment_rows_kernel[grid](
        src, sorted_keys, perm, out, n_keys, src.shape[0], h, src.stride(0), max(1, n_keys.bit_length()) + 1,
        scale_range[0], scale_range[1], float(scale),
        BLOCK_J=block_j, BLOCK_H=block_h, num_warps=warps,
    )  # fmt: skip
    record_launch("segment_rows", compiled, grid)


def segment_sum_triton(
    src: torch.Tensor, keys: torch.Tensor, n_rows: int, scale: float, out_dtype: torch.dtype
) -> torch.Tensor:
    """``out[r] = scale * sum(src[p] for p with keys[p] == r)``; keys outside ``[0, n_rows)`` are ignored.

    ``src [T, H]``, ``keys [T]`` int -> ``out [n_rows, H]`` in ``out_dtype``. A deterministic
    segmented reduction (stable sort of the keys, one program per output row, no atomics). Used for
    the embedding-table gradient; the item / cue gradients use the fused
    :func:`inject_positions_bwd_triton`.
    """
    check_triton_device(src, "segment_sum")
    h = src.shape[1]
    out = alloc((n_rows, h), out_dtype, src.device)
    if n_rows == 0 or h == 0:
        return out
    if n_rows >= 2**31 - 1:
        raise ValueError(f"segment_sum: n_rows={n_rows} does not fit the int32 sort keys")
    src = _row_stride(src)
    keys = keys.reshape(-1)
    keys = torch.where((keys >= 0) & (keys < n_rows), keys, n_rows).to(torch.int32)
    _launch_segment_rows(src, keys, n_rows, (0, n_rows), scale, out)
    return out


def inject_positions_bwd_triton(
    grad_out: torch.Tensor,
    slot_item: torch.Tensor,
    slot_abs: torch.Tensor,
    slot_rel: torch.Tensor,
    n_item_rows: int,
    n_abs: int,
    n_rel: int,
    abs_scale: float,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """Gradients of item rows, abs rows and rel rows in ONE sort + ONE reduction launch.

    Returns ``[n_item_rows + n_abs + n_rel, H]`` (a part with 0 rows is not computed): rows
    ``[0, n_item_rows)`` = d item_tokens.view(-1, H), then ``abs_scale`` * the abs-cue gradient,
    then the rel-cue gradient. Every position contributes to up to three keys; keys are built by one
    small kernel, sorted once (int32, stable) and reduced per target row.
    """
    check_triton_device(grad_out, "inject_positions")
    h = grad_out.shape[-1]
    total = n_item_rows + n_abs + n_rel
    dev = grad_out.device
    out = alloc((total, h), out_dtype, dev)
    t = slot_item.numel()
    if total == 0 or h == 0:
        return out
    if t == 0:
        return out.zero_()
    if total >= 2**31 - 1:
        raise ValueError(f"inject_positions: {total} gradient rows do not fit the int32 sort keys")
    g = grad_out.reshape(t, h)
    g = _row_stride(g)
    keys = torch.empty(3 * t, dtype=torch.int32, device=dev)
    block = 1024
    _build_keys_kernel[(triton.cdiv(t, block),)](
        slot_item.reshape(-1), slot_abs.reshape(-1), slot_rel.reshape(-1), keys, t,
        n_item_rows, n_item_rows, n_abs, n_item_rows + n_abs, n_rel, total,
        BLOCK=block, num_warps=4,
    )  # fmt: skip
    _launch_segment_rows(g, keys, total, (n_item_rows, n_item_rows + n_abs), abs_scale, out)
    return out


_launch_fwd = eager_or_op("inject_positions_fwd", inject_positions_fwd_triton)
_launch_bwd = eager_or_op("inject_positions_bwd", inject_positions_bwd_triton)
_launch_segsum = eager_or_op("segment_sum", segment_sum_triton)


# ----------------------------------------------------------------------------------------------
# custom ops (opaque to torch.compile) + autograd
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op("speeder_fast::inject_positions_fwd", mutates_args=())
def _inject_fwd_op(
    input_ids: torch.Tensor,
    embed_table: torch.Tensor,
    slot_item: torch.Tensor,
    slot_abs: torch.Tensor,
    slot_rel: torch.Tensor,
    item_tokens: torch.Tensor,
    abs_table: Optional[torch.Tensor],
    rel_table: Optional[torch.Tensor],
    abs_scale: float,
) -> torch.Tensor:
    return inject_positions_fwd_triton(
        input_ids, embed_table, slot_item, slot_abs, slot_rel, item_tokens, abs_table, rel_table, abs_scale
    )


@_inject_fwd_op.register_fake
def _(input_ids, embed_table, slot_item, slot_abs, slot_rel, item_tokens, abs_table, rel_table, abs_scale):  # type: ignore[no-untyped-def]
    return item_tokens.new_empty((*input_ids.shape, item_tokens.shape[-1]))


@torch.library.custom_op("speeder_fast::segment_sum", mutates_args=())
def _segment_sum_op(src: torch.Tensor, keys: torch.Tensor, n_rows: int, scale: float, out_dtype: torch.dtype) -> torch.Tensor:
    return segment_sum_triton(src, keys, n_rows, scale, out_dtype)


@_segment_sum_op.register_fake
def _(src, keys, n_rows, scale, out_dtype):  # type: ignore[no-untyped-def]
    return src.new_empty((n_rows, src.shape[1]), dtype=out_dtype)


@torch.library.custom_op("speeder_fast::inject_positions_bwd", mutates_args=())
def _inject_bwd_op(
    grad_out: torch.Tensor,
    slot_item: torch.Tensor,
    slot_abs: torch.Tensor,
    slot_rel: torch.Tensor,
    n_item_rows: int,
    n_abs: int,
    n_rel: int,
    abs_scale: float,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    return inject_positions_bwd_triton(
        grad_out, slot_item, slot_abs, slot_rel, n_item_rows, n_abs, n_rel, abs_scale, out_dtype
    )


@_inject_bwd_op.register_fake
def _(grad_out, slot_item, slot_abs, slot_rel, n_item_rows, n_abs, n_rel, abs_scale, out_dtype):  # type: ignore[no-untyped-def]
    return grad_out.new_empty((n_item_rows + n_abs + n_rel, grad_out.shape[-1]), dtype=out_dtype)


class InjectPositionsFunction(torch.autograd.Function):
    """Autograd wrapper: Triton splice forward, segmented-reduction backward."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        input_ids: torch.Tensor,
        embed_table: torch.Tensor,
        slot_item: torch.Tensor,
        slot_abs: torch.Tensor,
        slot_rel: torch.Tensor,
        item_tokens: torch.Tensor,
        abs_table: Optional[torch.Tensor],
        rel_table: Optional[torch.Tensor],
        abs_scale: float,
    ) -> torch.Tensor:
        out = _launch_fwd(
            input_ids, embed_table, slot_item, slot_abs, slot_rel, item_tokens, abs_table, rel_table, abs_scale
        )
        ctx.save_for_backward(input_ids, slot_item, slot_abs, slot_rel)
        ctx.abs_scale = abs_scale
        ctx.item_shape = tuple(item_tokens.shape)
        ctx.emb_rows, ctx.emb_dtype = embed_table.shape[0], embed_table.dtype
        ctx.abs_rows = abs_table.shape[0] if abs_table is not None else 0
        ctx.rel_rows = rel_table.shape[0] if rel_table is not None else 0
        ctx.dtypes = [t.dtype if t is not None else None for t in (item_tokens, abs_table, rel_table)]
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):  # type: ignore[override]
        input_ids, slot_item, slot_abs, slot_rel = ctx.saved_tensors
        need = ctx.needs_input_grad
        n, k, h = ctx.item_shape
        rows = [n * k if need[5] else 0, ctx.abs_rows if need[6] else 0, ctx.rel_rows if need[7] else 0]
        d_emb = d_item = d_abs = d_rel = None
        if sum(rows) > 0:
            dtypes = {d for d, r in zip(ctx.dtypes, rows) if r > 0}
            out_dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
            grads = _launch_bwd(grad_out, slot_item, slot_abs, slot_rel, *rows, float(ctx.abs_scale), out_dtype)
            d_item, d_abs, d_rel = grads.split(rows, dim=0)
            d_item = d_item.view(n, k, h).to(ctx.dtypes[0]) if need[5] else None
            d_abs = d_abs.to(ctx.dtypes[1]) if need[6] else None
            d_rel = d_rel.to(ctx.dtypes[2]) if need[7] else None
        if need[1]:
            si = slot_item.reshape(-1)
            text_keys = torch.where(si >= 0, -1, input_ids.reshape(-1))
            d_emb = _launch_segsum(grad_out.reshape(-1, h), text_keys, ctx.emb_rows, 1.0, ctx.emb_dtype)
        return None, d_emb, None, None, None, d_item, d_abs, d_rel, None


def inject_positions_triton(
    input_ids: torch.Tensor,
    embed_table: torch.Tensor,
    slot_item: torch.Tensor,
    slot_abs: torch.Tensor,
    slot_rel: torch.Tensor,
    item_tokens: torch.Tensor,
    abs_table: Optional[torch.Tensor] = None,
    rel_table: Optional[torch.Tensor] = None,
    abs_scale: float = 1.0,
) -> torch.Tensor:
    """Differentiable Triton injection + splice (same contract as :func:`inject_positions_reference`)."""
    _check_inputs(input_ids, embed_table, slot_item, slot_abs, slot_rel, item_tokens, abs_table, rel_table)
    return InjectPositionsFunction.apply(
        input_ids, embed_table, slot_item, slot_abs, slot_rel, item_tokens, abs_table, rel_table, float(abs_scale)
    )
