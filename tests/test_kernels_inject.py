"""inject_positions kernel vs its pure-torch reference (CPU: Triton interpreter; GPU: compiled Triton).

Every case draws fresh seeded inputs; kernel outputs (forward and every gradient) are NaN-poisoned
before launch so a missed element fails the comparison.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import pytest
import torch

from speeder_fast.kernels import (
    InjectPositionsFunction,
    inject_positions,
    inject_positions_reference,
    poison_outputs,
    segment_sum_triton,
)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
PLACEHOLDER = 10**9  # deliberately outside the vocabulary: item-slot ids must never be read


def _seed(*parts: object) -> int:
    return zlib.crc32(repr(parts).encode())


@dataclass
class Case:
    shape: tuple[int, ...]  # input_ids shape: (B, L) or (T,)
    n: int  # unique items
    k: int  # tokens per item
    h: int
    vocab: int = 40
    n_abs: int | None = 9  # None = cue disabled
    n_rel: int | None = 7
    dtype: torch.dtype = torch.float32
    slot_frac: float = 0.4
    no_slots: bool = False
    embed_grad: bool = False
    abs_scale: float = 1.0
    slot_dtype: torch.dtype = torch.int64


def make_inputs(c: Case, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    t = 1
    for s in c.shape:
        t *= s
    ids = torch.randint(0, c.vocab, (t,), generator=gen)
    ids[: min(t, 4)] = 3  # repeated text ids (duplicate embedding-grad targets)
    n_rows = c.n * c.k
    is_slot = torch.rand(t, generator=gen) < c.slot_frac
    if c.no_slots:
        is_slot[:] = False
    elif len(c.shape) == 2 and c.shape[0] > 1:
        is_slot.view(c.shape)[-1] = False  # one sequence without any item slot
    # duplicated targets: draw from a few rows so several slots hit the same item row
    slot_item = torch.where(is_slot, torch.randint(0, max(1, n_rows), (t,), generator=gen), -1)
    if is_slot.sum() >= 2:
        first = is_slot.nonzero()[:2, 0]
        slot_item[first[1]] = slot_item[first[0]]
    ids = torch.where(is_slot, torch.full_like(ids, PLACEHOLDER), ids)
    slot_abs = torch.where(is_slot, torch.randint(-1, c.n_abs or 1, (t,), generator=gen), -1)
    slot_rel = torch.where(is_slot, torch.randint(-1, c.n_rel or 1, (t,), generator=gen), -1)
    # cues at text positions must be ignored
    slot_abs = torch.where(is_slot, slot_abs, torch.randint(-1, c.n_abs or 1, (t,), generator=gen))
    embed = torch.randn(c.vocab, c.h, generator=gen)
    items = torch.randn(c.n, c.k, c.h, generator=gen)
    abs_t = torch.randn(c.n_abs, c.h, generator=gen) * 0.1 if c.n_abs else None
    rel_t = torch.randn(c.n_rel, c.h, generator=gen) * 0.1 if c.n_rel else None
    dy = torch.randn(*c.shape, c.h, generator=gen)

    def f(x):
        return None if x is None else x.to(DEVICE, c.dtype)

    def i(x):
        return x.view(c.shape).to(DEVICE, c.slot_dtype)

    return dict(
        input_ids=ids.view(c.shape).to(DEVICE),
        embed_table=f(embed),
        slot_item=i(slot_item),
        slot_abs=i(slot_abs),
        slot_rel=i(slot_rel),
        item_tokens=f(items),
        abs_table=f(abs_t),
        rel_table=f(rel_t),
        dy=f(dy),
    )


TOL = {torch.float32: 1e-5, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}


def assert_close_scaled(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    a, e = actual.double(), expected.double()
    assert a.shape == e.shape, f"{what}: shape {tuple(a.shape)} != {tuple(e.shape)}"
    assert torch.isfinite(a).all(), f"{what}: non-finite values (an element was not written?)"
    tol = TOL[dtype]
    err = (a - e).abs()
    bad = err > tol * (e.abs() + 1.0)
    assert not bad.any(), f"{what}: max err {err.max().item():.3e} (tol {tol})"


def run_both(c: Case) -> dict:
    inp = make_inputs(c, _seed(c))
    dy = inp.pop("dy")
    names = ["item_tokens"] + [n for n in ("abs_table", "rel_table") if inp[n] is not None]
    if c.embed_grad:
        names.append("embed_table")
    kern = dict(inp)
    for n in names:
        kern[n] = inp[n].detach().clone().requires_grad_(True)
    with poison_outputs():
        out = inject_positions(**kern, abs_scale=c.abs_scale, force="triton")
        grads = torch.autograd.grad(out, [kern[n] for n in names], dy)
    assert out.dtype == c.dtype and out.shape == (*c.shape, c.h)
    assert "InjectPositionsFunction" in type(out.grad_fn).__name__
    ref_in = {n: (v.float() if torch.is_floating_point(v) else v) if v is not None else None for n, v in inp.items()}
    for n in names:
        ref_in[n] = ref_in[n].detach().clone().requires_grad_(True)
    ref = inject_positions_reference(**ref_in, abs_scale=c.abs_scale)
    ref_grads = torch.autograd.grad(ref, [ref_in[n] for n in names], dy.float())
    assert_close_scaled(out, ref, c.dtype, "out")
    result = {"out": out}
    for n, a, e in zip(names, grads, ref_grads):
        assert a.dtype == c.dtype and a.shape == kern[n].shape, n
        assert_close_scaled(a, e, c.dtype, f"d {n}")
        result[n] = a
    return result


CASES = {
    "2d_fp32_abs_rel_dups": Case((3, 17), n=5, k=2, h=576),
    "packed_bf16_rel_only": Case((29,), n=7, k=1, h=576, n_abs=None, dtype=torch.bfloat16),
    "no_item_slots": Case((2, 9), n=3, k=4, h=576, no_slots=True),
    "h4096_bf16": Case((2, 5), n=2, k=2, h=4096, dtype=torch.bfloat16, slot_frac=0.6),
    "embed_grad_fp32_scale": Case((4, 11), n=4, k=4, h=64, embed_grad=True, abs_scale=0.37),
    "odd_h_fp16_abs_only": Case((3, 13), n=6, k=1, h=100, n_rel=None, dtype=torch.float16),
    "int32_slots_no_cues": Case((5, 7), n=3, k=2, h=48, n_abs=None, n_rel=None, slot_dtype=torch.int32),
    "many_dups_few_rows": Case((4, 33), n=1, k=2, h=96, slot_frac=0.8, embed_grad=True),
}


@pytest.mark.parametrize("name", list(CASES))
def test_inject_triton_matches_reference(name: str) -> None:
    run_both(CASES[name])


def test_inject_no_slots_gives_zero_item_grads() -> None:
    res = run_both(Case((2, 6), n=3, k=2, h=32, no_slots=True))
    assert (res["item_tokens"] == 0).all() and (res["abs_table"] == 0).all() and (res["rel_table"] == 0).all()


def test_inject_exact_values() -> None:
    """Hand-checked tiny case: text rows are embeddings, slot rows item + 2*abs + rel, cues at text ignored."""
    emb = torch.arange(4 * 2, dtype=torch.float32).view(4, 2).to(DEVICE)
    items = (100 + torch.arange(2 * 1 * 2, dtype=torch.float32)).view(2, 1, 2).to(DEVICE)
    abs_t = torch.tensor([[1.0, 1.0], [10.0, 10.0]], device=DEVICE)
    rel_t = torch.tensor([[0.5, 0.25]], device=DEVICE)
    ids = torch.tensor([2, PLACEHOLDER, 1, PLACEHOLDER], device=DEVICE)
    si = torch.tensor([-1, 1, -1, 0], device=DEVICE)
    sa = torch.tensor([1, 0, -1, 1], device=DEVICE)  # the 1 at a text position must be ignored
    sr = torch.tensor([-1, -1, 0, 0], device=DEVICE)
    expect = torch.tensor([[4.0, 5.0], [104.0, 105.0], [2.0, 3.0], [120.5, 121.25]], device=DEVICE)
    for force in ("torch", "triton"):
        with poison_outputs():
            out = inject_positions(ids, emb, si, sa, sr, items, abs_t, rel_t, abs_scale=2.0, force=force)
        torch.testing.assert_close(out, expect, rtol=0, atol=0)


def test_segment_sum_duplicates_and_ignored_keys() -> None:
    src = torch.arange(6 * 3, dtype=torch.float32, device=DEVICE).view(6, 3)
    keys = torch.tensor([2, -1, 2, 0, 7, 2], device=DEVICE)  # 7 >= n_rows and -1 are ignored
    with poison_outputs():
        out = segment_sum_triton(src, keys, 4, 0.5, torch.float32)
    expect = torch.zeros(4, 3, device=DEVICE)
    expect[2] = 0.5 * (src[0] + src[2] + src[5])
    expect[0] = 0.5 * src[3]
    torch.testing.assert_close(out, expect, rtol=0, atol=0)


def test_inject_backward_is_deterministic() -> None:
    c = Case((3, 21), n=2, k=2, h=64, slot_frac=0.7)
    inp = make_inputs(c, _seed("det"))
    dy = inp.pop("dy")
    inp["item_tokens"].requires_grad_(True)
    runs = []
    for _ in range(2):
        out = inject_positions(**inp, force="triton")
        runs.append(torch.autograd.grad(out, inp["item_tokens"], dy)[0])
    assert torch.equal(runs[0], runs[1])


def test_inject_dispatch_and_validation() -> None:
    c = Case((2, 8), n=2, k=2, h=16)
    inp = make_inputs(c, _seed("dispatch"))
    inp.pop("dy")
    ref = inject_positions_reference(**inp)
    torch.testing.assert_close(inject_positions(**inp, force="torch"), ref)
    inp["item_tokens"].requires_grad_(True)
    auto = inject_positions(**inp)
    assert ("InjectPositionsFunction" in type(auto.grad_fn).__name__) == (DEVICE.type == "cuda")
    with pytest.raises(ValueError, match="force"):
        inject_positions(**inp, force="gpu")
    bad = dict(inp, slot_item=inp["slot_item"][:, :-1])
    with pytest.raises(ValueError, match="slot_item"):
        inject_positions(**bad, force="triton")
    bad = dict(inp, abs_table=torch.zeros(3, 5, device=DEVICE))
    with pytest.raises(ValueError, match="abs_table"):
        inject_positions(**bad, force="torch")
    bad = dict(inp, slot_rel=inp["slot_rel"].float())
    with pytest.raises(TypeError, match="slot_rel"):
        inject_positions(**bad, force="triton")


@pytest.mark.parametrize("with_cues", [True, False])
def test_inject_reference_gradcheck(with_cues: bool) -> None:
    c = Case((3, 7), n=3, k=2, h=5, slot_frac=0.6, n_abs=4 if with_cues else None, n_rel=3 if with_cues else None)
    inp = make_inputs(c, _seed("gradcheck", with_cues))
    inp.pop("dy")
    names = ["embed_table", "item_tokens"] + (["abs_table", "rel_table"] if with_cues else [])
    leaves = [inp[n].double().requires_grad_(True) for n in names]

    def f(*ts):
        kw = dict(inp, **dict(zip(names, ts)))
        return inject_positions_reference(**kw, abs_scale=0.7)

    assert torch.autograd.gradcheck(f, tuple(leaves))


@pytest.mark.parametrize("force", ["torch", "triton"])
def test_inject_torch_compile_aot_eager(force: str) -> None:
    torch._dynamo.reset()
    c = Case((2, 9), n=3, k=2, h=32)
    inp = make_inputs(c, _seed("compile", force))
    dy = inp.pop("dy")
    names = ["item_tokens", "abs_table", "rel_table"]
    for n in names:
        inp[n].requires_grad_(True)

    def f(d):
        return (inject_positions(**d, abs_scale=0.5, force=force) * dy).sum()

    cf = torch.compile(f, backend="aot_eager", fullgraph=force == "triton")
    got = torch.autograd.grad(cf(inp), [inp[n] for n in names])
    exp = torch.autograd.grad(f(inp), [inp[n] for n in names])
    for a, e in zip(got, exp):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_inject_torch_compile_inductor_torch_path() -> None:
    """Default (inductor) backend, fullgraph=False, torch path on CPU (slow: C++ codegen)."""
    torch._dynamo.reset()
    c = Case((2, 9), n=3, k=2, h=32)
    inp = make_inputs(c, _seed("inductor"))
    dy = inp.pop("dy")
    inp["item_tokens"].requires_grad_(True)

    def f(d):
        return (inject_positions(**d, force="torch") * dy).sum()

    got = torch.autograd.grad(torch.compile(f)(inp), inp["item_tokens"])[0]
    exp = torch.autograd.grad(f(inp), inp["item_tokens"])[0]
    torch.testing.assert_close(got, exp, rtol=1e-5, atol=1e-6)


def test_inject_custom_ops_opcheck() -> None:
    c = Case((2, 6), n=2, k=2, h=16)
    inp = make_inputs(c, _seed("opcheck"))
    dy = inp.pop("dy")
    args = tuple(inp[n] for n in ("input_ids", "embed_table", "slot_item", "slot_abs", "slot_rel", "item_tokens", "abs_table", "rel_table"))
    torch.library.opcheck(torch.ops.speeder_fast.inject_positions_fwd.default, (*args, 0.5))
    torch.library.opcheck(torch.ops.speeder_fast.inject_positions_fwd.default, (*args[:6], None, None, 1.0))
    keys = inp["slot_item"].reshape(-1)
    torch.library.opcheck(torch.ops.speeder_fast.segment_sum.default, (dy.reshape(-1, 16), keys, 4, 1.0, torch.float32))
    slots = (inp["slot_item"], inp["slot_abs"], inp["slot_rel"])
    torch.library.opcheck(torch.ops.speeder_fast.inject_positions_bwd.default, (dy, *slots, 4, 9, 7, 0.5, torch.float32))
    torch.library.opcheck(torch.ops.speeder_fast.inject_positions_bwd.default, (dy, *slots, 4, 0, 0, 1.0, torch.float32))
    assert InjectPositionsFunction is not None


@pytest.mark.gpu
def test_inject_int64_offsets_cuda() -> None:
    """T*H > 2**31 output elements: positions past the int32 range are spliced correctly."""
    if DEVICE.type != "cuda":
        pytest.skip("needs CUDA: 2**31-element tensors are too large for the CPU interpreter")
    h = 4096
    t = (2**31) // h + 4096
    need = t * h * 2 + (1 << 30)
    if torch.cuda.mem_get_info()[0] < need:
        pytest.skip(f"needs {need / 2**30:.1f} GiB free GPU memory")
    emb = torch.randn(64, h, device=DEVICE, dtype=torch.bfloat16)
    items = torch.randn(8, 1, h, device=DEVICE, dtype=torch.bfloat16)
    ids = torch.arange(t, device=DEVICE) % 64
    si = torch.where(ids % 3 == 0, ids % 8, -1)
    none = torch.full_like(si, -1)
    with poison_outputs():
        out = inject_positions(ids, emb, si, none, none, items, None, None, force="triton")
    tail = slice(t - 4096, t)
    ref = inject_positions_reference(ids[tail], emb, si[tail], none[tail], none[tail], items, None, None)
    assert torch.equal(out[tail], ref)
    assert torch.isfinite(out[:: 8192]).all()


def test_inject_mixed_table_dtypes() -> None:
    """bf16 item tokens with fp32 cue tables: the fused backward reduces in fp32 and casts per table."""
    c = Case((3, 10), n=4, k=2, h=40, slot_frac=0.7)
    inp = make_inputs(c, _seed("mixed"))
    dy = inp.pop("dy").to(torch.bfloat16)
    inp["item_tokens"] = inp["item_tokens"].to(torch.bfloat16)
    names = ("item_tokens", "abs_table", "rel_table")
    for n in names:
        inp[n].requires_grad_(True)
    with poison_outputs():
        out = inject_positions(**inp, abs_scale=2.0, force="triton")
        grads = torch.autograd.grad(out, [inp[n] for n in names], dy)
    ref_in = dict(inp, **{n: inp[n].detach().float().requires_grad_(True) for n in names})
    ref = inject_positions_reference(**ref_in, abs_scale=2.0)
    ref_grads = torch.autograd.grad(ref, [ref_in[n] for n in names], dy.float())
    assert_close_scaled(out, ref, torch.bfloat16, "out")
    for n, a, e in zip(names, grads, ref_grads):
        assert a.dtype == inp[n].dtype, n
        assert_close_scaled(a, e, torch.bfloat16 if a.dtype == torch.bfloat16 else torch.float32, f"d {n}")
