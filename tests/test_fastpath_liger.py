"""apply_liger decision logic (CPU, with a fake liger table) and the real kernels (GPU only)."""

from __future__ import annotations

import logging

import pytest
import torch

from speeder_fast.model import liger as L
from test_fastpath_helpers import decoder_of, tiny_llama, var_batch

CUDA = torch.cuda.is_available()


class _Lines(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


@pytest.fixture
def lg():
    logger = logging.getLogger("test_fastpath_liger")
    logger.handlers[:] = []
    h = _Lines()
    logger.addHandler(h)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    logger.h = h
    return logger


def test_off_and_cpu(lg):
    model = tiny_llama("sdpa")
    assert L.apply_liger(model, "off", logger=lg) is False
    assert L.apply_liger(model, "auto", logger=lg) is False
    assert len(lg.h.lines) == 2 and "off (requested)" in lg.h.lines[0] and "on cpu" in lg.h.lines[1]
    with pytest.raises(RuntimeError, match="liger=on but the model is on cpu"):
        L.apply_liger(model, "on", logger=lg)
    with pytest.raises(ValueError, match="not one of"):
        L.apply_liger(model, "maybe", logger=lg)


def test_missing_liger(monkeypatch, lg):
    monkeypatch.setattr(L, "liger_available", lambda: False)
    model = tiny_llama("sdpa")
    assert L.apply_liger(model, "auto", device="cuda", logger=lg) is False
    assert "not installed" in lg.h.lines[-1]
    with pytest.raises(RuntimeError, match="pip install liger-kernel"):
        L.apply_liger(model, "on", device="cuda", logger=lg)


def _fake_table(calls: list):
    from transformers.models.llama import modeling_llama

    def apply_liger_kernel_to_llama(rope=True, cross_entropy=False, fused_linear_cross_entropy=True, rms_norm=True,
                                    swiglu=True, model=None):
        calls.append(dict(rope=rope, cross_entropy=cross_entropy, fused_linear_cross_entropy=fused_linear_cross_entropy,
                          rms_norm=rms_norm, swiglu=swiglu, model=model))
        # what liger does to the modeling module
        modeling_llama.apply_rotary_pos_emb = "liger-rope"
        modeling_llama.LlamaRMSNorm = "LigerRMSNorm"
        modeling_llama.LlamaMLP = "LigerSwiGLUMLP"

    def apply_liger_kernel_to_qwen2(rope=True, model=None):  # fewer parameters: only these are passed
        calls.append(dict(rope=rope, model=model))

    return {"llama": apply_liger_kernel_to_llama, "qwen2": apply_liger_kernel_to_qwen2}


def test_applies_on_instance_with_peft(monkeypatch, lg):
    peft = pytest.importorskip("peft")
    from transformers.models.llama import modeling_llama

    calls: list = []
    monkeypatch.setattr(L, "liger_available", lambda: True)
    monkeypatch.setattr(L, "_liger_table", lambda: _fake_table(calls))
    orig_rope, orig_norm, orig_mlp = (modeling_llama.apply_rotary_pos_emb, modeling_llama.LlamaRMSNorm,
                                      modeling_llama.LlamaMLP)
    base = tiny_llama("sdpa")
    wrapped = peft.get_peft_model(base, peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    try:
        assert L.apply_liger(wrapped, "on", device="cuda", logger=lg) is True
        (call,) = calls
        assert call["model"] is base  # unwrapped from PeftModel -> LoraModel
        assert call["rope"] and call["rms_norm"] and call["swiglu"]
        assert not call["cross_entropy"] and not call["fused_linear_cross_entropy"]
        # class globals restored at once (instance-only), RoPE kept until restore_liger_globals
        assert modeling_llama.LlamaRMSNorm is orig_norm and modeling_llama.LlamaMLP is orig_mlp
        assert modeling_llama.apply_rotary_pos_emb == "liger-rope"
        assert "applied rms_norm, rope, swiglu" in lg.h.lines[-1]
    finally:
        L.restore_liger_globals()
    assert modeling_llama.apply_rotary_pos_emb is orig_rope


def test_unsupported_arch_and_signature_filter(monkeypatch, lg):
    calls: list = []
    monkeypatch.setattr(L, "liger_available", lambda: True)
    monkeypatch.setattr(L, "_liger_table", lambda: _fake_table(calls))
    model = tiny_llama("sdpa")
    monkeypatch.setattr(model.config, "model_type", "gpt2")
    assert L.apply_liger(model, "auto", device="cuda", logger=lg) is False
    assert "model_type='gpt2'" in lg.h.lines[-1]
    with pytest.raises(RuntimeError, match="no kernels for model_type='gpt2'"):
        L.apply_liger(model, "on", device="cuda", logger=lg)
    monkeypatch.setattr(model.config, "model_type", "qwen2")
    assert L.apply_liger(model, "auto", device="cuda", logger=lg) is True
    assert set(calls[-1]) == {"rope", "model"}
    L.restore_liger_globals()


def test_unwrap_model_plain():
    m = torch.nn.Linear(2, 2)
    assert L.unwrap_model(m) is m


# ----------------------------------------------------------------------------------------- GPU only


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA (liger Triton kernels)")
@pytest.mark.parametrize("use_peft", [False, True])
def test_gpu_liger_same_loss(use_peft):
    if not L.liger_available():
        pytest.skip("liger-kernel not installed")
    from speeder_fast.model.loss import answer_indices, answer_token_loss, gather_answer_hidden
    from speeder_fast.model.packing import pack_padded

    model = tiny_llama("speeder_varlen", device="cuda", dtype=torch.bfloat16, hidden_size=256,
                       intermediate_size=512)
    if use_peft:
        peft = pytest.importorskip("peft")
        model = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "gate_proj", "down_proj"],
                                                           init_lora_weights=False))
    ids, mask, labels = var_batch([40, 70, 12, 33], seed=9, answer_len=3)
    pb = pack_padded(ids, mask, labels)
    pbd = pb.to("cuda")
    idx, tgt = answer_indices(pb.extras[0], cu_seqlens=pb.cu_seqlens)
    base = L.unwrap_model(model)

    def loss_and_grad():
        model.zero_grad(set_to_none=True)
        emb = base.get_input_embeddings()(pbd.input_ids)
        hid = decoder_of(model)(inputs_embeds=emb, use_cache=False, **pbd.model_kwargs()).last_hidden_state
        rows, t = gather_answer_hidden(hid, index=idx, targets=tgt)
        loss = answer_token_loss(rows, base.lm_head.weight, t)
        loss.backward()
        g = {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}
        return loss.item(), g

    before, g0 = loss_and_grad()
    try:
        assert L.apply_liger(model, "on") is True
        mlp = decoder_of(model).layers[0].mlp
        assert type(mlp).__name__ == "LlamaMLP" and mlp._get_name() == "LigerSwiGLUMLP"
        after, g1 = loss_and_grad()
    finally:
        L.restore_liger_globals()
    assert abs(after - before) <= 2e-2 * max(1.0, abs(before)), (before, after)
    for n in g0:
        cos = torch.nn.functional.cosine_similarity(g0[n].flatten(), g1[n].flatten(), dim=0).item()
        assert cos > 0.98, (n, cos)
