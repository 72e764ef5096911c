"""speeder_varlen attention: packed forward == padded forward (logits, loss, gradients), selection."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from speeder_fast.model import attention as A
from speeder_fast.model.loss import answer_indices, answer_token_loss, gather_answer_hidden
from speeder_fast.model.packing import pack_padded
from test_fastpath_helpers import decoder_of, lm_head_of, tiny_llama, twin, var_batch

LENS = [5, 11, 3, 8]
TOL = 1e-5
CUDA = torch.cuda.is_available()


def _kwargs(pb, mode: str) -> dict:
    kw = pb.model_kwargs()
    if mode == "position_ids":  # boundaries derived from position_ids (block-diagonal SDPA)
        return {"position_ids": kw["position_ids"]}
    if mode == "cu_only":  # cu_seq_lens without max_length
        return {"position_ids": kw["position_ids"], "cu_seq_lens_q": kw["cu_seq_lens_q"]}
    return kw


def _padded_run(model, ids, mask, labels, device="cpu"):
    emb = model.get_input_embeddings()(ids.to(device)).detach().requires_grad_(True)
    hid = decoder_of(model)(inputs_embeds=emb, attention_mask=mask.to(device), use_cache=False).last_hidden_state
    idx, tgt = answer_indices(labels)
    rows, tgt = gather_answer_hidden(hid, index=idx, targets=tgt)
    loss = answer_token_loss(rows, lm_head_of(model).weight, tgt)
    logits = lm_head_of(model)(hid)
    return emb, logits, loss


def _packed_run(model, pb, mode="full", device="cpu"):
    pbd = pb.to(device)
    emb = model.get_input_embeddings()(pbd.input_ids).detach().requires_grad_(True)
    hid = decoder_of(model)(inputs_embeds=emb, use_cache=False, **_kwargs(pbd, mode)).last_hidden_state
    idx, tgt = answer_indices(pb.extras[0], cu_seqlens=pb.cu_seqlens)  # collate time, CPU
    rows, tgt = gather_answer_hidden(hid, index=idx, targets=tgt)
    loss = answer_token_loss(rows, lm_head_of(model).weight, tgt)
    logits = lm_head_of(model)(hid)
    return emb, logits, loss


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


def test_registered():
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    for name in A.IMPLEMENTATIONS:
        assert name in AttentionInterface._global_mapping
        assert name in AttentionMaskInterface._global_mapping
        assert "flash" not in name  # transformers treats any '*flash*' name as a flash-attn kernel


@pytest.mark.parametrize("impl,mode", [
    ("speeder_varlen", "full"),
    ("speeder_varlen_sdpa", "full"),
    ("speeder_varlen_sdpa", "position_ids"),
    ("speeder_varlen_sdpa", "cu_only"),
])
def test_packed_matches_padded(impl, mode):
    ref = tiny_llama("sdpa")
    model = twin(ref, impl)
    ids, mask, labels = var_batch(LENS)
    pb = pack_padded(ids, mask, labels)

    emb_p, logits_p, loss_p = _padded_run(ref, ids, mask, labels)
    emb_k, logits_k, loss_k = _packed_run(model, pb, mode)
    m = mask.bool()
    torch.testing.assert_close(pb.unpack(logits_k)[m], logits_p[m], atol=TOL, rtol=TOL)
    torch.testing.assert_close(loss_k, loss_p, atol=TOL, rtol=TOL)

    loss_p.backward()
    loss_k.backward()
    torch.testing.assert_close(pb.unpack(emb_k.grad)[m], emb_p.grad[m], atol=TOL, rtol=TOL)
    assert emb_p.grad[~m].abs().max() == 0  # padding never influences real tokens
    gp, gk = _grads(ref), _grads(model)
    assert gp.keys() == gk.keys() and len(gp) > 10
    for n in gp:
        torch.testing.assert_close(gk[n], gp[n], atol=TOL, rtol=TOL, msg=lambda s, n=n: f"{n}: {s}")


def test_packed_matches_padded_lora():
    peft = pytest.importorskip("peft")
    base = tiny_llama("sdpa")
    cfg = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False,
                          target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    ref = peft.get_peft_model(base, cfg)
    model = twin(ref, "speeder_varlen")
    from speeder_fast.model.liger import unwrap_model

    unwrap_model(model).set_attn_implementation("speeder_varlen")
    assert unwrap_model(model).config._attn_implementation == "speeder_varlen"
    assert unwrap_model(ref).config._attn_implementation == "sdpa"
    ids, mask, labels = var_batch(LENS, seed=5)
    pb = pack_padded(ids, mask, labels)
    emb_p, logits_p, loss_p = _padded_run(ref, ids, mask, labels)
    emb_k, logits_k, loss_k = _packed_run(model, pb)
    m = mask.bool()
    torch.testing.assert_close(pb.unpack(logits_k)[m], logits_p[m], atol=TOL, rtol=TOL)
    torch.testing.assert_close(loss_k, loss_p, atol=TOL, rtol=TOL)
    loss_p.backward()
    loss_k.backward()
    torch.testing.assert_close(pb.unpack(emb_k.grad)[m], emb_p.grad[m], atol=TOL, rtol=TOL)
    gp, gk = _grads(ref), _grads(model)
    assert gp.keys() == gk.keys() and all("lora_" in n for n in gp) and len(gp) == 2 * 7 * 2
    for n in gp:
        assert gp[n].abs().max() > 0
        torch.testing.assert_close(gk[n], gp[n], atol=TOL, rtol=TOL, msg=lambda s, n=n: f"{n}: {s}")


@pytest.mark.parametrize("left", [False, True])
def test_padded_mask_path_matches_hf(left):
    """A 2-D padding mask reaches speeder_varlen (the mask hook keeps it) and gives HF's result."""
    ref = tiny_llama("eager")
    model = twin(ref, "speeder_varlen")
    ids, mask, _ = var_batch(LENS, left=left)
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask).logits
        got = model(input_ids=ids, attention_mask=mask).logits
    m = mask.bool()
    torch.testing.assert_close(got[m], want[m], atol=TOL, rtol=TOL)
    assert torch.isfinite(got).all()


def test_generate_with_kv_cache_matches_eager():
    ref = tiny_llama("eager", use_cache=True)
    model = twin(ref, "speeder_varlen")
    ids, mask, _ = var_batch([6, 4, 5], left=True)
    kw = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        want = ref.generate(ids, **kw)
        got = model.generate(ids, **kw)
    assert torch.equal(got, want)


def _per_example_sdpa(q, k, v, cu, causal=True):
    n_rep = q.shape[1] // k.shape[1]
    outs = []
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
        qs, ks, vs = q[:, :, s:e], k[:, :, s:e].repeat_interleave(n_rep, 1), v[:, :, s:e].repeat_interleave(n_rep, 1)
        outs.append(F.scaled_dot_product_attention(qs, ks, vs, is_causal=causal))
    return torch.cat(outs, 2).transpose(1, 2)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("mode", ["full", "position_ids", "cu_only"])
def test_op_level_sdpa_backend_gqa(causal, mode):
    torch.manual_seed(0)
    lens = [4, 1, 7, 3]
    t = sum(lens)
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
    pos = torch.cat([torch.arange(n) for n in lens])[None]
    q, k, v = torch.randn(1, 6, t, 8), torch.randn(1, 2, t, 8), torch.randn(1, 2, t, 8)
    kw = {"position_ids": pos}
    if mode in ("full", "cu_only"):
        kw["cu_seq_lens_q"] = kw["cu_seq_lens_k"] = cu
    if mode == "full":
        kw["max_length_q"] = kw["max_length_k"] = max(lens)
    mod = torch.nn.Module()
    out, _ = A.speeder_varlen_attention(mod, q, k, v, None, is_causal=causal, backend="sdpa", **kw)
    torch.testing.assert_close(out, _per_example_sdpa(q, k, v, cu, causal), atol=1e-6, rtol=1e-6)


def test_runtime_backend_errors():
    q = torch.randn(1, 2, 5, 8)
    with pytest.raises(RuntimeError, match="needs CUDA"):
        A.speeder_varlen_attention(torch.nn.Module(), q, q, q, None, backend="flash")
    with pytest.raises(ValueError, match="packed input must be one row"):
        qq = torch.randn(2, 2, 5, 8)
        A._varlen_info(qq, {"cu_seq_lens_q": torch.tensor([0, 5], dtype=torch.int32), "max_length_q": 5})


class _ListHandler(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def _logger():
    lg = logging.getLogger("test_fastpath_attention.select")
    lg.handlers[:] = []
    h = _ListHandler()
    lg.addHandler(h)
    lg.setLevel(logging.INFO)
    lg.propagate = False
    return lg, h


def test_select_attention_cpu():
    lg, h = _logger()
    assert A.select_attention("auto", "cpu", logger=lg) == A.IMPL_SDPA
    assert len(h.lines) == 1 and "speeder_varlen_sdpa" in h.lines[0] and "no CUDA" in h.lines[0]
    assert A.select_attention("sdpa", "cpu", logger=lg) == "sdpa"
    assert A.select_attention("eager", "cpu", logger=lg) == "eager"
    with pytest.raises(RuntimeError, match="attn_impl=flash needs a CUDA device"):
        A.select_attention("flash", "cpu", logger=lg)
    with pytest.raises(RuntimeError, match="attn_impl=varlen needs a CUDA device"):
        A.select_attention("varlen", "cpu", logger=lg)
    with pytest.raises(ValueError, match="not one of"):
        A.select_attention("flex", "cpu", logger=lg)


@pytest.mark.parametrize("fa,tv,want", [(True, True, A.IMPL_FA), (False, True, A.IMPL_TORCH),
                                         (False, False, A.IMPL_SDPA)])
def test_select_attention_auto_on_cuda(monkeypatch, fa, tv, want):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(A, "flash_attn_available", lambda: fa)
    monkeypatch.setattr(A, "torch_varlen_available", lambda: tv)
    lg, h = _logger()
    assert A.select_attention("auto", "cuda", logger=lg) == want
    assert len(h.lines) == 1 and want in h.lines[0]
    assert A.select_attention("auto", "cuda", logger=lg, dtype=torch.bfloat16) == want
    assert A.select_attention("auto", "cuda", logger=lg, dtype=torch.float32) == A.IMPL_SDPA
    assert "float32 model" in h.lines[-1]


def test_select_attention_requested_but_missing(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(A, "flash_attn_available", lambda: False)
    monkeypatch.setattr(A, "torch_varlen_available", lambda: False)
    lg, _ = _logger()
    with pytest.raises(RuntimeError, match="flash-attn is not importable"):
        A.select_attention("flash", "cuda", logger=lg)
    with pytest.raises(RuntimeError, match="varlen_attn"):
        A.select_attention("varlen", "cuda", logger=lg)


# ----------------------------------------------------------------------------------------- GPU only

gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA device (flash/varlen kernels)")


def _gpu_backends():
    out = [pytest.param("speeder_varlen_sdpa", id="sdpa")]
    out.append(pytest.param("speeder_varlen_torch", id="torch-varlen", marks=pytest.mark.skipif(
        not (CUDA and A.torch_varlen_available()), reason="torch.nn.attention.varlen missing")))
    out.append(pytest.param("speeder_varlen_fa", id="flash-attn", marks=pytest.mark.skipif(
        not (CUDA and A.flash_attn_available()), reason="flash-attn not importable")))
    out.append(pytest.param("speeder_varlen", id="auto"))
    return out


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("impl", _gpu_backends())
def test_gpu_packed_bf16_matches_padded(impl):
    """bf16 packed forward/backward on the varlen kernels vs an fp32 padded reference: the packed
    error must be of the order of the bf16 padded (HF SDPA) error."""
    lens = [37, 64, 5, 90, 17, 128]
    ref32 = tiny_llama("sdpa", device="cuda", hidden_size=256, num_attention_heads=4, num_key_value_heads=2,
                       intermediate_size=512)
    ref16 = twin(ref32, "sdpa").to(torch.bfloat16)
    model = twin(ref32, impl).to(torch.bfloat16)
    ids, mask, labels = var_batch(lens, seed=11, answer_len=3)
    pb = pack_padded(ids, mask, labels)
    m = mask.bool().cuda()
    e32, l32, loss32 = _padded_run(ref32, ids, mask, labels, device="cuda")
    e16, l16, loss16 = _padded_run(ref16, ids, mask, labels, device="cuda")
    ek, lk, lossk = _packed_run(model, pb, device="cuda")
    err_pad = (l16[m].float() - l32[m]).abs().max().item()
    err_pack = (pb.to("cuda").unpack(lk)[m].float() - l32[m]).abs().max().item()
    assert err_pack <= max(2 * err_pad, 2e-2), (err_pack, err_pad)
    assert abs(lossk.item() - loss32.item()) <= max(2 * abs(loss16.item() - loss32.item()), 1e-2)
    loss32.backward()
    lossk.backward()
    g32 = e32.grad[m].flatten()
    gk = pb.to("cuda").unpack(ek.grad)[m].float().flatten()
    assert F.cosine_similarity(g32, gk, dim=0).item() > 0.99
    gp32, gpk = _grads(ref32), _grads(model)
    for n in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight"):
        assert F.cosine_similarity(gp32[n].flatten(), gpk[n].float().flatten(), dim=0).item() > 0.99


@gpu
@pytest.mark.gpu
def test_gpu_select_attention_auto():
    impl = A.select_attention("auto", "cuda")
    if A.flash_attn_available():
        assert impl == A.IMPL_FA
    elif A.torch_varlen_available():
        assert impl == A.IMPL_TORCH
    else:
        assert impl == A.IMPL_SDPA
