"""SpeederRecModel on a tiny random Llama: gradients, QLoRA step, score/generate agreement, checkpoints."""

import numpy as np
import pytest
import torch

import tiny
from speeder_fast.model.llm import match_generated


@pytest.fixture(scope="module")
def llm_dir(tmp_path_factory):
    return tiny.make_llm_dir(tmp_path_factory.mktemp("tiny_llama"))


def _setup(llm_dir, paradigm="speeder", precision="fp32", mode="score", k=2, lora_dropout=0.0):
    return tiny.make_rec_model(llm_dir, paradigm, mode, k, precision=precision, lora_dropout=lora_dropout)


def _batch(prepared, builder, n=6, **kw):
    v = prepared.valid
    return builder.build(v.histories[:n], v.lengths[:n], prepared.valid_candidates[:n], v.targets[:n], **kw)


def test_gradients_reach_only_mome_positions_lora(llm_dir):
    _, prepared, builder, model = _setup(llm_dir)
    model.train()
    model(_batch(prepared, builder)).backward()
    got = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert any("lora_B" in n for n in got)
    assert any(n.startswith("mome.experts.text") for n in got) and any(n.startswith("mome.experts.collab") for n in got)
    assert {"positions.abs_table", "positions.rel_table", "mome.ln_weight"} <= got
    base = [n for n, p in model.named_parameters() if "lora_" not in n and not n.startswith(("mome.", "positions."))]
    assert base, "expected frozen base parameters"
    for n, p in model.named_parameters():
        if n in base:
            assert not p.requires_grad and p.grad is None, n
    assert not model.embed.weight.requires_grad and model.embed.weight.grad is None


def test_lm_head_only_at_answer_positions(llm_dir):
    _, prepared, builder, model = _setup(llm_dir, mode="generate")
    seen = []
    h = model.lm_head.register_forward_hook(lambda m, i, o: seen.append(tuple(i[0].shape)))
    batch = _batch(prepared, builder, n=4)
    loss = model(batch)
    h.remove()
    n_answer = int((batch.labels != -100).sum())
    assert seen == [(n_answer, 64)]  # never [B, L, H]
    assert n_answer == len(batch.loss_pos) and n_answer > 4  # title tokens + eos per example
    # the loss equals a full-logit reference restricted to the answer tokens
    with torch.no_grad():
        hs = model.hidden_states(batch)
        logits = model.lm_head(hs)[:, :-1]
        ref = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch.labels[:, 1:].reshape(-1))
    torch.testing.assert_close(loss.detach(), ref, atol=1e-5, rtol=1e-5)


def test_label_loss_is_cross_entropy_of_scores(llm_dir):
    _, prepared, builder, model = _setup(llm_dir)
    model.eval()
    batch = _batch(prepared, builder)
    with torch.no_grad():
        want = torch.nn.functional.cross_entropy(model.score(batch), batch.target_idx)
        got = model(batch, label_loss=True)
        vocab = model(batch)
    torch.testing.assert_close(got, want)
    assert float(vocab) > float(got)  # the full-vocabulary loss also pays for non-label tokens


def test_qlora_nf4_step_decreases_loss(llm_dir):
    pytest.importorskip("bitsandbytes")
    _, prepared, builder, model = _setup(llm_dir, precision="nf4", k=1)
    import bitsandbytes as bnb

    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.llm.modules()), "base should be 4-bit"
    batch = _batch(prepared, builder, n=6)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=5e-3)
    model.train()
    losses = []
    for _ in range(6):
        loss = model(batch)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0] - 0.1, losses


class _Force:
    """lm_head hook forcing, per row, a token sequence: call i adds +1e4 to seq[b][i] (then eos)."""

    def __init__(self, seqs, eos):
        self.seqs, self.eos, self.calls = seqs, eos, 0

    def __call__(self, module, inputs, out):
        bias = torch.zeros_like(out)
        for b, s in enumerate(self.seqs):
            tok = s[self.calls] if self.calls < len(s) else self.eos
            bias[b, ..., tok] = 1e4
        self.calls += 1
        return out + bias


@pytest.mark.parametrize("paradigm", ["speeder", "titles"])
def test_score_and_generate_agree_on_forced_model(llm_dir, paradigm):
    _, prepared, builder, model = _setup(llm_dir, paradigm=paradigm)
    model.eval()
    n = 6
    batch = _batch(prepared, builder, n=n, with_answer=False)
    rng = np.random.default_rng(0)
    forced = batch.target_idx.numpy().copy()
    forced[::2] = rng.integers(0, 8, size=len(forced[::2]))  # some rows forced to a wrong candidate
    # score mode: force each row's label token
    hook = _Force([[int(builder.label_ids[j])] for j in forced], builder.eos_id)
    h = model.lm_head.register_forward_hook(hook)
    with torch.no_grad():
        scores = model.score(batch)
    h.remove()
    assert scores.argmax(1).tolist() == forced.tolist()
    # generate mode: force each row's candidate title, then eos
    gbatch = _batch(prepared, builder, n=n, with_answer=False, padding_side="left")
    titles = [builder.title_ids[int(gbatch.candidates[b, j])].tolist() for b, j in enumerate(forced)]
    hook = _Force(titles, builder.eos_id)
    h = model.lm_head.register_forward_hook(hook)
    gen = model.generate(gbatch, 40, builder.eos_id, builder.pad_id)
    h.remove()
    texts, pred = match_generated(builder, gen, gbatch.candidates)
    assert pred.tolist() == forced.tolist(), texts
    assert ((pred == gbatch.target_idx) == torch.from_numpy(forced == batch.target_idx.numpy())).all()


def test_unforced_generation_is_invalid_when_it_matches_no_title(llm_dir):
    _, prepared, builder, model = _setup(llm_dir, paradigm="titles")
    gbatch = _batch(prepared, builder, n=3, with_answer=False, padding_side="left")
    hook = _Force([[int(builder.label_ids[0])]] * 3, builder.eos_id)  # answers " A" + eos: not a title
    h = model.lm_head.register_forward_hook(hook)
    gen = model.generate(gbatch, 10, builder.eos_id, builder.pad_id)
    h.remove()
    _, pred = match_generated(builder, gen, gbatch.candidates)
    assert pred.tolist() == [-1, -1, -1]


def test_batching_and_padding_side_do_not_change_scores(llm_dir):
    _, prepared, builder, model = _setup(llm_dir)
    model.eval()
    with torch.no_grad():
        right = model.score(_batch(prepared, builder, with_answer=False))
        single = torch.cat([model.score(builder.build(prepared.valid.histories[i:i + 1], prepared.valid.lengths[i:i + 1],
                                                       prepared.valid_candidates[i:i + 1], prepared.valid.targets[i:i + 1],
                                                       with_answer=False)) for i in range(6)])
    torch.testing.assert_close(right, single, atol=1e-4, rtol=1e-4)
    with torch.no_grad():
        left = model.score(_batch(prepared, builder, with_answer=False, padding_side="left"))
    torch.testing.assert_close(left, right, atol=1e-3, rtol=1e-3)  # RoPE is relative: same up to rounding


def test_trainable_state_roundtrip(llm_dir):
    _, prepared, builder, model = _setup(llm_dir)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    sd = {k: v.clone() for k, v in model.trainable_state_dict().items()}
    assert any(k.startswith("mome.") for k in sd) and any("lora_" in k for k in sd) and "positions.abs_table" in sd
    _, _, _, fresh = _setup(llm_dir)
    batch = _batch(prepared, builder, with_answer=False)
    model.eval()
    fresh.eval()
    with torch.no_grad():
        a = model.score(batch)
        assert not torch.allclose(a, fresh.score(batch))
        fresh.load_trainable_state_dict(sd)
        torch.testing.assert_close(fresh.score(batch), a)
    with pytest.raises(KeyError):
        fresh.load_trainable_state_dict({k: v for k, v in sd.items() if not k.startswith("positions.")})


def test_bf16_forward_backward(llm_dir):
    _, prepared, builder, model = _setup(llm_dir, precision="bf16")
    assert model.embed.weight.dtype == torch.bfloat16
    loss = model(_batch(prepared, builder, n=3), label_loss=True)
    assert torch.isfinite(loss)
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)
    assert model.mome.experts["text"][0].weight.grad is not None
