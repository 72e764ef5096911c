"""SpeederRecModel with the fast path wired in: packing on == packing off (CPU, SDPA block path),
capability selection log lines, catalogue caching at inference, generate with packing on."""

import logging

import pytest
import torch

import tiny
from speeder_fast.model.llm import match_generated, resolve_packing


@pytest.fixture(scope="module")
def llm_dir(tmp_path_factory):
    return tiny.make_llm_dir(tmp_path_factory.mktemp("tiny_llama_fast"))


def _setup(llm_dir, paradigm="speeder", mode="score", k=2, attn_impl="auto", liger="auto"):
    _, prepared, builder, model = tiny.make_rec_model(llm_dir, paradigm, mode, k, lora_b_noise=True,
                                                      attn_impl=attn_impl, liger=liger)
    return prepared, builder, model


def _batch(prepared, builder, n=7, **kw):
    v = prepared.valid
    return builder.build(v.histories[:n], v.lengths[:n], prepared.valid_candidates[:n], v.targets[:n], **kw)


def _scores_off_on(model, batch):
    """``score(batch)`` with packing off, then on (no grad); the model is left with packing on."""
    with torch.no_grad():
        model.set_packing("off")
        off = model.score(batch)
        model.set_packing("on")
        on = model.score(batch)
    return off, on


def _loss_and_grads(model, batch, label_loss):
    model.zero_grad(set_to_none=True)
    loss = model(batch, label_loss=label_loss)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


@pytest.mark.parametrize("paradigm,mode", [("speeder", "score"), ("speeder", "generate"), ("verbose", "score")])
def test_packing_on_equals_off(llm_dir, paradigm, mode):
    prepared, builder, model = _setup(llm_dir, paradigm=paradigm, mode=mode)
    assert model.attn_impl == "speeder_varlen_sdpa" and not model.packing  # CPU auto: padded
    batch = _batch(prepared, builder)
    lens = batch.attention_mask.sum(1)
    assert lens.min() < lens.max(), "the batch must have variable lengths"
    assert batch.packed is not None and batch.packed.num_tokens == int(lens.sum())
    model.train()
    for label_loss in ([False, True] if mode == "score" else [False]):
        model.set_packing("off")
        l_off, g_off = _loss_and_grads(model, batch, label_loss)
        model.set_packing("on")
        assert model.uses_packing(batch)
        l_on, g_on = _loss_and_grads(model, batch, label_loss)
        torch.testing.assert_close(l_on, l_off, atol=1e-5, rtol=1e-5)
        assert set(g_on) == set(g_off)
        assert any("lora_B" in n for n in g_on)
        if paradigm == "speeder":
            assert any(n.startswith("mome.experts") for n in g_on)
            assert {"positions.abs_table", "positions.rel_table"} <= set(g_on)
        for n in g_off:
            torch.testing.assert_close(g_on[n], g_off[n], atol=1e-5, rtol=1e-5, msg=lambda m, n=n: f"{n}: {m}")
    model.eval()
    sbatch = _batch(prepared, builder, with_answer=False)
    s_off, s_on = _scores_off_on(model, sbatch)
    with torch.no_grad():
        h = model.hidden_states(sbatch)
    assert h.shape[:2] == (1, int(sbatch.attention_mask.sum()))  # packed: real tokens only
    assert s_on.shape == (7, 8)
    torch.testing.assert_close(s_on, s_off, atol=1e-5, rtol=1e-5)


def test_packed_batch_moves_with_prompt_batch(llm_dir):
    prepared, builder, _ = _setup(llm_dir, paradigm="titles")
    b = _batch(prepared, builder, n=3).to("cpu")
    assert b.packed is not None and b.packed.max_seqlen == int(b.attention_mask.sum(1).max())
    # the packed row holds exactly the real tokens, example by example
    real = torch.cat([b.input_ids[i][b.attention_mask[i].bool()] for i in range(3)])
    assert torch.equal(b.packed.input_ids[0], real)


def test_selection_log_lines(llm_dir, caplog):
    lg = logging.getLogger("speeder_fast")
    lg.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.INFO, logger="speeder_fast"):
            _, _, model = _setup(llm_dir, paradigm="titles")
    finally:
        lg.removeHandler(caplog.handler)
    text = caplog.text
    assert "attention: speeder_varlen_sdpa (auto: no CUDA device" in text
    assert "liger: not applied" in text and "need CUDA" in text
    assert "packing: off (auto: cpu" in text
    assert model.use_liger is False


def test_explicit_requests_on_cpu(llm_dir):
    with pytest.raises(RuntimeError, match="needs a CUDA device"):
        _setup(llm_dir, paradigm="titles", attn_impl="flash")
    with pytest.raises(RuntimeError, match="liger=on"):
        _setup(llm_dir, paradigm="titles", liger="on")
    _, _, model = _setup(llm_dir, paradigm="titles", attn_impl="eager")
    assert model.attn_impl == "eager"


def test_resolve_packing_rules():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")  # device objects only: no CUDA needed
    assert resolve_packing("auto", "speeder_varlen_fa", cuda)[0] is True
    assert resolve_packing("auto", "speeder_varlen_torch", cuda)[0] is True
    assert resolve_packing("auto", "speeder_varlen_sdpa", cuda)[0] is False
    assert resolve_packing("auto", "speeder_varlen_sdpa", cpu)[0] is False
    assert resolve_packing("on", "sdpa", cpu)[0] is True
    assert resolve_packing("off", "speeder_varlen_fa", cuda)[0] is False
    with pytest.raises(ValueError, match="train.packing"):
        resolve_packing("yes", "sdpa", cpu)


def test_hf_sdpa_packed_equals_padded(llm_dir):
    """attn_impl=sdpa (transformers' own) with packing on: boundaries from position_ids."""
    prepared, builder, model = _setup(llm_dir, paradigm="titles", attn_impl="sdpa")
    model.eval()
    b = _batch(prepared, builder, with_answer=False)
    off, on = _scores_off_on(model, b)
    torch.testing.assert_close(on, off, atol=1e-5, rtol=1e-5)


def test_score_uses_cached_catalogue(llm_dir):
    prepared, builder, model = _setup(llm_dir)
    model.eval()
    calls = []
    orig = model.mome.encode
    model.mome.encode = lambda items: (calls.append(int(items.numel())), orig(items))[1]
    b = _batch(prepared, builder, with_answer=False)
    with torch.no_grad():
        first = model.score(b)
        n_first = len(calls)
        second = model.score(b)
    assert n_first >= 1 and sum(calls) == prepared.dataset.n_items  # the whole catalogue, once
    assert len(calls) == n_first  # second batch: no encode at all
    torch.testing.assert_close(first, second)
    # and the cached tokens equal a fresh encode of the batch's items
    with torch.no_grad():
        fresh = orig(b.unique_items)
    torch.testing.assert_close(model.mome.encode_catalog()[b.unique_items], fresh)


def test_generate_works_with_packing_on(llm_dir):
    prepared, builder, model = _setup(llm_dir, paradigm="speeder", mode="generate")
    model.eval()
    model.set_packing("on")
    g = _batch(prepared, builder, n=3, with_answer=False, padding_side="left")
    gen_on = model.generate(g, 6, builder.eos_id, builder.pad_id)
    model.set_packing("off")
    gen_off = model.generate(g, 6, builder.eos_id, builder.pad_id)
    assert gen_on.shape[0] == 3 and 1 <= gen_on.shape[1] <= 6
    assert torch.equal(gen_on, gen_off)
    texts, pred = match_generated(builder, gen_on, g.candidates)
    assert len(texts) == 3 and pred.shape == (3,)


@pytest.mark.parametrize("side", ["right", "left"])
def test_builder_packing_equals_pack_padded(llm_dir, side):
    """PromptBuilder's numpy packing == packing.pack_padded of the padded tensors."""
    from speeder_fast.model.packing import pack_padded

    prepared, builder, _ = _setup(llm_dir, paradigm="speeder")
    b = _batch(prepared, builder, padding_side=side)
    ref = pack_padded(b.input_ids, b.attention_mask, b.slot_item, b.slot_abs, b.slot_rel)
    got = b.packed
    for name in ("input_ids", "position_ids", "cu_seqlens", "seq_index", "lengths", "flat_index", "padded_to_packed"):
        a, r = getattr(got, name), getattr(ref, name)
        assert a.dtype == r.dtype and torch.equal(a, r), name
    assert got.max_seqlen == ref.max_seqlen and got.padded_shape == ref.padded_shape
    assert all(torch.equal(x, y) for x, y in zip(got.extras, ref.extras)) and len(got.extras) == 3
