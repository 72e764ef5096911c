"""MoME combine kernel vs its pure-torch reference (CPU: Triton interpreter; GPU: compiled Triton).

Every case draws fresh seeded inputs; kernel outputs are NaN-poisoned before launch so a missed
element fails the comparison.
"""

from __future__ import annotations

import zlib

import pytest
import torch

from speeder_fast.kernels import (
    MomeCombineFunction,
    masked_gate_weights,
    mome_combine,
    mome_combine_reference,
    poison_outputs,
)
from speeder_fast.kernels import mome as mome_mod

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _seed(*parts: object) -> int:
    return zlib.crc32(repr(parts).encode())


def make_inputs(
    n: int, m: int, k: int, h: int, g: int, dtype: torch.dtype, seed: int, p_present: float = 0.7
) -> tuple[torch.Tensor, ...]:
    """Random MoME inputs; item 0 has no modality at all (when n > 1), item 1 all of them."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, m, k, h, generator=gen) * 2.0 + 0.5
    logits = torch.randn(n, m, g, generator=gen) * 2.0
    mask = torch.rand(n, m, generator=gen) < p_present
    if n > 1:
        mask[0] = False
        mask[1] = True
    ln_w = 0.02 + 0.01 * torch.randn(h, generator=gen)  # ~ an LLM embedding scale
    ln_b = 0.01 * torch.randn(h, generator=gen)
    dy = torch.randn(n, k, h, generator=gen)
    cast = [t.to(DEVICE, dtype) for t in (x, logits, ln_w, ln_b, dy)]
    return cast[0], cast[1], mask.to(DEVICE), cast[2], cast[3], cast[4]


def _tol(dtype: torch.dtype) -> float:
    return {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 4e-3}[dtype]


def assert_close_scaled(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    """Elementwise |a - e| <= tol * (|e| + max|e|); NaN anywhere fails."""
    a, e = actual.double(), expected.double()
    assert a.shape == e.shape, f"{what}: shape {tuple(a.shape)} != {tuple(e.shape)}"
    assert torch.isfinite(a).all(), f"{what}: non-finite values (an element was not written?)"
    tol = _tol(dtype)
    scale = e.abs().max().clamp(min=1e-6)
    err = (a - e).abs()
    bad = err > tol * (e.abs() + scale)
    assert not bad.any(), f"{what}: max err {err.max().item():.3e} vs scale {scale.item():.3e} (tol {tol})"


def run_both(n: int, m: int, k: int, h: int, g: int, dtype: torch.dtype) -> None:
    x, logits, mask, ln_w, ln_b, dy = make_inputs(n, m, k, h, g, dtype, _seed(n, m, k, h, g, dtype))
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, logits, ln_w, ln_b)]
    with poison_outputs():
        out = mome_combine(leaves[0], leaves[1], mask, leaves[2], leaves[3], force="triton")
        grads = torch.autograd.grad(out, leaves, dy)
    assert out.dtype == dtype and out.shape == (n, k, h)
    assert out.grad_fn is not None and "MomeCombineFunction" in type(out.grad_fn).__name__
    # fp32 reference on the (already dtype-rounded) inputs
    ref_leaves = [t.detach().float().requires_grad_(True) for t in (x, logits, ln_w, ln_b)]
    ref = mome_combine_reference(ref_leaves[0], ref_leaves[1], mask, ref_leaves[2], ref_leaves[3])
    ref_grads = torch.autograd.grad(ref, ref_leaves, dy.float())
    assert_close_scaled(out, ref, dtype, "out")
    for name, a, e, leaf in zip(("d expert_out", "d gate_logits", "d ln_weight", "d ln_bias"), grads, ref_grads, leaves):
        assert a.dtype == leaf.dtype and a.shape == leaf.shape, name
        assert_close_scaled(a, e, dtype, name)
    # absent modalities get exactly zero expert / gate gradient
    absent = ~mask
    assert (grads[0][absent] == 0).all()
    assert (grads[1][absent] == 0).all()


CASES = [
    # n, m, k, h, g, dtype
    (1, 3, 1, 576, 1, torch.float32),
    (7, 3, 4, 576, 4, torch.float32),
    (7, 3, 4, 576, 1, torch.float32),
    (33, 2, 1, 576, 1, torch.float32),
    (5, 1, 2, 100, 2, torch.float32),  # single modality, odd H
    (2, 3, 1, 4096, 1, torch.float32),
    (7, 3, 4, 576, 4, torch.bfloat16),
    (33, 3, 1, 576, 1, torch.bfloat16),
    (2, 4, 2, 4096, 2, torch.bfloat16),
    (6, 3, 2, 200, 1, torch.float16),
]


@pytest.mark.parametrize("n,m,k,h,g,dtype", CASES, ids=lambda v: str(v).replace("torch.", ""))
def test_mome_triton_matches_reference(n: int, m: int, k: int, h: int, g: int, dtype: torch.dtype) -> None:
    run_both(n, m, k, h, g, dtype)


def test_mome_all_items_without_modalities() -> None:
    x, logits, mask, ln_w, ln_b, dy = make_inputs(4, 3, 2, 64, 1, torch.float32, _seed("none"))
    mask = torch.zeros_like(mask)
    leaves = [t.clone().requires_grad_(True) for t in (x, logits, ln_w, ln_b)]
    with poison_outputs():
        out = mome_combine(leaves[0], leaves[1], mask, leaves[2], leaves[3], force="triton")
        gx, gl, gw, gb = torch.autograd.grad(out, leaves, dy)
    # mixed == 0 -> layer_norm(0) == 0 -> out == bias exactly
    torch.testing.assert_close(out, ln_b.expand_as(out), rtol=0, atol=0)
    assert (gx == 0).all() and (gl == 0).all() and (gw == 0).all()
    torch.testing.assert_close(gb, dy.sum((0, 1)), rtol=1e-5, atol=1e-5)


def test_mome_backward_is_deterministic() -> None:
    x, logits, mask, ln_w, ln_b, dy = make_inputs(9, 3, 2, 128, 2, torch.float32, _seed("det"))
    leaves = [t.clone().requires_grad_(True) for t in (x, logits, ln_w, ln_b)]
    runs = []
    for _ in range(2):
        out = mome_combine(leaves[0], leaves[1], mask, leaves[2], leaves[3], force="triton")
        runs.append(torch.autograd.grad(out, leaves, dy))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_poison_catches_missed_rows() -> None:
    """The NaN poison really flags rows a kernel did not write (launch one program too few)."""
    if not mome_mod.HAS_TRITON:
        pytest.skip("triton not installed")
    n, m, k, h = 3, 2, 2, 64
    x, logits, mask, ln_w, ln_b, _ = make_inputs(n, m, k, h, 1, torch.float32, _seed("poison"))
    with poison_outputs():
        y = mome_mod.alloc((n, k, h), torch.float32, DEVICE)
        stats = mome_mod.alloc((2, n * k), torch.float32, DEVICE)
    mask8 = mask.to(torch.int8)
    mome_mod._mome_fwd_kernel[(n * k - 1,)](
        x, logits, mask8, ln_w, ln_b, y, stats, n * k, k, h,
        x.stride(0), x.stride(1), x.stride(2), logits.stride(0), logits.stride(1), 0, mask8.stride(0), 1e-5,
        M=m, BLOCK_M=2, BLOCK_H=64,
    )  # fmt: skip
    assert torch.isfinite(y.view(-1, h)[:-1]).all()
    assert torch.isnan(y.view(-1, h)[-1]).all()
    with pytest.raises(AssertionError, match="non-finite"):
        assert_close_scaled(y, mome_combine_reference(x, logits, mask, ln_w, ln_b), torch.float32, "y")


def test_mome_dispatch_and_validation() -> None:
    x, logits, mask, ln_w, ln_b, _ = make_inputs(3, 2, 2, 32, 1, torch.float32, _seed("dispatch"))
    ref = mome_combine_reference(x, logits, mask, ln_w, ln_b)
    torch.testing.assert_close(mome_combine(x, logits, mask, ln_w, ln_b, force="torch"), ref)
    auto = mome_combine(x.requires_grad_(True), logits, mask, ln_w, ln_b)
    is_triton = "MomeCombineFunction" in type(auto.grad_fn).__name__
    assert is_triton == (DEVICE.type == "cuda")
    with pytest.raises(ValueError, match="force"):
        mome_combine(x, logits, mask, ln_w, ln_b, force="cuda")
    with pytest.raises(ValueError, match="gate_logits"):
        mome_combine(x, logits[:, :, :1].expand(3, 2, 3), mask, ln_w, ln_b, force="torch")
    with pytest.raises(ValueError, match="mask"):
        mome_combine(x, logits, mask[:, :1], ln_w, ln_b, force="triton")
    with pytest.raises(ValueError, match="ln_weight"):
        mome_combine(x, logits, mask, ln_w[:-1], ln_b, force="triton")
    with pytest.raises(TypeError, match="fp16, bf16 and fp32"):
        mome_combine(x.double(), logits.double(), mask, ln_w.double(), ln_b.double(), force="triton")


def test_masked_gate_weights_semantics() -> None:
    logits = torch.tensor([[[1.0], [2.0], [3.0]], [[1.0], [2.0], [3.0]]])
    mask = torch.tensor([[True, False, True], [False, False, False]])
    w = masked_gate_weights(logits, mask)
    e = torch.exp(torch.tensor([1.0, 3.0]))
    torch.testing.assert_close(w[0, :, 0], torch.stack([e[0], torch.tensor(0.0), e[1]]) / e.sum())
    assert (w[1] == 0).all() and torch.isfinite(w).all()


@pytest.mark.parametrize("g", [1, 3])
def test_mome_reference_gradcheck(g: int) -> None:
    gen = torch.Generator().manual_seed(_seed("gradcheck", g))
    n, m, k, h = 4, 3, 3, 8
    x = torch.randn(n, m, k, h, generator=gen, dtype=torch.float64, requires_grad=True)
    logits = torch.randn(n, m, g, generator=gen, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[False] * 3, [True] * 3, [True, False, True], [False, True, False]])
    w = torch.randn(h, generator=gen, dtype=torch.float64, requires_grad=True)
    b = torch.randn(h, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: mome_combine_reference(*a[:2], mask, *a[2:]), (x, logits, w, b))


def _loss_fn(force: str):
    def f(x, logits, mask, w, b, dy):
        return (mome_combine(x, logits, mask, w, b, force=force).float() * dy).sum()

    return f


@pytest.mark.parametrize("force", ["torch", "triton"])
def test_mome_torch_compile_aot_eager(force: str) -> None:
    """torch.compile traces the dispatch (torch path: plain ops; triton path: custom ops + fake impls)."""
    torch._dynamo.reset()
    x, logits, mask, ln_w, ln_b, dy = make_inputs(5, 3, 2, 64, 2, torch.float32, _seed("compile", force))
    leaves = [t.clone().requires_grad_(True) for t in (x, logits, ln_w, ln_b)]
    f = _loss_fn(force)
    cf = torch.compile(f, backend="aot_eager", fullgraph=force == "triton")
    got = torch.autograd.grad(cf(leaves[0], leaves[1], mask, leaves[2], leaves[3], dy), leaves)
    exp = torch.autograd.grad(f(leaves[0], leaves[1], mask, leaves[2], leaves[3], dy), leaves)
    for a, e in zip(got, exp):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_mome_torch_compile_inductor_torch_path() -> None:
    """Default (inductor) backend, fullgraph=False, torch path on CPU (slow: C++ codegen)."""
    torch._dynamo.reset()
    x, logits, mask, ln_w, ln_b, dy = make_inputs(5, 3, 2, 64, 1, torch.float32, _seed("inductor"))
    leaves = [t.clone().requires_grad_(True) for t in (x, logits, ln_w, ln_b)]
    f = _loss_fn("torch")
    cf = torch.compile(f, fullgraph=False)
    got = torch.autograd.grad(cf(leaves[0], leaves[1], mask, leaves[2], leaves[3], dy), leaves)
    exp = torch.autograd.grad(f(leaves[0], leaves[1], mask, leaves[2], leaves[3], dy), leaves)
    for a, e in zip(got, exp):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-5)


def test_mome_custom_ops_opcheck() -> None:
    x, logits, mask, ln_w, ln_b, dy = make_inputs(3, 3, 2, 32, 2, torch.float32, _seed("opcheck"))
    torch.library.opcheck(torch.ops.speeder_fast.mome_combine_fwd.default, (x, logits, mask, ln_w, ln_b, 1e-5))
    for g_logits in (logits, logits[:, :, :1].contiguous()):  # G == k and G == 1
        _, stats = torch.ops.speeder_fast.mome_combine_fwd(x, g_logits, mask, ln_w, ln_b, 1e-5)
        torch.library.opcheck(torch.ops.speeder_fast.mome_combine_bwd.default, (dy, x, g_logits, mask, ln_w, stats))
    assert MomeCombineFunction is not None


@pytest.mark.gpu
def test_mome_int64_offsets_cuda() -> None:
    """N*k*H > 2**31 elements: rows past the int32 range are still computed correctly."""
    if DEVICE.type != "cuda":
        pytest.skip("needs CUDA: 2**31-element tensors are too large for the CPU interpreter")
    n, m, k, h = (2**31) // 4096 + 1024, 1, 1, 4096
    need = n * m * k * h * 2 * 2 + (1 << 30)
    if torch.cuda.mem_get_info()[0] < need:
        pytest.skip(f"needs {need / 2**30:.1f} GiB free GPU memory")
    x = torch.randn(n, m, k, h, device=DEVICE, dtype=torch.bfloat16)
    logits = torch.zeros(n, m, 1, device=DEVICE)
    mask = torch.ones(n, m, dtype=torch.bool, device=DEVICE)
    w = torch.ones(h, device=DEVICE)
    b = torch.zeros(h, device=DEVICE)
    with poison_outputs():
        out = mome_combine(x, logits, mask, w, b, force="triton")
    tail = slice(n - 64, n)
    ref = mome_combine_reference(x[tail], logits[tail], mask[tail], w, b)
    assert_close_scaled(out[tail], ref, torch.bfloat16, "tail rows")
    assert torch.isfinite(out[:: 4096]).all()
