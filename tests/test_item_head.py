"""Next-item head (answer_mode=item): losses against references, full-ranking metrics against brute
force, item-mode prompts, sequence windows, and a tiny model that fits a toy pattern."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

import tiny
from speeder_fast.config import StageConfig
from speeder_fast.data.splits import leave_one_out, seq_offsets
from speeder_fast.metrics import full_ranks
from speeder_fast.model.item_head import (ItemHead, chunked_softmax_ce, full_softmax_ce_reference,
                                          sampled_softmax_ce)


# ----------------------------------------------------------------------------------------- losses
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("n_items,chunk", [(1037, 100), (257, 256), (300, 7)])
def test_chunked_softmax_equals_full_softmax_loss_and_grads(n_items, chunk, with_bias):
    g = torch.Generator().manual_seed(n_items + chunk)
    P, D = 37, 19
    q0 = torch.randn(P, D, generator=g) * 2
    k0 = torch.randn(n_items, D, generator=g)
    b0 = torch.randn(n_items, generator=g) if with_bias else None
    t = torch.randint(0, n_items, (P,), generator=g)
    t[:3] = torch.tensor([0, n_items - 1, chunk % n_items])  # chunk edges

    def run(fn):
        q, k = q0.clone().requires_grad_(), k0.clone().requires_grad_()
        b = None if b0 is None else b0.clone().requires_grad_()
        loss = fn(q, k, b, t)
        loss.backward()
        return loss.detach(), q.grad, k.grad, None if b is None else b.grad

    ref = run(full_softmax_ce_reference)
    got = run(lambda q, k, b, t: chunked_softmax_ce(q, k, b, t, chunk=chunk))
    assert n_items > chunk  # the chunked path really ran
    for a, b in zip(got, ref):
        if a is None:
            assert b is None
            continue
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_chunked_softmax_small_catalogue_is_the_reference_path():
    q, k, t = torch.randn(4, 3), torch.randn(5, 3), torch.tensor([0, 1, 4, 2])
    assert torch.equal(chunked_softmax_ce(q, k, None, t, chunk=5), full_softmax_ce_reference(q, k, None, t))
    assert chunked_softmax_ce(q[:0], k, None, t[:0]).item() == 0.0


@pytest.mark.parametrize("proposal", ["uniform", "popularity"])
def test_sampled_softmax_with_logq_approaches_full_softmax(proposal):
    g = torch.Generator().manual_seed(0)
    N, P, D = 50, 64, 8
    q = torch.randn(P, D, generator=g)
    keys = torch.randn(N, D, generator=g)
    bias = torch.randn(N, generator=g) * 0.5
    t = torch.randint(0, N, (P,), generator=g)
    full = float(full_softmax_ce_reference(q, keys, bias, t))
    if proposal == "uniform":
        probs = torch.full((N,), 1.0 / N)
    else:
        probs = torch.rand(N, generator=g) + 0.05
        probs = probs / probs.sum()
    errs = []
    for S in (16, 256, 4096, 65536):
        vals = []
        for rep in range(4):
            neg = torch.multinomial(probs, S, replacement=True, generator=g)
            vals.append(float(sampled_softmax_ce(q, keys[t], bias[t], keys[neg], bias[neg], probs[neg].log(), t, neg)))
        errs.append(abs(np.mean(vals) - full))
    assert errs[-1] < 0.01 * full, (errs, full)
    assert errs[-1] < errs[0] / 5  # converges as the sample grows


def test_sampled_softmax_masks_accidental_hits():
    q = torch.tensor([[1.0, 0.0]])
    keys = torch.tensor([[5.0, 0.0], [0.0, 1.0]])
    t = torch.tensor([0])
    neg = torch.tensor([0, 0, 1])  # two draws of the target itself
    lq = torch.full((3,), math.log(0.5))
    loss = sampled_softmax_ce(q, keys[t], None, keys[neg], None, lq, t, neg)
    # only the draw of item 1 counts: -5 + log(e^5 + e^(0 - log(3 * 0.5)))
    expected = -5.0 + math.log(math.exp(5.0) + math.exp(-math.log(1.5)))
    assert float(loss) == pytest.approx(expected, rel=1e-4)  # fp32


def test_item_head_cosine_scores_and_identity_projection():
    head = ItemHead(4, 3, "cosine", temperature=0.5, projection=True, item_bias=True)
    with torch.no_grad():
        head.bias.copy_(torch.tensor([0.0, 1.0, -1.0]))
    h = torch.tensor([[2.0, 0.0, 0.0, 0.0]])
    tokens = torch.tensor([[[1.0, 0, 0, 0], [3.0, 0, 0, 0]], [[0, 1.0, 0, 0], [0, 1.0, 0, 0]], [[-1.0, 0, 0, 0]] * 2])
    s = head.scores(h, head.keys(tokens))
    torch.testing.assert_close(s, torch.tensor([[2.0, 1.0, -3.0]]))  # cos * 2 + bias
    dot = ItemHead(4, 3, "dot", projection=False, item_bias=False)
    torch.testing.assert_close(dot.scores(h, dot.keys(tokens)), torch.tensor([[4.0, 0.0, -2.0]]))
    with pytest.raises(ValueError, match="cosine or dot"):
        ItemHead(4, 3, "l2")


def test_item_head_collab_dot_block_adds_a_plain_dot_product():
    """``collab_keys`` (model.head_collab_dot): logit += <C h, c_i> with C learned and zero at init,
    on top of the late-fusion blocks; a subset of items gets its own rows of the fixed keys."""
    g = torch.Generator().manual_seed(1)
    c = torch.randn(6, 3, generator=g)
    head = ItemHead(5, 6, "cosine", parts=2, collab_keys=c)
    plain = ItemHead(5, 6, "cosine", parts=2)
    h = torch.randn(4, 5, generator=g)
    e = torch.randn(6, 2, 5, generator=g)
    torch.testing.assert_close(head.scores(h, head.keys(e)), plain.scores(h, plain.keys(e)))  # zero at init
    with torch.no_grad():
        head.collab_proj.weight.copy_(torch.randn(3, 5, generator=g))
    torch.testing.assert_close(head.scores(h, head.keys(e)),
                               plain.scores(h, plain.keys(e)) + (h @ head.collab_proj.weight.t()) @ c.t())
    items = torch.tensor([4, 1])
    torch.testing.assert_close(head.keys(e[items], items), head.keys(e)[items])
    assert "collab_keys" not in head.state_dict() and "collab_proj.weight" in head.state_dict()
    with pytest.raises(ValueError, match="collab_keys"):
        ItemHead(5, 7, collab_keys=c)


def test_item_head_late_fusion_sums_per_modality_cosines():
    """``parts = M`` (model.head_keys=experts): logit = sum_m s_m cos(W_m h, e_m) + b, an absent
    modality (zero vector) adds nothing; W_m starts as the identity."""
    g = torch.Generator().manual_seed(0)
    head = ItemHead(5, 4, "cosine", temperature=0.25, projection=True, item_bias=True, parts=2)
    with torch.no_grad():
        head.bias.copy_(torch.randn(4, generator=g))
        head.log_scale.copy_(torch.tensor([0.3, -0.2]))
        head.proj.weight.add_(torch.randn(10, 5, generator=g) * 0.3)
    assert head.query(torch.zeros(1, 5)).shape == (1, 10)
    h = torch.randn(3, 5, generator=g)
    e = torch.randn(4, 2, 5, generator=g)
    e[2, 1] = 0.0  # item 2 has no second modality
    s = head.scores(h, head.keys(e))
    W = head.proj.weight.view(2, 5, 5)
    hand = torch.zeros(3, 4)
    for m in range(2):
        for i in range(4):
            if m == 1 and i == 2:
                continue
            cos = torch.nn.functional.cosine_similarity(h @ W[m].t(), e[i, m][None], dim=-1)
            hand[:, i] += head.log_scale[m].exp() * cos
    torch.testing.assert_close(s, hand + head.bias, rtol=1e-5, atol=1e-5)
    fresh = ItemHead(5, 4, parts=3)
    torch.testing.assert_close(fresh.proj.weight, torch.eye(5).repeat(3, 1))
    with pytest.raises(ValueError, match="modality blocks"):
        head.keys(torch.randn(4, 3, 5))


def test_late_fusion_head_trains_and_scores_through_the_model(llm_dir):
    """head_keys=experts through SpeederRecModel: the item loss equals a hand computation over the
    MoME's expert vectors, gradients reach every expert, and scores use the cached expert catalogue."""
    from speeder_fast.model.llm import ItemLossSettings, SpeederRecModel

    cfg, prepared, builder, model = tiny.make_rec_model(llm_dir, mode="item", k=2, lora_b_noise=True)
    M = len(model.mome.modalities)
    assert M >= 2
    head = ItemHead(64, prepared.dataset.n_items, parts=M)
    m = SpeederRecModel(model.llm, model.mome, model.positions, item_head=head)
    m.item_loss = ItemLossSettings()
    prepared = prepared.with_sequence_windows(5)
    tr = prepared.train
    batch = builder.build(tr.histories[:5], tr.lengths[:5], None, tr.targets[:5])
    m.eval()
    loss = m(batch)
    h = m.hidden_states(batch).reshape(-1, 64)[batch.item_pos]
    vec = m.mome.expert_vectors(torch.arange(m.mome.n_items))
    assert vec.shape == (m.mome.n_items, M, 64)
    hand = torch.nn.functional.cross_entropy(head.query(h) @ head.keys(vec).t() + head.bias, batch.item_targets)
    torch.testing.assert_close(loss, hand)
    loss.backward()
    for name in m.mome.modalities:
        assert m.mome.experts[name][0].weight.grad.abs().sum() > 0, name
    # train.item_modality_loss: + w * each modality's own softmax loss (its key block + the bias)
    m.item_loss = ItemLossSettings(modality_loss=0.5)
    qf, kf = head.query(h), head.keys(vec)
    extra = sum(torch.nn.functional.cross_entropy(qf[:, j * 64:(j + 1) * 64] @ kf[:, j * 64:(j + 1) * 64].t() + head.bias,
                                                  batch.item_targets) for j in range(M))
    torch.testing.assert_close(m(batch), hand + 0.5 * extra)
    m.mome.set_active([m.mome.modalities[0]])  # an inactive modality adds no term (its block is zero)
    vec1 = m.mome.expert_vectors(torch.arange(m.mome.n_items))
    assert vec1[:, 1:].abs().sum() == 0
    h1 = m.hidden_states(batch).reshape(-1, 64)[batch.item_pos]  # the input tokens changed too
    q1, k1 = head.query(h1), head.keys(vec1)
    main = torch.nn.functional.cross_entropy(q1 @ k1.t() + head.bias, batch.item_targets)
    own = torch.nn.functional.cross_entropy(q1[:, :64] @ k1[:, :64].t() + head.bias, batch.item_targets)
    torch.testing.assert_close(m(batch), main + 0.5 * own)
    m.mome.set_active(m.mome.modalities)
    te = prepared.test
    ev = builder.build(te.histories[:3], te.lengths[:3], None, None, with_answer=False)
    with torch.no_grad():
        s = m.score(ev)
        assert None in m.mome._expert_catalog  # the reference table's cache
        h_last = m.hidden_states(ev).reshape(-1, 64)[torch.arange(3) * ev.input_ids.shape[1] + ev.answer_pos]
        torch.testing.assert_close(s, head.query(h_last) @ head.keys(vec).t() + head.bias, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------- full ranking
def _brute_force_ranks(scores: np.ndarray, targets: np.ndarray, hists: list[list[int]]) -> np.ndarray:
    out = []
    for s, t, h in zip(scores, targets, hists):
        excluded = set(h) - {int(t)}
        out.append(sum(1 for i in range(len(s)) if i != t and i not in excluded and s[i] >= s[t]))
    return np.asarray(out)


def test_full_ranks_equal_brute_force_with_ties_and_repeats():
    rng = np.random.default_rng(0)
    n, N = 40, 23
    scores = rng.integers(0, 5, size=(n, N)).astype(np.float32)  # many ties
    targets = rng.integers(0, N, size=n)
    hists = [list(rng.integers(0, N, size=rng.integers(0, 12))) for _ in range(n)]
    hists[0] = hists[0] + [int(targets[0])] * 2  # the target repeated in the history stays ranked
    rows = np.repeat(np.arange(n), [len(h) for h in hists])
    items = np.concatenate([np.asarray(h, np.int64) for h in hists])
    got = full_ranks(torch.from_numpy(scores), torch.from_numpy(targets), rows, items).numpy()
    np.testing.assert_array_equal(got, _brute_force_ranks(scores, targets, hists))
    flat = torch.zeros(1, 6)
    assert full_ranks(flat, torch.tensor([2]), np.array([0]), np.array([4])).item() == 4  # pessimistic


# ---------------------------------------------------------------------------------- data and prompts
def test_sequence_windows_cover_every_prefix_position_once():
    lengths = np.array([3, 4, 9, 15, 5])
    flat = np.arange(lengths.sum())
    off = seq_offsets(lengths)
    for H in (1, 3, 4):
        train, _, _ = leave_one_out(flat, off, H, train_stride=H)
        sliding, _, _ = leave_one_out(flat, off, H)
        for u, L in enumerate(lengths):
            rows = np.flatnonzero(train.users == u)
            covered = []
            for r in rows:
                h = train.histories[r, : train.lengths[r]]
                assert len(h) <= H
                covered += list(h[1:]) + [train.targets[r]]
            prefix = flat[off[u]: off[u] + L - 2]
            assert covered == list(prefix[1:])  # every prefix position >= 1, once, in order
            assert len(rows) == -(-(L - 3) // H)
        assert np.isin(train.targets, sliding.targets).all()
    capped, _, _ = leave_one_out(flat, off, 3, max_train_examples=4, train_stride=3)
    assert len(capped) == 4 and capped.users.tolist() == [1, 2, 3, 4]  # each user's newest window
    with pytest.raises(ValueError, match="train_stride"):
        leave_one_out(flat, off, 3, train_stride=0)


@pytest.fixture(scope="module")
def llm_dir(tmp_path_factory):
    return tiny.make_llm_dir(tmp_path_factory.mktemp("tiny_llama"))


@pytest.mark.parametrize("paradigm", ["speeder", "titles"])
def test_item_prompts_have_no_candidates_and_predict_every_next_item(tok, prepared, paradigm):
    from speeder_fast.config import PromptConfig
    from speeder_fast.model import PromptBuilder

    cfg = PromptConfig(paradigm=paradigm, answer_mode="item")
    b = PromptBuilder(tok, prepared.dataset, cfg, 8, 5, n_item_tokens=2)
    assert b.item_mode and b.n_candidates == 0 and len(b.label_ids) == 0
    tr = prepared.with_sequence_windows(5).train
    rows = np.arange(6)
    batch = b.build(tr.histories[rows], tr.lengths[rows], None, tr.targets[rows])
    text = b.render(batch, 0)
    assert "Candidates" not in text and "Answer" not in text and cfg.item_instruction in text
    assert torch.equal(batch.attention_mask.sum(1),
                       torch.from_numpy(b.prompt_lengths(tr.histories[rows], tr.lengths[rows], None)))
    L = batch.input_ids.shape[1]
    expect_pos, expect_tg = [], []
    for i in range(len(rows)):
        n = int(tr.lengths[i])
        hist = tr.histories[i, :n]
        expect_tg += list(hist[1:]) + [tr.targets[i]]
        # the answer position is the last prompt token; each history line ends before the next one
        ends = [int(batch.answer_pos[i])]
        assert int(batch.answer_pos[i]) == int(batch.attention_mask[i].sum()) - 1
        expect_pos += [i * L + p for p in ends]
    assert batch.item_targets.tolist() == expect_tg
    assert set(expect_pos) <= set(batch.item_pos.tolist()) and len(batch.item_pos) == len(expect_tg)
    per_row = np.bincount(batch.item_pos.numpy() // L, minlength=len(rows))
    assert per_row.tolist() == tr.lengths[rows].tolist()
    assert torch.equal(batch.target_items, torch.from_numpy(tr.targets[rows]))
    if paradigm == "speeder":  # the line end after history item i is the token right after its k slots
        for i in range(len(rows)):
            pos = batch.item_pos[(batch.item_pos // L) == i] % L
            slots = torch.nonzero(batch.slot_item[i] >= 0).flatten()
            last_slot_of_item = slots.view(-1, 2)[:, -1]
            assert torch.all(pos - last_slot_of_item == 1)  # "{item}\n": the newline reads out
    ev = b.build(tr.histories[rows], tr.lengths[rows], None, tr.targets[rows], with_answer=False)
    assert ev.item_pos.numel() == 0 and torch.equal(ev.input_ids, batch.input_ids)


# ---------------------------------------------------------------------------------- model
def _item_model(llm_dir, **loss_kw):
    from speeder_fast.model.llm import ItemLossSettings, SpeederRecModel

    cfg, prepared, builder, model = tiny.make_rec_model(llm_dir, mode="item", k=2, lora_b_noise=True)
    head = ItemHead(64, prepared.dataset.n_items)
    with torch.no_grad():
        head.bias.copy_(torch.randn(prepared.dataset.n_items, generator=torch.Generator().manual_seed(3)) * 0.1)
    m = SpeederRecModel(model.llm, model.mome, model.positions, item_head=head)
    m.item_loss = ItemLossSettings(**loss_kw)
    return prepared.with_sequence_windows(5), builder, m


def test_item_loss_equals_hand_computation_and_is_the_same_chunked_and_packed(llm_dir):
    prepared, builder, m = _item_model(llm_dir)
    tr = prepared.train
    batch = builder.build(tr.histories[:5], tr.lengths[:5], None, tr.targets[:5])
    m.eval()  # no dropout; grads still flow
    loss = m(batch)
    h = m.hidden_states(batch).reshape(-1, 64)[batch.item_pos]
    keys = m.item_head.keys(m.mome.encode(torch.arange(m.mome.n_items)))
    hand = torch.nn.functional.cross_entropy(m.item_head.query(h) @ keys.t() + m.item_head.bias, batch.item_targets)
    torch.testing.assert_close(loss, hand)
    m.item_loss.chunk = 7  # 60 items in chunks of 7
    torch.testing.assert_close(m(batch), hand, rtol=1e-5, atol=1e-6)
    m.packing = True
    torch.testing.assert_close(m(batch), hand, rtol=1e-4, atol=1e-5)
    m.packing = False
    m.item_loss.all_positions = False  # only the answer position
    last = m.hidden_states(batch).reshape(-1, 64)[torch.arange(5) * batch.input_ids.shape[1] + batch.answer_pos]
    only = torch.nn.functional.cross_entropy(m.item_head.query(last) @ keys.t() + m.item_head.bias,
                                             torch.from_numpy(tr.targets[:5]))
    torch.testing.assert_close(m(batch), only)


def test_item_scores_rank_the_catalogue_and_static_scorer_matches(llm_dir):
    from speeder_fast.model.static import StaticScorer

    prepared, builder, m = _item_model(llm_dir)
    m.eval()
    te = prepared.test
    batch = builder.build(te.histories[:7], te.lengths[:7], None, None, with_answer=False)
    with torch.no_grad():
        s = m.score(batch)
        assert s.shape == (7, prepared.dataset.n_items) and s.dtype == torch.float32
        static = StaticScorer(m, batch_size=4, length_multiple=16, compile="static")(batch)
    torch.testing.assert_close(static, s, rtol=1e-5, atol=1e-5)


def test_sampled_item_loss_runs_and_is_reproducible(llm_dir):
    prepared, builder, m = _item_model(llm_dir, sampled=True, negatives=64,
                                       proposal=torch.arange(1, 61, dtype=torch.float32))
    tr = prepared.train
    batch = builder.build(tr.histories[:4], tr.lengths[:4], None, tr.targets[:4])
    torch.manual_seed(5)
    a = m(batch)
    a.backward()
    assert m.item_head.log_scale.grad is not None and torch.isfinite(a)
    torch.manual_seed(5)
    assert torch.equal(m(batch), a)


# ---------------------------------------------------------------------------------- end to end
@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SPEEDER_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_tiny_model_fits_a_toy_sequence_pattern_to_hr1_of_one(llm_dir, tmp_path, cache, monkeypatch):
    """Next item = previous item + 1 (mod 20); with every transition in training, the item head
    learns it: HR@1 = 1 on the persisted candidates and over the whole catalogue."""
    from speeder_fast.evaluate import evaluate_run, evaluate_split
    from speeder_fast.recommend import recommend
    from speeder_fast.training import train
    from speeder_fast.training.run import load_run

    torch.set_num_threads(1)
    prepared = tiny.make_prepared(n_users=40, n_items=20, n_candidates=8, max_history=5, seed=1)
    cfg = tiny.train_config(llm_dir, tmp_path, "item")
    cfg.prompt.answer_mode = "item"
    cfg.features.modalities = ["text", "collab"]
    cfg.features.sasrec_epochs = 2
    cfg.features.sasrec_dim = 16
    cfg.train.batch_size = 8
    cfg.train.eval_max_examples = 20
    cfg.train.stages = [StageConfig(modalities=["text", "collab"], epochs=1000, max_steps=250, lr=5e-3)]
    res = train(cfg, progress=False, prepared=prepared)
    comp = res.components
    r = evaluate_split(comp.model, comp.builder, comp.prepared, "test", "item", 0, 16, device="cpu", progress=False)
    assert r["HR@1"] == 1.0 and r["full_HR@1"] == 1.0, r
    assert r["n"] == 40 and r["ValidRatio"] == 1.0
    # the saved run gives the same numbers, and recommend ranks the catalogue without the history
    result, sas, md = evaluate_run(res.run_dir, split="test", checkpoint="final", progress=False, prepared=prepared)
    assert result["HR@1"] == 1.0 and result["full_NDCG@10"] == 1.0 and "full_NDCG@10" in md
    assert sas is not None and "full_NDCG@10" in sas
    loaded = load_run(res.run_dir, prepared=prepared)
    users = [(None, loaded.prepared.dataset.user_ids[u], u) for u in range(5)]
    recs = list(recommend(loaded, users, top_k=3, progress=False))
    for rec, (_, _, u) in zip(recs, users):
        seq = loaded.prepared.dataset.sequences[u]
        assert rec["recommendations"][0]["item"] == str((int(seq[-1]) + 1) % 20)  # the pattern continues
        assert not {x["item"] for x in rec["recommendations"]} & {str(i) for i in seq}
        assert [h["item"] for h in rec["history"]] == [str(i) for i in seq[-5:]]
    # the CLI: item-mode runs rank the whole catalogue by default, for every user
    import speeder_fast.training.run as run_mod
    from speeder_fast.recommend import main as recommend_main

    orig = run_mod.load_run
    monkeypatch.setattr(run_mod, "load_run", lambda *a, **k: orig(*a, **{**k, "prepared": prepared}))
    out = tmp_path / "recs.jsonl"
    assert recommend_main(["--run", str(res.run_dir), "--users", "all", "--top-k", "21", "--out", str(out)]) == 2
    assert recommend_main(["--run", str(res.run_dir), "--users", "all", "--top-k", "2", "--out", str(out)]) == 0
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [x["user"] for x in lines] == loaded.prepared.dataset.user_ids
    assert lines[0]["recommendations"] == recs[0]["recommendations"][:2]
    assert recommend_main(["--run", str(res.run_dir), "--users", "all", "--top-k", "2", "--candidates", "persisted",
                           "--out", str(out)]) == 0
    top = [json.loads(x)["recommendations"][0]["item"] for x in out.read_text().splitlines()]
    assert top == [str(i) for i in prepared.test.targets]  # HR@1 = 1 on the persisted candidates too
    # served at bf16 (base loaded in bf16, trained weights cast): the pattern still ranks first; the
    # report gets its own file and the fp32 one is untouched (load_run is patched to the in-memory data)
    own = (res.run_dir / f"{result['report']}.json").read_bytes()
    half, _, md16 = evaluate_run(res.run_dir, split="test", checkpoint="final", progress=False, precision="bf16")
    assert half["HR@1"] == 1.0 and half["report"] == f"{result['report']}_bf16"
    assert (res.run_dir / f"{half['report']}.json").is_file() and "bf16" in md16
    assert (res.run_dir / f"{result['report']}.json").read_bytes() == own
    same, _, _ = evaluate_run(res.run_dir, split="test", checkpoint="final", progress=False,
                              precision="fp32")  # the run's own precision: no suffix
    assert same["report"] == result["report"] == "eval_test_item_final_nall"
    assert next(run_mod.load_run(res.run_dir, precision="bf16").model.parameters()).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="precision"):
        run_mod.load_run(res.run_dir, precision="fp16")
    assert recommend_main(["--run", str(res.run_dir), "--users", "all", "--top-k", "2", "--precision", "bf16",
                           "--out", str(out)]) == 0
    top16 = [json.loads(x)["recommendations"][0]["item"] for x in out.read_text().splitlines()]
    assert top16 == [x["recommendations"][0]["item"] for x in lines]


@pytest.mark.parametrize("paradigm", ["speeder", "titles"])
def test_build_components_item_mode(llm_dir, cache, paradigm):
    """Item mode: sequence windows, a head tied to a MoME (text-only for titles, no SPAE there), the
    popularity bias init, and the head trained in the stage (``set_trainable``)."""
    from speeder_fast.evaluate import item_popularity
    from speeder_fast.training.loop import resolve_stages
    from speeder_fast.training.step import set_trainable
    from speeder_fast.training.run import build_components

    prepared = tiny.make_prepared(n_candidates=8, max_history=5)
    cfg = tiny.train_config(llm_dir, "unused")
    cfg.prompt.paradigm, cfg.prompt.answer_mode = paradigm, "item"
    cfg.features.sasrec_epochs, cfg.features.sasrec_dim = 1, 16
    cfg.model.head_bias_init = "popularity"
    comp = build_components(cfg, progress=False, prepared=prepared)
    m = comp.model
    assert len(comp.prepared.train) == len(prepared.with_sequence_windows(5).train) < len(prepared.train)
    assert m.item_head is not None and m.mome is not None
    assert (m.positions is None) == (paradigm == "titles")
    assert list(m.mome.modalities) == (["text", "collab"] if paradigm == "speeder" else ["text"])
    logc = np.log1p(item_popularity(prepared))
    np.testing.assert_allclose(m.item_head.bias.detach().numpy(), logc - logc.mean(), rtol=1e-5, atol=1e-6)
    stage = resolve_stages(cfg, comp.modalities)[-1]
    params = {id(p) for p in set_trainable(comp, stage, set())}
    assert all(id(p) in params for p in m.item_head.parameters())
    assert all(id(p) in params for p in m.mome.parameters_of(["text"]))


def test_train_cli_item_mode_evaluates_the_best_checkpoint_and_prints_full_ranking(tmp_path):
    """``python -m speeder_fast.train`` in item mode on atomic files: the test evaluation scores the
    checkpoint with the best validation full NDCG@10 (eval.checkpoint=best) and the table carries the
    full-ranking columns for the LLM, SASRec and popularity rows."""
    from test_resume import cli_env, run_cli, tiny_config, write_atomic_dataset

    from speeder_fast.config import to_toml

    llm = tiny.make_llm_dir(tmp_path / "llm")
    data = write_atomic_dataset(tmp_path / "data")
    cfg = tiny_config(llm, data, tmp_path / "out", "item", eval_every=2, checkpoint_every=0)
    cfg.prompt.answer_mode = "item"
    cfg.train.stages = [StageConfig(modalities=["text", "collab"], max_steps=6, lr=3e-3)]
    (tmp_path / "c.toml").write_text(to_toml(cfg))
    r = run_cli(["--config", str(tmp_path / "c.toml"), "--no-progress"], cli_env(tmp_path))
    assert r.returncode == 0, r.stderr[-3000:]
    run = tmp_path / "out" / "item"
    evals = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"eval"' in x]
    best = max(evals, key=lambda e: e["full_NDCG@10"])  # first maximum: the manager keeps the first best
    best_step = min(e["global_step"] for e in evals if e["full_NDCG@10"] == best["full_NDCG@10"])
    assert f"test evaluation of checkpoint best (step {best_step})" in r.stdout
    header = next(x for x in r.stdout.splitlines() if x.startswith("| model |"))
    assert "full_NDCG@10" in header and "full_HR@20" in header
    rows = [x for x in r.stdout.splitlines() if x.startswith(("| speeder", "| SASRec", "| Popularity"))]
    assert len(rows) == 3 and all("n/a" not in x.split("|")[-6] for x in rows)  # full NDCG@10 filled in
    result = json.loads((run / "eval_test_item.json").read_text())["result"]
    assert result["checkpoint"] == f"best (step {best_step})"
