"""MoME combine: masked expert gating + weighted mix of modality experts + output LayerNorm.

Reference it must match: :func:`mome_combine_reference` in this file (pure torch, fp32 math)::

    w      = softmax_M(gate_logits with absent modalities = -inf)   # all-absent item -> w = 0
    mixed  = sum_m w[n, m, t or 0] * expert_out[n, m, t, :]         # fp32 accumulation
    out    = layer_norm_H(mixed, eps) * ln_weight + ln_bias         # dtype of expert_out

Shapes: ``expert_out [N, M, k, H]``, ``gate_logits [N, M, G]`` with ``G in (1, k)``,
``mask [N, M]`` bool, ``ln_weight / ln_bias [H]``; output ``[N, k, H]``.

Triton design (Liger-Kernel style: kernels, launchers, autograd.Function, reference in one file):

* forward: one program per output row ``(n, t)``; the gate softmax is recomputed from the ``M``
  logits in registers, the ``M`` expert rows are streamed one at a time into an fp32 ``mixed`` row
  (absent modalities are masked out of the load, so they cost no memory traffic), LayerNorm is
  fused; mean and rstd per row are saved (8 bytes per row) for the backward.
* backward: a grid of row blocks (about ``BWD_PROGRAMS_PER_SM`` programs per SM); each program
  loops over its rows, recomputes ``mixed``, writes ``d expert_out`` and the gate-logit gradient
  (directly in ``[N, M, G]`` when ``G == k``; per token then summed over ``k`` in torch when
  ``G == 1``), and accumulates its ``d ln_weight / d ln_bias`` partial sums in registers; one small
  ``torch.sum`` over programs finishes them (deterministic, no atomics).
* all address arithmetic in int64; fp32 math; fp16 / bf16 / fp32 inputs; no host synchronisation.

The launchers are wrapped as ``torch.library.custom_op`` (``speeder_fast::mome_combine_fwd`` /
``..._bwd``) with fake (meta) implementations so that ``torch.compile`` treats them as opaque
nodes (eager calls skip the custom-op dispatch and call the launchers directly, to save host
time); :class:`MomeCombineFunction` supplies the autograd rule.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._common import (
    HAS_TRITON,
    alloc,
    check_float_dtype,
    check_triton_device,
    eager_or_op,
    next_pow2,
    persistent_programs,
    record_launch,
    tl,
    triton,
    warps_for,
)

#: widest row (next power of two of H) the single-block kernels keep in registers.
MAX_BLOCK_H = 1 << 14
#: backward row blocks: about this many programs per SM (each writes one [2, H] fp32 partial).
BWD_PROGRAMS_PER_SM = 8


# ----------------------------------------------------------------------------------------------
# pure-torch reference
# ----------------------------------------------------------------------------------------------
def masked_gate_weights(gate_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Softmax over modalities (dim 1) with absent modalities excluded; all-absent items get 0.

    ``gate_logits [N, M, G]``, ``mask [N, M]`` -> weights ``[N, M, G]`` in the logits' dtype
    (differentiable, NaN-free for items without any modality).
    """
    present = mask.to(torch.bool).unsqueeze(-1)  # [N, M, 1]
    any_present = present.any(dim=1, keepdim=True)  # [N, 1, 1]
    masked = gate_logits.masked_fill(~present, float("-inf"))
    # all-absent items: softmax over zeros (finite), then zeroed by the mask below
    safe = torch.where(any_present, masked, torch.zeros_like(masked))
    return torch.softmax(safe, dim=1) * present.to(gate_logits.dtype)


def mome_combine_reference(
    expert_out: torch.Tensor,
    gate_logits: torch.Tensor,
    mask: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    eps: float = 1e-5,
) -> torch.Tensor:
    """Pure-torch MoME combine (the specification of the Triton kernel).

    Math runs in fp32 (fp64 when ``expert_out`` is fp64); the result has ``expert_out``'s dtype.
    """
    _check_shapes(expert_out, gate_logits, mask, ln_weight, ln_bias)
    n, m, k, h = expert_out.shape
    ct = torch.float64 if expert_out.dtype == torch.float64 else torch.float32
    w = masked_gate_weights(gate_logits.to(ct), mask)  # [N, M, G]
    w = w.expand(n, m, k)  # G == 1 broadcasts over the k tokens
    mixed = torch.einsum("nmt,nmth->nth", w, expert_out.to(ct))
    out = F.layer_norm(mixed, (h,), ln_weight.to(ct), ln_bias.to(ct), eps)
    return out.to(expert_out.dtype)


def _check_shapes(
    expert_out: torch.Tensor,
    gate_logits: torch.Tensor,
    mask: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
) -> None:
    if expert_out.dim() != 4:
        raise ValueError(f"mome_combine: expert_out must be [N, M, k, H], got shape {tuple(expert_out.shape)}")
    n, m, k, h = expert_out.shape
    if gate_logits.dim() != 3 or gate_logits.shape[:2] != (n, m) or gate_logits.shape[2] not in (1, k):
        raise ValueError(
            f"mome_combine: gate_logits must be [N={n}, M={m}, G] with G in (1, k={k}), "
            f"got {tuple(gate_logits.shape)}"
        )
    if tuple(mask.shape) != (n, m):
        raise ValueError(f"mome_combine: mask must be [N={n}, M={m}], got {tuple(mask.shape)}")
    if tuple(ln_weight.shape) != (h,) or tuple(ln_bias.shape) != (h,):
        raise ValueError(
            f"mome_combine: ln_weight/ln_bias must be [H={h}], got {tuple(ln_weight.shape)} / "
            f"{tuple(ln_bias.shape)}"
        )


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------
if HAS_TRITON:

    @triton.jit
    def _gate_weights(LOGITS, MASK, n, t, M, stride_ln, stride_lm, stride_lt, stride_mn, BLOCK_M: tl.constexpr):
        """Masked softmax over the M gate logits of item n / token t -> w [BLOCK_M] (0 where absent)."""
        offs_m = tl.arange(0, BLOCK_M)
        m_in = offs_m < M
        present = tl.load(MASK + n * stride_mn + offs_m, mask=m_in, other=0) != 0
        logit = tl.load(
            LOGITS + n * stride_ln + offs_m.to(tl.int64) * stride_lm + t * stride_lt, mask=present, other=0.0
        ).to(tl.float32)
        logit = tl.where(present, logit, float("-inf"))
        mx = tl.max(logit, axis=0)
        mx = tl.where(mx > float("-inf"), mx, 0.0)  # all-absent item: keep exp() finite
        e = tl.where(present, tl.exp(logit - mx), 0.0)
        s = tl.sum(e, axis=0)
        return e / tl.where(s > 0.0, s, 1.0)  # all-absent item -> w == 0

    @triton.jit
    def _pick(vec, offs, i):
        """Element i of a small vector as a scalar (exact: one non-zero term)."""
        return tl.sum(tl.where(offs == i, vec, 0.0), axis=0)

    @triton.jit
    def _mome_fwd_kernel(
        X,
        LOGITS,
        MASK,
        LNW,
        LNB,
        Y,
        STATS,
        n_rows,
        K,
        H,
        stride_xn,
        stride_xm,
        stride_xt,
        stride_ln,
        stride_lm,
        stride_lt,
        stride_mn,
        eps,
        M: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_H: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)  # row = n * K + t
        n = row // K
        t = row - n * K
        offs_m = tl.arange(0, BLOCK_M)
        w = _gate_weights(LOGITS, MASK, n, t, M, stride_ln, stride_lm, stride_lt, stride_mn, BLOCK_M)

        offs_h = tl.arange(0, BLOCK_H)
        h_in = offs_h < H
        x_row = X + n * stride_xn + t * stride_xt
        mixed = tl.zeros([BLOCK_H], dtype=tl.float32)
        for m in tl.static_range(M):  # one [H] vector live at a time (keeps registers low)
            w_m = _pick(w, offs_m, m)
            # absent modalities (w_m == 0) are not read at all: masked load -> no memory traffic
            x_m = tl.load(x_row + m * stride_xm + offs_h, mask=offs_h < tl.where(w_m != 0.0, H, 0), other=0.0)
            mixed += w_m * x_m.to(tl.float32)

        mean = tl.sum(mixed, axis=0) / H
        diff = tl.where(h_in, mixed - mean, 0.0)
        var = tl.sum(diff * diff, axis=0) / H
        rstd = 1.0 / tl.sqrt(var + eps)
        lnw = tl.load(LNW + offs_h, mask=h_in, other=0.0).to(tl.float32)
        lnb = tl.load(LNB + offs_h, mask=h_in, other=0.0).to(tl.float32)
        y = diff * rstd * lnw + lnb
        tl.store(Y + row * H + offs_h, y.to(Y.dtype.element_ty), mask=h_in)
        tl.store(STATS + row, mean)
        tl.store(STATS + n_rows + row, rstd)

    @triton.jit
    def _mome_bwd_kernel(
        DY,
        X,
        LOGITS,
        MASK,
        LNW,
        STATS,
        DX,
        DLOGIT,
        DWB_PART,
        n_rows,
        rows_per_prog,
        n_prog,
        K,
        H,
        stride_xn,
        stride_xm,
        stride_xt,
        stride_ln,
        stride_lm,
        stride_lt,
        stride_mn,
        stride_dn,
        stride_dm,
        stride_dt,
        M: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_H: tl.constexpr,
    ):
        pid = tl.program_id(0)
        row_start = pid.to(tl.int64) * rows_per_prog
        n_here = tl.minimum(row_start + rows_per_prog, n_rows) - row_start

        offs_m = tl.arange(0, BLOCK_M)
        offs_h = tl.arange(0, BLOCK_H)
        m_in = offs_m < M
        h_in = offs_h < H
        lnw = tl.load(LNW + offs_h, mask=h_in, other=0.0).to(tl.float32)
        dw_acc = tl.zeros([BLOCK_H], dtype=tl.float32)
        db_acc = tl.zeros([BLOCK_H], dtype=tl.float32)

        for i in range(0, n_here):
            row = row_start + i
            n = row // K
            t = row - n * K
            w = _gate_weights(LOGITS, MASK, n, t, M, stride_ln, stride_lm, stride_lt, stride_mn, BLOCK_M)
            x_row = X + n * stride_xn + t * stride_xt
            mixed = tl.zeros([BLOCK_H], dtype=tl.float32)
            for m in tl.static_range(M):
                w_m = _pick(w, offs_m, m)
                x_m = tl.load(x_row + m * stride_xm + offs_h, mask=offs_h < tl.where(w_m != 0.0, H, 0), other=0.0)
                mixed += w_m * x_m.to(tl.float32)
            mean = tl.load(STATS + row)
            rstd = tl.load(STATS + n_rows + row)
            xhat = tl.where(h_in, (mixed - mean) * rstd, 0.0)
            dy = tl.load(DY + row * H + offs_h, mask=h_in, other=0.0).to(tl.float32)
            dw_acc += dy * xhat
            db_acc += dy
            dxhat = dy * lnw
            c1 = tl.sum(xhat * dxhat, axis=0) / H
            c2 = tl.sum(dxhat, axis=0) / H
            dmixed = tl.where(h_in, (dxhat - (xhat * c1 + c2)) * rstd, 0.0)
            # second pass over the modalities (x re-read hits L1/L2): d expert_out and <x_m, dmixed>
            dwt = tl.zeros([BLOCK_M], dtype=tl.float32)
            dx_row = DX + (n * M * K + t) * H
            for m in tl.static_range(M):
                w_m = _pick(w, offs_m, m)
                x_m = tl.load(x_row + m * stride_xm + offs_h, mask=offs_h < tl.where(w_m != 0.0, H, 0), other=0.0)
                dwt = tl.where(offs_m == m, tl.sum(x_m.to(tl.float32) * dmixed, axis=0), dwt)
                # zero for absent modalities, but always written
                tl.store(dx_row + m * K * H + offs_h, (w_m * dmixed).to(DX.dtype.element_ty), mask=h_in)
            # softmax backward: dlogit = w * (dw - sum_j w_j dw_j)
            dl = w * (dwt - tl.sum(w * dwt, axis=0))
            dl_ptr = DLOGIT + n * stride_dn + offs_m.to(tl.int64) * stride_dm + t * stride_dt
            tl.store(dl_ptr, dl.to(DLOGIT.dtype.element_ty), mask=m_in)

        part = DWB_PART + pid.to(tl.int64) * H + offs_h
        tl.store(part, dw_acc, mask=h_in)
        tl.store(part + n_prog * H, db_acc, mask=h_in)


# ----------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------
def _blocks(m: int, h: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_H, num_warps): one row of H per program, warps by row width (Liger-style)."""
    block_m = max(2, next_pow2(m))
    block_h = next_pow2(h)
    if block_h > MAX_BLOCK_H:
        raise ValueError(
            f"mome_combine: H={h} exceeds the single-block Triton kernel's limit {MAX_BLOCK_H} (use force='torch')"
        )
    warps = 4 if block_h <= 1024 else 8 if block_h <= 4096 else 16
    return block_m, block_h, warps


def _mask_bytes(mask: torch.Tensor) -> torch.Tensor:
    """The [N, M] mask as bytes without a copy when it is already a bool/uint8/int8 tensor."""
    if mask.dtype == torch.bool:
        mask = mask.view(torch.uint8)
    elif mask.dtype not in (torch.uint8, torch.int8):
        mask = mask != 0
        mask = mask.view(torch.uint8)
    return mask if mask.stride(1) == 1 else mask.contiguous()


def mome_combine_fwd_triton(
    expert_out: torch.Tensor,
    gate_logits: torch.Tensor,
    mask: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward kernel -> (out [N, k, H], stats [2, N*k] fp32 = mean, rstd).

    Shapes are validated by the public wrappers; this only checks what the kernel itself needs.
    """
    check_triton_device(expert_out, "mome_combine")
    check_float_dtype(expert_out, "expert_out", "mome_combine")
    n, m, k, h = expert_out.shape
    dev = expert_out.device
    y = alloc((n, k, h), expert_out.dtype, dev)
    stats = alloc((2, n * k), torch.float32, dev)
    if n * k == 0 or h == 0:
        return y, stats
    x = expert_out if expert_out.stride(-1) == 1 else expert_out.contiguous()
    mask8 = _mask_bytes(mask)
    stride_lt = gate_logits.stride(2) if gate_logits.shape[2] > 1 else 0
    block_m, block_h, warps = _blocks(m, h)
    grid = (n * k,)
    compiled = _mome_fwd_kernel[grid](
        x, gate_logits, mask8, ln_weight, ln_bias, y, stats,
        n * k, k, h,
        x.stride(0), x.stride(1), x.stride(2),
        gate_logits.stride(0), gate_logits.stride(1), stride_lt,
        mask8.stride(0),
        float(eps),
        M=m, BLOCK_M=block_m, BLOCK_H=block_h, num_warps=warps,
    )  # fmt: skip
    record_launch("mome_combine_fwd", compiled, grid)
    return y, stats


def _bwd_programs(dev: torch.device, n_rows: int) -> tuple[int, int]:
    """(programs, rows per program) for the backward: many small row blocks (several resident per
    SM hide the serial per-row latency), each writing one [H] partial of d ln_weight / d ln_bias."""
    n_prog = persistent_programs(dev, n_rows, per_sm=BWD_PROGRAMS_PER_SM)
    rows_per_prog = -(-n_rows // n_prog)
    return -(-n_rows // rows_per_prog), rows_per_prog  # no program without rows


def mome_combine_bwd_triton(
    grad_out: torch.Tensor,
    expert_out: torch.Tensor,
    gate_logits: torch.Tensor,
    mask: torch.Tensor,
    ln_weight: torch.Tensor,
    stats: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the backward kernel -> (d expert_out, d gate_logits, d [ln_weight; ln_bias] as [2, H])."""
    n, m, k, h = expert_out.shape
    g = gate_logits.shape[2]
    dev = expert_out.device
    dx = alloc((n, m, k, h), expert_out.dtype, dev)
    n_rows = n * k
    if n_rows == 0 or h == 0:
        dx.zero_()
        return dx, torch.zeros_like(gate_logits), torch.zeros((2, h), dtype=ln_weight.dtype, device=dev)
    x = expert_out if expert_out.stride(-1) == 1 else expert_out.contiguous()
    mask8 = _mask_bytes(mask)
    stride_lt = gate_logits.stride(2) if g > 1 else 0
    dy = grad_out if grad_out.is_contiguous() else grad_out.contiguous()
    block_m, block_h, warps = _blocks(m, h)
    n_prog, rows_per_prog = _bwd_programs(dev, n_rows)
    if g == k:  # per-token gate (or k == 1): write d gate_logits [N, M, G] directly
        dlogit = alloc((n, m, g), gate_logits.dtype, dev)
        sd = (dlogit.stride(0), dlogit.stride(1), dlogit.stride(2) if g > 1 else 0)
    else:  # one gate per item, k > 1: per-token fp32 rows, summed over k below
        dlogit = alloc((n, k, m), torch.float32, dev)
        sd = (dlogit.stride(0), dlogit.stride(2), dlogit.stride(1))
    dwb_part = alloc((2, n_prog, h), torch.float32, dev)
    grid = (n_prog,)
    compiled = _mome_bwd_kernel[grid](
        dy, x, gate_logits, mask8, ln_weight, stats, dx, dlogit, dwb_part,
        n_rows, rows_per_prog, n_prog, k, h,
        x.stride(0), x.stride(1), x.stride(2),
        gate_logits.stride(0), gate_logits.stride(1), stride_lt,
        mask8.stride(0),
        sd[0], sd[1], sd[2],
        M=m, BLOCK_M=block_m, BLOCK_H=block_h, num_warps=warps,
    )  # fmt: skip
    record_launch("mome_combine_bwd", compiled, grid)
    if g != k:
        dlogit = dlogit.sum(1, keepdim=True).transpose(1, 2).to(gate_logits.dtype).contiguous()
    return dx, dlogit, dwb_part.sum(1).to(ln_weight.dtype)


_launch_fwd = eager_or_op("mome_combine_fwd", mome_combine_fwd_triton)
_launch_bwd = eager_or_op("mome_combine_bwd", mome_combine_bwd_triton)


# ----------------------------------------------------------------------------------------------
# custom ops (opaque to torch.compile) + autograd
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op("speeder_fast::mome_combine_fwd", mutates_args=())
def _mome_fwd_op(
    expert_out: torch.Tensor,
    gate_logits: torch.Tensor,
    mask: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    return mome_combine_fwd_triton(expert_out, gate_logits, mask, ln_weight, ln_bias, eps)


@_mome_fwd_op.register_fake
def _(expert_out, gate_logits, mask, ln_weight, ln_bias, eps):  # type: ignore[no-untyped-def]
    n, m, k, h = expert_out.shape
    return expert_out.new_empty((n, k, h)), expert_out.new_empty((2, n * k), dtype=torch.float32)


@torch.library.custom_op("speeder_fast::mome_combine_bwd", mutates_args=())
def _mome_bwd_op(
    grad_out: torch.Tensor,
    expert_out: torch.Tensor,
    gate_logits: torch.Tensor,
    mask: torch.Tensor,
    ln_weight: torch.Tensor,
    stats: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return mome_combine_bwd_triton(grad_out, expert_out, gate_logits, mask, ln_weight, stats)


@_mome_bwd_op.register_fake
def _(grad_out, expert_out, gate_logits, mask, ln_weight, stats):  # type: ignore[no-untyped-def]
    return (
        torch.empty_like(expert_out, memory_format=torch.contiguous_format),
        torch.empty_like(gate_logits, memory_format=torch.contiguous_format),
        ln_weight.new_empty((2, ln_weight.shape[0])),
    )


class MomeCombineFunction(torch.autograd.Function):
    """Autograd wrapper around the Triton forward/backward custom ops."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        expert_out: torch.Tensor,
        gate_logits: torch.Tensor,
        mask: torch.Tensor,
        ln_weight: torch.Tensor,
        ln_bias: torch.Tensor,
        eps: float,
    ) -> torch.Tensor:
        y, stats = _launch_fwd(expert_out, gate_logits, mask, ln_weight, ln_bias, eps)
        ctx.save_for_backward(expert_out, gate_logits, mask, ln_weight, stats)
        return y

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):  # type: ignore[override]
        expert_out, gate_logits, mask, ln_weight, stats = ctx.saved_tensors
        dx, dl, dwb = _launch_bwd(grad_out, expert_out, gate_logits, mask, ln_weight, stats)
        dw, db = dwb.unbind(0)
        need = ctx.needs_input_grad
        return (
            dx if need[0] else None,
            dl if need[1] else None,
            None,
            dw if need[3] else None,
            db if need[4] else None,
            None,
        )


def mome_combine_triton(
    expert_out: torch.Tensor,
    gate_logits: torch.Tensor,
    mask: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    eps: float = 1e-5,
) -> torch.Tensor:
    """Differentiable Triton MoME combine (same contract as :func:`mome_combine_reference`)."""
    _check_shapes(expert_out, gate_logits, mask, ln_weight, ln_bias)
    if ln_weight.stride(0) != 1 or ln_bias.stride(0) != 1:
        ln_weight, ln_bias = ln_weight.contiguous(), ln_bias.contiguous()
    return MomeCombineFunction.apply(expert_out, gate_logits, mask, ln_weight, ln_bias, float(eps))
