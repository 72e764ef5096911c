"""Constrained generation (eval.constrained): never a non-candidate, stops at the first unique prefix,
the same answer as a brute-force decoder (full-prompt forwards, no KV cache, argmax over the allowed
tokens of the full-vocabulary logits); plain greedy decoding == HF generate; evaluate_split metrics."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import tiny
from speeder_fast.evaluate import evaluate_split
from speeder_fast.model.decoding import greedy_decode


@pytest.fixture(scope="module")
def llm_dir(tmp_path_factory):
    return tiny.make_llm_dir(tmp_path_factory.mktemp("tiny_llama_constrained"))


def _model(llm_dir, paradigm="titles", **kw):
    _, prepared, builder, model = tiny.make_rec_model(llm_dir, paradigm, "generate", 2, lora_b_noise=True, **kw)
    model.eval()
    return prepared, builder, model


def _batch(prepared, builder, rows=slice(0, 8), side="left", split="valid"):
    s = prepared.split(split)
    return builder.build(s.histories[rows], s.lengths[rows], prepared.candidates(split)[rows], s.targets[rows],
                         with_answer=False, padding_side=side)


def _constrained(model, builder, batch):
    seqs = torch.from_numpy(builder.answer_sequences(batch.candidates))
    return seqs, greedy_decode(model, batch, 0, builder.eos_id, builder.pad_id, seqs)


def _first_unique_prefix(seqs: torch.Tensor, b: int, j: int) -> int:
    """Smallest s such that no other candidate of row b starts with candidate j's first s tokens."""
    mine = [t for t in seqs[b, j].tolist() if t >= 0]
    for s in range(0, len(mine) + 1):
        others = [k for k in range(seqs.shape[1]) if k != j and seqs[b, k, :s].tolist() == mine[:s]]
        if not others:
            return s
    return len(mine)


def brute_force(model, builder, prepared, row: int, split="valid"):
    """Reference constrained decoder for one example: at every step a full forward of prompt +
    decoded tokens (no cache, no padding), full-vocabulary logits at the last position, argmax over
    the tokens that continue a still-possible candidate; stop when one candidate remains."""
    b1 = _batch(prepared, builder, slice(row, row + 1), side="right", split=split)
    seqs = [list(builder.answer_ids(int(c))) + [builder.eos_id] for c in b1.candidates[0].tolist()]
    alive = list(range(len(seqs)))
    decoded: list[int] = []
    with torch.no_grad():
        prompt = model.input_embeds(b1)
        while len(alive) > 1:
            s = len(decoded)
            x = prompt if not decoded else torch.cat([prompt, model.embed(torch.tensor([decoded]))], 1)
            h = model.decoder(inputs_embeds=x, use_cache=False).last_hidden_state[0, -1]
            logits = model.lm_head(h).float()
            allowed = sorted({seqs[j][s] for j in alive if s < len(seqs[j])})
            masked = torch.full_like(logits, float("-inf"))
            masked[allowed] = logits[allowed]
            tok = int(masked.argmax())
            decoded.append(tok)
            alive = [j for j in alive if s < len(seqs[j]) and seqs[j][s] == tok]
            if tok == builder.eos_id:
                break
    return alive[0], decoded


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("paradigm", ["titles", "speeder", "verbose"])
def test_never_emits_a_non_candidate_and_stops_at_the_first_unique_prefix(llm_dir, paradigm, side):
    prepared, builder, model = _model(llm_dir, paradigm)
    batch = _batch(prepared, builder, slice(0, 12), side=side)
    seqs, res = _constrained(model, builder, batch)
    B, N, _ = seqs.shape
    assert res.choice.shape == (B,) and ((res.choice >= 0) & (res.choice < N)).all()
    assert not res.ties.any()
    assert res.tokens.shape[1] == int(res.n_decoded.max())
    for b in range(B):
        n, j = int(res.n_decoded[b]), int(res.choice[b])
        # the emitted tokens are the chosen candidate's first n tokens, then padding
        assert res.tokens[b, :n].tolist() == seqs[b, j, :n].tolist()
        assert (res.tokens[b, n:] == builder.pad_id).all()
        # ... and n is the first prefix length that names exactly one candidate
        assert n == _first_unique_prefix(seqs, b, j), (b, n)
    assert float(res.n_decoded.float().mean()) < seqs.shape[2] - 1  # far fewer than full titles


def test_a_model_that_wants_another_token_still_emits_candidates(llm_dir):
    """Even when the LM strongly prefers a non-candidate token (eos, a label), only candidate tokens come out."""
    prepared, builder, model = _model(llm_dir)
    batch = _batch(prepared, builder)
    bad = [builder.eos_id, int(builder.label_ids[0])]

    def push(module, inputs, out):
        out = out.clone()
        out[..., bad] += 1e4
        return out

    h = model.lm_head.register_forward_hook(push)
    seqs, res = _constrained(model, builder, batch)
    with torch.no_grad():
        plain = greedy_decode(model, batch, 4, builder.eos_id, builder.pad_id)
    h.remove()
    assert torch.isin(plain.tokens[:, 0], torch.tensor(bad)).all()  # unconstrained: eos or the label at once
    for b in range(batch.input_ids.shape[0]):
        n, j = int(res.n_decoded[b]), int(res.choice[b])
        assert n >= 1 and res.tokens[b, :n].tolist() == seqs[b, j, :n].tolist()


@pytest.mark.parametrize("paradigm", ["titles", "speeder"])
def test_same_answer_as_brute_force_decoding(llm_dir, paradigm):
    prepared, builder, model = _model(llm_dir, paradigm)
    rows = slice(0, 10)
    for side in ("left", "right"):
        batch = _batch(prepared, builder, rows, side=side)
        seqs, res = _constrained(model, builder, batch)
        for b in range(10):
            want_choice, want_tokens = brute_force(model, builder, prepared, b)
            assert int(res.choice[b]) == want_choice, (side, b)
            n = int(res.n_decoded[b])
            assert res.tokens[b, :n].tolist() == want_tokens, (side, b)
    assert len({int(c) for c in res.choice}) > 2  # a random model still spreads its answers


def test_forced_model_answers_the_forced_candidate(llm_dir):
    """lm_head hook forcing each row's title tokens: the constrained answer is that candidate."""
    from test_model_llm import _Force

    prepared, builder, model = _model(llm_dir)
    batch = _batch(prepared, builder)
    forced = np.random.default_rng(0).integers(0, 8, size=8)
    titles = [builder.answer_ids(int(batch.candidates[b, j])).tolist() for b, j in enumerate(forced)]
    h = model.lm_head.register_forward_hook(_Force(titles, builder.eos_id))
    _, res = _constrained(model, builder, batch)
    h.remove()
    assert res.choice.tolist() == forced.tolist()


@pytest.mark.parametrize("paradigm", ["titles", "speeder"])
def test_plain_greedy_equals_hf_generate(llm_dir, paradigm):
    prepared, builder, model = _model(llm_dir, paradigm)
    batch = _batch(prepared, builder)
    with torch.no_grad():
        want = model.llm.generate(inputs_embeds=model.input_embeds(batch), attention_mask=batch.attention_mask,
                                  max_new_tokens=7, do_sample=False, num_beams=1, eos_token_id=builder.eos_id,
                                  pad_token_id=builder.pad_id)
        for model.prefix_cache in (False, True):
            got = model.generate(batch, 7, builder.eos_id, builder.pad_id)
            assert torch.equal(got, want)


def test_colliding_titles_use_full_titles_and_identical_ones_are_ties(llm_dir):
    from speeder_fast.config import Config
    from speeder_fast.model import PromptBuilder, load_tokenizer

    prepared = tiny.make_prepared(n_candidates=8, max_history=5)
    titles = prepared.dataset.item_text["title"]
    titles[1] = titles[0]  # identical full titles: never separable
    cfg = Config()
    cfg.prompt.paradigm, cfg.prompt.answer_mode, cfg.prompt.title_tokens = "titles", "generate", 1
    builder = PromptBuilder(load_tokenizer(str(llm_dir)), prepared.dataset, cfg.prompt, 8, 5)
    assert builder.full_title_ids  # 1-token titles collide (" red" ...)
    for i in (0, 8, 16):  # all red
        assert len(builder.title_ids[i]) == 1 and len(builder.answer_ids(i)) > 1 and builder.answer_ids(i).tolist() == builder.full_title_ids[i].tolist()
    seqs = torch.from_numpy(builder.answer_sequences(np.array([[0, 1, 8, 16]])))
    assert seqs.shape[:2] == (1, 4) and (seqs[0, :, -1] == -1).sum() < 4
    assert torch.equal(seqs[0, 0], seqs[0, 1])
    # a decoder that ends on the identical pair reports a tie and takes the first
    _, _, _, model = tiny.make_rec_model(llm_dir, "titles", "generate")
    model.eval()
    v = prepared.valid
    batch = builder.build(v.histories[:1], v.lengths[:1], np.array([[0, 1, 8, 16, 24, 32, 40, 48]]), None,
                          with_answer=False)
    sq = torch.from_numpy(builder.answer_sequences(batch.candidates))
    from test_model_llm import _Force

    h = model.lm_head.register_forward_hook(_Force([builder.answer_ids(0).tolist()], builder.eos_id))
    res = greedy_decode(model, batch, 0, builder.eos_id, builder.pad_id, sq)
    h.remove()
    assert int(res.choice[0]) == 0 and bool(res.ties[0])
    assert int(res.n_decoded[0]) == len(builder.answer_ids(0)) + 1  # through eos: still two alive


def test_evaluate_split_constrained_and_plain(llm_dir):
    prepared, builder, model = _model(llm_dir)
    kw = dict(max_examples=0, batch_size=8, generate_max_tokens=12, progress=False)
    con = evaluate_split(model, builder, prepared, "valid", "generate", constrained=True, **kw)
    plain = evaluate_split(model, builder, prepared, "valid", "generate", constrained=False, **kw)
    assert con["constrained"] is True and plain["constrained"] is False
    assert con["ValidRatio"] == 1.0 and con["VHR@1"] == con["HR@1"]
    assert 1.0 <= con["decoded_tokens_mean"] < plain["decoded_tokens_mean"] <= 12
    assert con["constrained_ties"] == 0
    # brute force on a few examples: the evaluation's answers are the reference's
    idx = np.arange(len(prepared.valid))
    correct = []
    for i in idx:
        c, _ = brute_force(model, builder, prepared, int(i))
        correct.append(prepared.valid_candidates[i, c] == prepared.valid.targets[i])
    assert con["VHR@1"] == pytest.approx(float(np.mean(correct)))
    # the plain protocol string-matches free text: a random model rarely names a candidate
    assert plain["ValidRatio"] < 1.0
