"""Prefix KV cache (eval.prefix_cache): cached == uncached to fp32 tolerance on every path that uses it
(right-padded scoring for score / item mode and every paradigm, packing, the static and compiled
scorer, left- and right-padded generation), computed once per model state, invalidated when the
weights change; the packed key layout of the flash / varlen kernels; training with a shared prefix."""

from __future__ import annotations

import pytest
import torch

import tiny
from speeder_fast.model import attention as A
from speeder_fast.model.decoding import _prefill, greedy_decode
from speeder_fast.model.static import StaticScorer

TOL = dict(atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def llm_dir(tmp_path_factory):
    return tiny.make_llm_dir(tmp_path_factory.mktemp("tiny_llama_prefix"))


def _model(llm_dir, paradigm="speeder", mode="score", **kw):
    _, prepared, builder, model = tiny.make_rec_model(llm_dir, paradigm, mode, 2, lora_b_noise=True, **kw)
    model.eval()
    return prepared, builder, model


def _item_model(llm_dir):
    from speeder_fast.model.item_head import ItemHead
    from speeder_fast.model.llm import SpeederRecModel

    _, prepared, builder, model = tiny.make_rec_model(llm_dir, mode="item", k=2, lora_b_noise=True)
    head = ItemHead(64, prepared.dataset.n_items)
    m = SpeederRecModel(model.llm, model.mome, model.positions, item_head=head)
    m.eval()
    return prepared, builder, m


def _batch(prepared, builder, rows=slice(0, 7), **kw):
    v = prepared.valid
    cands = None if builder.item_mode else prepared.valid_candidates[rows]
    return builder.build(v.histories[rows], v.lengths[rows], cands, v.targets[rows], with_answer=False, **kw)


def _off_on(model, fn):
    """``fn()`` with the prefix cache off, then on (on: served from the cache)."""
    model.prefix_cache = False
    with torch.no_grad():
        off = fn()
    model.prefix_cache = True
    with torch.no_grad():
        on = fn()
    return off, on


class _DecoderLengths:
    """Records the sequence length of every decoder forward."""

    def __init__(self, model):
        self.lengths = []
        self.h = model.decoder.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs):
        self.lengths.append(kwargs["inputs_embeds"].shape[1])

    def close(self):
        self.h.remove()


@pytest.mark.parametrize("attn_impl", ["auto", "sdpa", "eager"])
@pytest.mark.parametrize("paradigm", ["speeder", "titles", "verbose"])
def test_padded_scoring_equals_uncached(llm_dir, paradigm, attn_impl):
    prepared, builder, model = _model(llm_dir, paradigm, attn_impl=attn_impl)
    batch = _batch(prepared, builder)
    P = len(batch.prefix)
    assert P > 5 and batch.prefix == tuple(builder.head_ids.tolist())
    assert torch.equal(batch.input_ids[:, :P], torch.tensor(batch.prefix).expand(batch.input_ids.shape[0], -1))
    h_off, h_on = _off_on(model, lambda: model.hidden_states(batch))
    assert h_on.shape == h_off.shape
    torch.testing.assert_close(h_on, h_off, **TOL)
    rec = _DecoderLengths(model)
    s_off, s_on = _off_on(model, lambda: model.score(batch))
    rec.close()
    torch.testing.assert_close(s_on, s_off, **TOL)
    L = batch.input_ids.shape[1]
    assert rec.lengths == [L, L - P]  # cached: the decoder ran on the suffix only
    assert model.prefix_computations == 1  # computed once for this model state, then reused
    with torch.no_grad():
        model.score(_batch(prepared, builder, slice(7, 12)))
    assert model.prefix_computations == 1


def test_item_mode_scores_and_static_scorer_equal_uncached(llm_dir):
    prepared, builder, m = _item_model(llm_dir)
    batch = _batch(prepared, builder)
    P = len(batch.prefix)
    assert builder.item_mode and batch.input_ids.shape[1] < 3 * P  # short prompts: the prefix is a large share
    s_off, s_on = _off_on(m, lambda: m.score(batch))
    assert s_on.shape == (7, prepared.dataset.n_items)
    torch.testing.assert_close(s_on, s_off, **TOL)
    scorer = StaticScorer(m, batch_size=4, length_multiple=8, compile="static")
    st_off, st_on = _off_on(m, lambda: scorer(batch))
    torch.testing.assert_close(st_on, s_off, **TOL)
    torch.testing.assert_close(st_off, s_off, **TOL)
    # with the cache, only the suffix columns are bucketed: [4, ceil((L - P) / 8) * 8]
    L = batch.input_ids.shape[1]
    assert (4, -(-(L - P) // 8) * 8) in scorer.shapes_seen and (4, -(-L // 8) * 8) in scorer.shapes_seen


@pytest.mark.parametrize("paradigm,mode", [("speeder", "score"), ("titles", "score"), ("speeder", "item")])
def test_packed_scoring_equals_uncached_padded(llm_dir, paradigm, mode):
    prepared, builder, model = _item_model(llm_dir) if mode == "item" else _model(llm_dir, paradigm)
    batch = _batch(prepared, builder)
    lens = batch.attention_mask.sum(1)
    assert lens.min() < lens.max()
    model.prefix_cache, model.packing = False, False
    with torch.no_grad():
        ref = model.score(batch)
    model.packing = True
    assert model.uses_packing(batch) and model.prefix_for(batch) is None  # grad mode: not served
    off, on = _off_on(model, lambda: model.score(batch))
    with torch.no_grad():
        h = model.hidden_states(batch)
        assert model.prefix_for(batch) is not None
    assert h.shape[:2] == (1, int(lens.sum()))
    torch.testing.assert_close(off, ref, **TOL)
    torch.testing.assert_close(on, ref, **TOL)
    model.packing = False


def test_hf_attention_with_packing_runs_uncached(llm_dir):
    """transformers' own sdpa cannot mix packing and a cache: packed batches run uncached there."""
    prepared, builder, model = _model(llm_dir, attn_impl="sdpa")
    batch = _batch(prepared, builder)
    model.packing = True
    with torch.no_grad():
        assert model.prefix_for(batch) is None
    model.packing = False
    with torch.no_grad():
        assert model.prefix_for(batch) is not None


@pytest.mark.parametrize("compile_mode", ["static", "aot_eager"])
def test_static_and_compiled_scorer_equal_uncached(llm_dir, compile_mode):
    prepared, builder, model = _model(llm_dir, "speeder")
    kw = dict(compile="default", backend="aot_eager") if compile_mode == "aot_eager" else dict(compile="static")
    scorer = StaticScorer(model, batch_size=8, length_multiple=32, pad_id=builder.pad_id, **kw)
    for rows in (slice(0, 8), slice(8, 11), slice(11, 12)):
        batch = _batch(prepared, builder, rows)
        model.prefix_cache = False
        with torch.no_grad():
            ref = model.score(batch)
        model.prefix_cache = True
        torch.testing.assert_close(scorer(batch), ref, **TOL)
    assert model.prefix_computations == 1


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("paradigm", ["speeder", "titles"])
def test_generation_equals_uncached(llm_dir, paradigm, side):
    prepared, builder, model = _model(llm_dir, paradigm, mode="generate")
    batch = _batch(prepared, builder, padding_side=side)
    lens = batch.attention_mask.sum(1)
    assert lens.min() < lens.max()

    def prefill():
        h, cache, mask, pos = _prefill(model, batch)
        return h, mask.clone(), pos

    (h0, m0, p0), (h1, m1, p1) = _off_on(model, prefill)
    torch.testing.assert_close(h1, h0, **TOL)  # the first answer token's hidden state
    assert torch.equal(p0, p1) and torch.equal(p0, lens)  # the first generated token sits at position len
    if side == "right":
        assert torch.equal(m0, m1)
    # decode steps read the cache (prefix + rest): greedy tokens and constrained answers are identical
    plain_off, plain_on = _off_on(model, lambda: greedy_decode(model, batch, 6, builder.eos_id, builder.pad_id))
    assert torch.equal(plain_on.tokens, plain_off.tokens) and plain_on.tokens.shape[1] == 6
    seqs = torch.from_numpy(builder.answer_sequences(batch.candidates))
    c_off, c_on = _off_on(model, lambda: greedy_decode(model, batch, 0, builder.eos_id, builder.pad_id, seqs))
    assert torch.equal(c_on.choice, c_off.choice) and torch.equal(c_on.n_decoded, c_off.n_decoded)
    # logits of the first two decode steps agree to fp32 tolerance
    for model.prefix_cache in (False, True):
        with torch.no_grad():
            h, cache, mask, pos = _prefill(model, batch)
            tok = model._head(h).argmax(-1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
            h2 = model.decode(model.embed(tok)[:, None], cache, attention_mask=mask, position_ids=pos[:, None])
        if model.prefix_cache:
            torch.testing.assert_close(model._head(h2[:, -1]), ref, **TOL)
        else:
            ref = model._head(h2[:, -1])


def test_left_and_right_padded_generation_agree(llm_dir):
    prepared, builder, model = _model(llm_dir, "titles", mode="generate")
    with torch.no_grad():
        gl = greedy_decode(model, _batch(prepared, builder, padding_side="left"), 5, builder.eos_id, builder.pad_id)
        gr = greedy_decode(model, _batch(prepared, builder, padding_side="right"), 5, builder.eos_id, builder.pad_id)
    assert torch.equal(gl.tokens, gr.tokens)


def test_cache_is_invalidated_when_the_weights_change(llm_dir):
    prepared, builder, model = _model(llm_dir, "speeder")
    batch = _batch(prepared, builder)

    def check(expect_computations):
        off, on = _off_on(model, lambda: model.score(batch))
        torch.testing.assert_close(on, off, **TOL)
        assert model.prefix_computations == expect_computations
        return on

    s0 = check(1)
    check(1)  # same state: reused
    # an optimizer step on LoRA while in eval mode (version counters)
    lora = [p for n, p in model.llm.named_parameters() if "lora_B" in n]
    opt = torch.optim.SGD(lora, lr=1.0)
    for p in lora:
        p.grad = torch.ones_like(p) * 0.01
    opt.step()
    s1 = check(2)
    assert (s1 - s0).abs().max() > 1e-4
    # train() drops it (weights are about to change); eval() alone does not
    model.train()
    assert not model._prefixes
    model.eval()
    check(3)
    model.eval()
    check(3)
    # loading trainable weights
    sd = {k: v.clone() for k, v in model.trainable_state_dict().items()}
    for k in sd:
        if "lora_B" in k:
            sd[k].mul_(0.5)
    model.load_trainable_state_dict(sd)
    check(4)
    # a base weight changed in place (e.g. an added token's embedding row)
    with torch.no_grad():
        model.embed.weight[builder.prefix_ids[0]].add_(0.1)
    check(5)
    # the switch
    model.prefix_cache = False
    with torch.no_grad():
        assert model.prefix_for(batch) is None


def test_prefix_key_layout_for_varlen_kernels():
    """The flash / varlen path lays keys out as [prefix | example i] per example; a reference varlen
    attention over that layout equals the SDPA block path and a plain per-example computation."""
    g = torch.Generator().manual_seed(0)
    lens, P, H, Hkv, D = [3, 7, 1, 5], 4, 4, 2, 8
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    T = sum(lens)
    q = torch.randn(1, H, T, D, generator=g)
    k = torch.randn(1, Hkv, P + T, D, generator=g)
    v = torch.randn(1, Hkv, P + T, D, generator=g)
    index, cu_k = A.prefix_key_index(cu, P, T)
    assert cu_k.tolist() == [c + P * i for i, c in enumerate(cu.tolist())]
    kl = k[0].transpose(0, 1)[index]  # [B*P + T, Hkv, D]
    vl = v[0].transpose(0, 1)[index]
    ref = []
    for i, n in enumerate(lens):
        qi = q[0, :, cu[i]:cu[i + 1]]  # [H, n, D]
        ki = kl[cu_k[i]:cu_k[i + 1]].transpose(0, 1).repeat_interleave(H // Hkv, 0)  # [H, P + n, D]
        vi = vl[cu_k[i]:cu_k[i + 1]].transpose(0, 1).repeat_interleave(H // Hkv, 0)
        # the same keys as the prefix + this example's own tokens
        own = torch.cat([k[0, :, :P], k[0, :, P + cu[i]:P + cu[i + 1]]], 1).repeat_interleave(H // Hkv, 0)
        assert torch.equal(ki, own)
        mask = torch.arange(P + n)[None] <= torch.arange(n)[:, None] + P  # bottom-right causal
        ref.append(torch.nn.functional.scaled_dot_product_attention(qi, ki, vi, attn_mask=mask).transpose(0, 1))
    ref = torch.cat(ref, 0)[None]  # [1, T, H, D]

    class _M(torch.nn.Module):
        is_causal = True

    out, _ = A.speeder_varlen_attention(_M(), q, k, v, None, backend="sdpa", cu_seq_lens_q=cu,
                                        max_length_q=max(lens))
    torch.testing.assert_close(out, ref, **TOL)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (flash/varlen kernels)")
@pytest.mark.parametrize("backend", ["flash", "varlen"])
def test_gpu_packed_prefix_kernels_equal_sdpa(backend):
    if backend == "flash" and not A.flash_attn_available():
        pytest.skip("flash-attn not importable")
    if backend == "varlen" and not A.torch_varlen_available():
        pytest.skip("torch varlen_attn missing")
    g = torch.Generator(device="cuda").manual_seed(0)
    lens, P, H, Hkv, D = [3, 70, 1, 33], 12, 8, 2, 64
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    T = sum(lens)
    q, k, v = (torch.randn(1, h, n, D, generator=g, device="cuda", dtype=torch.bfloat16)
               for h, n in ((H, T), (Hkv, P + T), (Hkv, P + T)))

    class _M(torch.nn.Module):
        is_causal = True

    kw = dict(cu_seq_lens_q=cu, max_length_q=max(lens))
    ref, _ = A.speeder_varlen_attention(_M(), q.float(), k.float(), v.float(), None, backend="sdpa", **kw)
    out, _ = A.speeder_varlen_attention(_M(), q, k, v, None, backend=backend, **kw)
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("packing", [False, True])
def test_training_with_a_shared_prefix_equals_per_example(llm_dir, packing):
    """train.prefix_share: the prefix runs once per forward ([1, P], gradients summed over the batch);
    loss and every gradient equal the per-example forward (LoRA dropout 0)."""
    prepared, builder, model = _model(llm_dir, "speeder")
    v = prepared.valid
    batch = builder.build(v.histories[:6], v.lengths[:6], prepared.valid_candidates[:6], v.targets[:6])
    model.train()
    model.packing = packing

    def run():
        model.zero_grad(set_to_none=True)
        loss = model(batch, label_loss=True)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    model.prefix_train = False
    l0, g0 = run()
    model.prefix_train, model.prefix_cache = True, False  # independent switches (train.prefix_share, eval.prefix_cache)
    rec = _DecoderLengths(model)
    l1, g1 = run()
    rec.close()
    P = len(batch.prefix)
    assert rec.lengths[0] == P  # the prefix ran once, [1, P]
    torch.testing.assert_close(l1, l0, **TOL)
    assert set(g1) == set(g0) and any("lora_A" in n for n in g0)
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], atol=1e-5, rtol=1e-4, msg=lambda m, n=n: f"{n}: {m}")
    # gradient checkpointing drops caches in transformers' training layers: sharing turns itself off
    model.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    rec = _DecoderLengths(model)
    l2, _ = run()
    rec.close()
    model.llm.gradient_checkpointing_disable()
    assert rec.lengths[0] != P
    torch.testing.assert_close(l2, l0, **TOL)
    model.packing = False
