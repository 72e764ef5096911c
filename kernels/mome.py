"""MoME combine: masked expert gating + weighted mix of modality experts + output LayerNorm.

Reference it must match: :func:`mome_combine_reference` in this file (pure torch, fp32 math)::

    w      = softmax_M(gate_logits with absent modalities = -inf)   # all-absent item -> w = 0
    mixed  = sum_m w[n, m, t or 0] * expert_out[n, m, t, :]         # fp32 accumulation
    out    = layer_norm_H(mixed, eps) * ln_weight + ln_bias         # dtype of expert_out

Shapes: ``expert_out [N, M, k, H]``, ``gate_logits [N, M, G]`` with ``G in (1, k)``,
``mask [N, M]`` bool, ``ln_weight / ln_bias [H]``; output ``[N, k, H]``.

Triton design (Liger-Kernel style: kernels, launchers, autograd.Function, reference in one file):

* forward: one program per output row ``(n, t)``; the ``[M, H]`` expert tile of that row is loaded
  once (absent modalities are masked out of the load, so they cost no memory traffic), the gate
  softmax is recomputed from the ``M`` logits in registers, LayerNorm is fused; mean and rstd per
  row are saved (8 bytes per row) for the backward.
* backward: a persistent grid (a few programs per SM); each program loops over a contiguous range of
  rows, recomputes ``mixed`` from the expert tile held in registers, writes ``d expert_out``, the
  per-token gate-logit gradient (summed over ``k`` in torch when ``G == 1``), and accumulates its
  ``d ln_weight / d ln_bias`` partial sums in registers; a tiny ``torch.sum`` over programs finishes
  them (deterministic, no atomics).
* all address arithmetic in int64; fp32 math; fp16 / bf16 / fp32 inputs; no host synchronisation.

The launchers are wrapped as ``torch.library.custom_op`` (``speeder_fast::mome_combine_fwd`` /
``..._bwd``) with fake (meta) implementations so that ``torch.compile`` treats them as opaque
nodes; :class:`MomeCombineFunction` supplies the autograd rule.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._common import (
    HAS_TRITON,
    alloc,
    check_float_dtype,
    check_triton_device,
    next_pow2,
    persistent_programs,
    record_launch,
    tl,
    triton,
    warps_for,
)

#: largest BLOCK_M * BLOCK_H tile the single-block kernels keep in registers.
MAX_TILE = 1 << 16


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
        """Masked softmax over the M gate logits of item n / token t -> (present [BLOCK_M], w [BLOCK_M])."""
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
        w = e / tl.where(s > 0.0, s, 1.0)  # all-absent item -> w == 0
        return present, w

    @triton.jit
    def _mome_fwd_kernel(
        X,
        LOGITS,
        MASK,
        LNW,
        LNB,
        Y,
        MEAN,
        RSTD,
        M,
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
        BLOCK_M: tl.constexpr,
        BLOCK_H: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)  # row = n * K + t
        n = row // K
        t = row - n * K
        present, w = _gate_weights(LOGITS, MASK, n, t, M, stride_ln, stride_lm, stride_lt, stride_mn, BLOCK_M)

        offs_m = tl.arange(0, BLOCK_M)
        offs_h = tl.arange(0, BLOCK_H)
        h_in = offs_h < H
        x_ptrs = X + n * stride_xn + t * stride_xt + offs_m[:, None].to(tl.int64) * stride_xm + offs_h[None, :]
        # absent modalities are not read at all (masked load -> no memory traffic)
        x = tl.load(x_ptrs, mask=present[:, None] & h_in[None, :], other=0.0).to(tl.float32)
        mixed = tl.sum(x * w[:, None], axis=0)  # [BLOCK_H] fp32

        mean = tl.sum(mixed, axis=0) / H
        diff = tl.where(h_in, mixed - mean, 0.0)
        var = tl.sum(diff * diff, axis=0) / H
        rstd = 1.0 / tl.sqrt(var + eps)
        lnw = tl.load(LNW + offs_h, mask=h_in, other=0.0).to(tl.float32)
        lnb = tl.load(LNB + offs_h, mask=h_in, other=0.0).to(tl.float32)
        y = diff * rstd * lnw + lnb
        tl.store(Y + row * H + offs_h, y.to(Y.dtype.element_ty), mask=h_in)
        tl.store(MEAN + row, mean)
        tl.store(RSTD + row, rstd)

    @triton.jit
    def _mome_bwd_kernel(
        DY,
        X,
        LOGITS,
        MASK,
        LNW,
        MEAN,
        RSTD,
        DX,
        DLOGIT,
        DW_PART,
        DB_PART,
        n_rows,
        rows_per_prog,
        M,
        K,
        H,
        stride_xn,
        stride_xm,
        stride_xt,
        stride_ln,
        stride_lm,
        stride_lt,
        stride_mn,
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
            present, w = _gate_weights(LOGITS, MASK, n, t, M, stride_ln, stride_lm, stride_lt, stride_mn, BLOCK_M)
            x_off = n * stride_xn + t * stride_xt + offs_m[:, None].to(tl.int64) * stride_xm + offs_h[None, :]
            x = tl.load(X + x_off, mask=present[:, None] & h_in[None, :], other=0.0).to(tl.float32)
            mixed = tl.sum(x * w[:, None], axis=0)
            mean = tl.load(MEAN + row)
            rstd = tl.load(RSTD + row)
            xhat = tl.where(h_in, (mixed - mean) * rstd, 0.0)
            dy = tl.load(DY + row * H + offs_h, mask=h_in, other=0.0).to(tl.float32)
            dw_acc += dy * xhat
            db_acc += dy
            dxhat = dy * lnw
            c1 = tl.sum(xhat * dxhat, axis=0) / H
            c2 = tl.sum(dxhat, axis=0) / H
            dmixed = tl.where(h_in, (dxhat - (xhat * c1 + c2)) * rstd, 0.0)
            # d expert_out[n, m, t, :] = w[m] * dmixed (zero for absent modalities, still written)
            dx = w[:, None] * dmixed[None, :]
            dx_off = ((n * M + offs_m[:, None].to(tl.int64)) * K + t) * H + offs_h[None, :]
            tl.store(DX + dx_off, dx.to(DX.dtype.element_ty), mask=m_in[:, None] & h_in[None, :])
            # softmax backward: dlogit = w * (dw - sum_j w_j dw_j), dw_m = <x_m, dmixed>
            dwt = tl.sum(x * dmixed[None, :], axis=1)
            dl = w * (dwt - tl.sum(w * dwt, axis=0))
            tl.store(DLOGIT + row * M + offs_m, dl, mask=m_in)

        tl.store(DW_PART + pid.to(tl.int64) * H + offs_h, dw_acc, mask=h_in)
        tl.store(DB_PART + pid.to(tl.int64) * H + offs_h, db_acc, mask=h_in)


# ----------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------
def _blocks(m: int, h: int) -> tuple[int, int, int]:
    block_m = max(2, next_pow2(m))
    block_h = next_pow2(h)
    if block_m * block_h > MAX_TILE:
        raise ValueError(
            f"mome_combine: M={m}, H={h} gives a {block_m}x{block_h} tile > {MAX_TILE} elements; "
            "the single-block Triton kernel does not support it (use force='torch')"
        )
    return block_m, block_h, warps_for(block_m * block_h, elems_per_thread=16, max_warps=16)


def _prep(
    expert_out: torch.Tensor, gate_logits: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    x = expert_out if expert_out.stride(-1) == 1 else expert_out.contiguous()
    mask8 = mask.to(torch.int8).contiguous()
    g = gate_logits.shape[2]
    stride_lt = gate_logits.stride(2) if g > 1 else 0
    return x, gate_logits, mask8, stride_lt


def mome_combine_fwd_triton(
    expert_out: torch.Tensor,
    gate_logits: torch.Tensor,
    mask: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the forward kernel -> (out [N, k, H], mean [N*k] fp32, rstd [N*k] fp32)."""
    _check_shapes(expert_out, gate_logits, mask, ln_weight, ln_bias)
    check_triton_device(expert_out, "mome_combine")
    check_float_dtype(expert_out, "expert_out", "mome_combine")
    n, m, k, h = expert_out.shape
    dev = expert_out.device
    y = alloc((n, k, h), expert_out.dtype, dev)
    mean = alloc((n * k,), torch.float32, dev)
    rstd = alloc((n * k,), torch.float32, dev)
    if n * k == 0 or h == 0:
        return y, mean, rstd
    x, logits, mask8, stride_lt = _prep(expert_out, gate_logits, mask)
    block_m, block_h, warps = _blocks(m, h)
    grid = (n * k,)
    compiled = _mome_fwd_kernel[grid](
        x, logits, mask8, ln_weight.contiguous(), ln_bias.contiguous(), y, mean, rstd,
        m, k, h,
        x.stride(0), x.stride(1), x.stride(2),
        logits.stride(0), logits.stride(1), stride_lt,
        mask8.stride(0),
        float(eps),
        BLOCK_M=block_m, BLOCK_H=block_h, num_warps=warps,
    )  # fmt: skip
    record_launch("mome_combine_fwd", compiled, grid)
    return y, mean, rstd


def mome_combine_bwd_triton(
    grad_out: torch.Tensor,
    expert_out: torch.Tensor,
    gate_logits: torch.Tensor,
    mask: torch.Tensor,
    ln_weight: torch.Tensor,
    mean: torch.Tensor,
    rstd: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the backward kernel -> (d expert_out, d gate_logits, d ln_weight, d ln_bias)."""
    n, m, k, h = expert_out.shape
    g = gate_logits.shape[2]
    dev = expert_out.device
    dx = alloc((n, m, k, h), expert_out.dtype, dev)
    n_rows = n * k
    if n_rows == 0 or h == 0:
        dx.zero_()
        return (
            dx,
            torch.zeros_like(gate_logits),
            torch.zeros_like(ln_weight),
            torch.zeros_like(ln_weight),
        )
    x, logits, mask8, stride_lt = _prep(expert_out, gate_logits, mask)
    dy = grad_out.contiguous()
    block_m, block_h, warps = _blocks(m, h)
    n_prog = persistent_programs(dev, n_rows)
    rows_per_prog = -(-n_rows // n_prog)
    n_prog = -(-n_rows // rows_per_prog)  # no program without rows
    dlogit = alloc((n_rows, m), torch.float32, dev)
    dw_part = alloc((n_prog, h), torch.float32, dev)
    db_part = alloc((n_prog, h), torch.float32, dev)
    grid = (n_prog,)
    compiled = _mome_bwd_kernel[grid](
        dy, x, logits, mask8, ln_weight.contiguous(), mean, rstd, dx, dlogit, dw_part, db_part,
        n_rows, rows_per_prog, m, k, h,
        x.stride(0), x.stride(1), x.stride(2),
        logits.stride(0), logits.stride(1), stride_lt,
        mask8.stride(0),
        BLOCK_M=block_m, BLOCK_H=block_h, num_warps=warps,
    )  # fmt: skip
    record_launch("mome_combine_bwd", compiled, grid)
    dl = dlogit.view(n, k, m)
    d_logits = dl.sum(1).unsqueeze(-1) if g == 1 else dl.permute(0, 2, 1)
    d_w = dw_part.sum(0)
    d_b = db_part.sum(0)
    return (
        dx,
        d_logits.to(gate_logits.dtype).contiguous(),
        d_w.to(ln_weight.dtype),
        d_b.to(ln_weight.dtype),
    )


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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return mome_combine_fwd_triton(expert_out, gate_logits, mask, ln_weight, ln_bias, eps)


@_mome_fwd_op.register_fake
def _(expert_out, gate_logits, mask, ln_weight, ln_bias, eps):  # type: ignore[no-untyped-def]
    n, m, k, h = expert_out.shape
    return (
        expert_out.new_empty((n, k, h)),
        expert_out.new_empty((n * k,), dtype=torch.float32),
        expert_out.new_empty((n * k,), dtype=torch.float32),
    )


@torch.library.custom_op("speeder_fast::mome_combine_bwd", mutates_args=())
def _mome_bwd_op(
    grad_out: torch.Tensor,
    expert_out: torch.Tensor,
    gate_logits: torch.Tensor,
    mask: torch.Tensor,
    ln_weight: torch.Tensor,
    mean: torch.Tensor,
    rstd: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return mome_combine_bwd_triton(grad_out, expert_out, gate_logits, mask, ln_weight, mean, rstd)


@_mome_bwd_op.register_fake
def _(grad_out, expert_out, gate_logits, mask, ln_weight, mean, rstd):  # type: ignore[no-untyped-def]
    return (
        torch.empty_like(expert_out, memory_format=torch.contiguous_format),
        torch.empty_like(gate_logits, memory_format=torch.contiguous_format),
        torch.empty_like(ln_weight),
        torch.empty_like(ln_weight),
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
        y, mean, rstd = torch.ops.speeder_fast.mome_combine_fwd(expert_out, gate_logits, mask, ln_weight, ln_bias, eps)
        ctx.save_for_backward(expert_out, gate_logits, mask, ln_weight, mean, rstd)
        return y

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):  # type: ignore[override]
        expert_out, gate_logits, mask, ln_weight, mean, rstd = ctx.saved_tensors
        dx, dl, dw, db = torch.ops.speeder_fast.mome_combine_bwd(
            grad_out, expert_out, gate_logits, mask, ln_weight, mean, rstd
        )
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
    return MomeCombineFunction.apply(expert_out, gate_logits, mask, ln_weight, ln_bias, float(eps))
