"""StaticScorer (static-shape, optionally compiled scoring) == SpeederRecModel.score on CPU."""

import pytest
import torch

import tiny
from speeder_fast.model.static import StaticScorer, resolve_compile


@pytest.fixture(scope="module")
def llm_dir(tmp_path_factory):
    return tiny.make_llm_dir(tmp_path_factory.mktemp("tiny_llama_static"))


def _batch(prepared, builder, rows):
    v = prepared.valid
    return builder.build(v.histories[rows], v.lengths[rows], prepared.valid_candidates[rows], v.targets[rows],
                         with_answer=False)


@pytest.mark.parametrize("paradigm", ["speeder", "verbose"])
def test_static_equals_eager(llm_dir, paradigm):
    _, prepared, builder, model = tiny.make_rec_model(llm_dir, paradigm, lora_b_noise=True)
    model.eval()
    scorer = StaticScorer(model, batch_size=8, length_multiple=16, compile="static", pad_id=builder.pad_id)
    for rows in (slice(0, 5), slice(5, 13), slice(13, 24), slice(24, 25)):  # partial, full, over-full (chunked), single
        batch = _batch(prepared, builder, rows)
        with torch.no_grad():
            ref = model.score(batch)
        got = scorer(batch)
        assert got.shape == ref.shape and got.dtype == torch.float32
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    # every forward ran at [batch_size, multiple of 16]
    assert scorer.shapes_seen and all(b == 8 and L % 16 == 0 for b, L in scorer.shapes_seen)
    if paradigm == "speeder":
        # the catalogue path must really read the item tokens: changing them changes the scores
        batch = _batch(prepared, builder, slice(0, 5))
        before = scorer(batch)
        with torch.no_grad():
            model.mome.ln_bias.add_(0.5)
        model.mome.clear_cache()
        after = scorer(batch)
        assert (after - before).abs().max() > 1e-3
        with torch.no_grad():
            torch.testing.assert_close(after, model.score(batch), atol=1e-5, rtol=1e-5)


def test_padding_rows_and_slots(llm_dir):
    """Padded rows are pure padding, item slots point at catalogue rows of the right items."""
    _, prepared, builder, model = tiny.make_rec_model(llm_dir, "speeder", k=2)
    scorer = StaticScorer(model, batch_size=6, length_multiple=32, compile="static", pad_id=builder.pad_id)
    batch = _batch(prepared, builder, slice(0, 4))
    ids, slot, s_abs, s_rel, ans, labels = scorer.padded_inputs(batch)
    B, L = batch.input_ids.shape
    assert ids.shape == (6, 32 * -(-L // 32)) and slot.shape == ids.shape == s_abs.shape == s_rel.shape
    assert (ids[B:] == builder.pad_id).all() and (slot[B:] == -1).all() and (ans[B:] == 0).all()
    assert (slot[:, L:] == -1).all()
    torch.testing.assert_close(ids[:B, :L], batch.input_ids)
    real = batch.slot_item >= 0
    k = model.mome.k
    want = batch.unique_items[batch.slot_item[real] // k] * k + batch.slot_item[real] % k
    assert torch.equal(slot[:B, :L][real], want)
    assert (slot[:B, :L][~real] == -1).all()


def test_compiled_equals_eager(llm_dir):
    """torch.compile path (aot_eager backend: dynamo + AOT autograd, no C++ toolchain needed)."""
    _, prepared, builder, model = tiny.make_rec_model(llm_dir, "speeder", lora_b_noise=True)
    model.eval()
    scorer = StaticScorer(model, batch_size=8, length_multiple=64, compile="default", backend="aot_eager",
                          pad_id=builder.pad_id)
    for rows in (slice(0, 8), slice(8, 11)):
        batch = _batch(prepared, builder, rows)
        with torch.no_grad():
            ref = model.score(batch)
        torch.testing.assert_close(scorer(batch), ref, atol=1e-5, rtol=1e-5)


def test_resolve_and_errors(llm_dir):
    assert resolve_compile("auto", "cpu") == "off"
    assert resolve_compile("auto", "cuda") == "reduce-overhead"
    assert resolve_compile("static", "cpu") == "static"
    with pytest.raises(ValueError, match="eval.compile"):
        resolve_compile("fast", "cpu")
    _, prepared, builder, model = tiny.make_rec_model(llm_dir, "speeder")
    with pytest.raises(ValueError, match="resolved mode"):
        StaticScorer(model, 4, compile="auto")
    left = builder.build(prepared.valid.histories[:2], prepared.valid.lengths[:2], prepared.valid_candidates[:2],
                         None, with_answer=False, padding_side="left")
    with pytest.raises(ValueError, match="right-padded"):
        StaticScorer(model, 4, compile="static")(left)


def test_evaluate_split_static_equals_eager(llm_dir):
    """eval.compile=static gives the same metrics as eager scoring (and generate mode ignores it)."""
    from speeder_fast.config import Config, ConfigError, validate
    from speeder_fast.evaluate import evaluate_split

    _, prepared, builder, model = tiny.make_rec_model(llm_dir, "speeder", lora_b_noise=True)
    kw = dict(max_examples=11, batch_size=4, progress=False)
    eager = evaluate_split(model, builder, prepared, "valid", "score", **kw)
    static = evaluate_split(model, builder, prepared, "valid", "score", compile_mode="static", length_multiple=16, **kw)
    for key in ("VHR@1", "HR@5", "NDCG@10"):
        assert static[key] == pytest.approx(eager[key], abs=1e-9), key
    cfg = Config()
    cfg.eval.compile = "fast"
    with pytest.raises(ConfigError, match="eval.compile"):
        validate(cfg)


def test_attention_under_compile_ignores_position_boundaries():
    """Compiled callers pass cu_seq_lens for packed rows; a row without them is one example (no
    data-dependent boundary search inside a graph)."""
    from speeder_fast.model.attention import speeder_varlen_attention

    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 6, 8) for _ in range(3))
    pos = torch.tensor([[0, 1, 2, 0, 1, 2]])  # looks like two packed examples
    mod = torch.nn.Module()
    mod.is_causal = True

    def f(q, k, v, pos):
        return speeder_varlen_attention(mod, q, k, v, None, position_ids=pos, backend="sdpa")[0]

    eager_packed = f(q, k, v, pos)  # eager: boundaries from position_ids
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)(q, k, v, pos)
    one_example = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2)
    torch.testing.assert_close(compiled, one_example)
    assert not torch.allclose(eager_packed, one_example)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (CUDA graphs)")
def test_gpu_reduce_overhead_equals_eager(llm_dir):
    """reduce-overhead (inductor + CUDA graph replay) == eager scores on CUDA, over several replays
    of two length buckets; every call returns its own tensor (not the graph's reused output)."""
    _, prepared, builder, model = tiny.make_rec_model(llm_dir, "speeder", lora_b_noise=True)
    model = model.to("cuda").eval()
    scorer = StaticScorer(model, batch_size=8, length_multiple=32, compile="reduce-overhead", pad_id=builder.pad_id)
    outs, refs = [], []
    for rows in (slice(0, 8), slice(8, 13), slice(0, 8), slice(13, 21), slice(0, 8)):
        batch = _batch(prepared, builder, rows).to("cuda")
        with torch.no_grad():
            refs.append(model.score(batch).float())
        outs.append(scorer(batch))
    for got, ref in zip(outs, refs):  # checked after all calls: earlier outputs must survive later replays
        torch.testing.assert_close(got, ref, atol=2e-4, rtol=2e-4)
