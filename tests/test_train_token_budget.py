"""Token-budget micro-batches (``train.max_tokens_per_batch``): exact prompt lengths, the epoch plan,
DDP dealing, resume, the stage step count and a short training run (tiny fixtures, CPU)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest

import tiny
from speeder_fast.config import Config, ConfigError, PromptConfig, StageConfig, validate
from speeder_fast.data import sample_train_candidates
from speeder_fast.distributed import ShardedSampler
from speeder_fast.model.prompts import PromptBuilder
from speeder_fast.training.batches import MicroBatches, plan_token_batches


def _comp(tok, prepared, paradigm="speeder", mode="score", packing=False, k=2):
    """The parts of ``Components`` that :class:`MicroBatches` reads (no LLM needed for the stream)."""
    cfg = Config()
    cfg.prompt.paradigm, cfg.prompt.answer_mode = paradigm, mode
    cfg.data.n_candidates = 8
    builder = PromptBuilder(tok, prepared.dataset, PromptConfig(paradigm=paradigm, answer_mode=mode), 8, 5, k, False)
    return SimpleNamespace(cfg=cfg, prepared=prepared, builder=builder, model=SimpleNamespace(packing=packing))


def _lengths(comp, epoch, text_only=None):
    tr = comp.prepared.train
    cands = sample_train_candidates(comp.prepared, epoch, 8, comp.cfg.data.seed)
    return comp.builder.prompt_lengths(tr.histories, tr.lengths, cands, targets=tr.targets, text_only=text_only)


@pytest.mark.parametrize("paradigm", ["verbose", "titles", "speeder"])
@pytest.mark.parametrize("mode", ["score", "generate"])
def test_prompt_lengths_equal_built_lengths(tok, prepared, paradigm, mode):
    tr = prepared.train
    cands = sample_train_candidates(prepared, 0, 8, 0)
    text_only = np.random.default_rng(3).random(len(tr)) < 0.5
    for k, max_hist in ((1, 5), (3, 3)):  # max_history below the stored window truncates histories
        b = PromptBuilder(tok, prepared.dataset, PromptConfig(paradigm=paradigm, answer_mode=mode, description_tokens=6),
                          8, max_hist, k, paradigm == "speeder")
        for with_answer in (True, False):
            for to in (None, text_only):
                got = b.prompt_lengths(tr.histories, tr.lengths, cands, with_answer, to, tr.targets)
                want = b.build(tr.histories, tr.lengths, cands, tr.targets, with_answer, to).attention_mask.sum(1)
                np.testing.assert_array_equal(got, want.numpy())
    if mode == "generate":
        with pytest.raises(ValueError, match="needs targets"):
            b.prompt_lengths(tr.histories, tr.lengths, cands, True)


def test_config_rejects_negative_budget():
    cfg = Config()
    cfg.train.max_tokens_per_batch = -1
    with pytest.raises(ConfigError, match="train.max_tokens_per_batch"):
        validate(cfg)


def _greedy_reference(order, lengths, budget, padded):
    """One process: close the batch before an example that would push its cost over the budget; an
    example over the budget alone (the plain greedy rule, written out)."""
    out, cur = [], []
    for i in order:
        n = int(lengths[i])
        if n > budget:
            out += [cur, [i]] if cur else [[i]]
            cur = []
            continue
        cand = cur + [i]
        cost = len(cand) * max(lengths[cand]) if padded else sum(lengths[cand])
        if cur and cost > budget:
            out.append(cur)
            cand = [i]
        cur = cand
    return out + ([cur] if cur else [])


def test_plan_world1_is_the_greedy_rule_and_ranks_respect_budget():
    rng = np.random.default_rng(0)
    lengths = rng.integers(20, 120, 300)
    lengths[[7, 150]] = 500  # longer than the budget: a batch of their own
    order = rng.permutation(300)
    for padded in (False, True):
        plan, n_over = plan_token_batches(order, lengths, 400, 1, padded)
        ref = _greedy_reference(order.tolist(), lengths, 400, padded)
        assert [b.tolist() for b in plan] == ref and n_over == 2
        for world in (1, 2, 3):
            plan, _ = plan_token_batches(order, lengths, 400, world, padded)
            np.testing.assert_array_equal(np.concatenate(plan), order)  # consecutive, each example once
            for glob in plan:
                g = lengths[glob]
                if g.max() > 400:
                    assert len(glob) == 1
                    continue
                assert (len(g) * g.max() if padded else g.sum()) <= world * 400
                for r in range(world):
                    mine = lengths[glob[r::world]]
                    if len(mine):
                        assert (len(mine) * mine.max() if padded else mine.sum()) <= 400
            # greedy: the next example would not have fitted (some constraint binds at every cut)
            assert len(plan) < 300
    with pytest.raises(ValueError, match="max_tokens_per_batch"):
        plan_token_batches(order, lengths, 0)


@pytest.mark.parametrize("paradigm,packing,curriculum,budget", [("verbose", False, False, 1500),
                                                                 ("verbose", True, False, 1500),
                                                                 ("speeder", False, True, 700)])
def test_budget_respected_every_example_once(tok, prepared, paradigm, packing, curriculum, budget):
    comp = _comp(tok, prepared, paradigm=paradigm, packing=packing)
    s = MicroBatches(comp, 4, seed=5, max_tokens=budget, curriculum=curriculum)
    share = 0.5 if curriculum else 1.0
    assert s.padded_cost is (not packing)
    for epoch in range(2):
        n_steps = len(s.plan(epoch))
        seen, sizes = [], []
        for _ in range(n_steps):
            batch, weight = s.next(share)
            assert s.epoch == epoch and weight == 1.0
            seen += s.last_indices.tolist()
            sizes.append(len(s.last_indices))
            cost = batch.n_tokens if packing else batch.input_ids.numel()
            assert cost <= budget or len(s.last_indices) == 1
        assert sorted(seen) == list(range(len(prepared.train)))  # every example exactly once per epoch
        assert s.steps_per_epoch == n_steps and len(set(sizes)) > 1  # sizes vary with prompt length
        if paradigm == "verbose":  # prompts of 294..785 tokens: 1 to 5 examples per batch
            assert len(set(sizes[:-1])) >= 3
        perm = ShardedSampler(len(prepared.train), seed=5, epoch=epoch).permutation()
        np.testing.assert_array_equal(seen, perm)  # the same order as the example-count stream
    if curriculum:  # text-only prompts are longer here: the plan is costed at the longer form
        assert (_lengths(comp, 0, np.ones(len(prepared.train), bool)) > _lengths(comp, 0)).all()


def test_budget_zero_is_the_example_count_stream(tok, prepared):
    comp = _comp(tok, prepared)
    s = MicroBatches(comp, 4, seed=1, max_tokens=0)
    sampler = ShardedSampler(len(prepared.train), 1, 0, seed=1, batch_size=4)
    tr = prepared.train
    n = sampler.num_steps
    assert s.steps_per_epoch == n == -(-len(tr) // 4)
    for epoch in range(2):
        sampler.set_epoch(epoch)
        cands = sample_train_candidates(prepared, epoch, 8, comp.cfg.data.seed)
        for sb in sampler.batches():
            batch, weight = s.next(0.5)
            rows = np.asarray(sb.indices)
            draw = np.random.default_rng([1, 1, epoch, sb.step_in_epoch]).random(sb.n_global)
            ref = comp.builder.build(tr.histories[rows], tr.lengths[rows], cands[rows], tr.targets[rows],
                                     text_only=draw[: len(rows)] >= 0.5)
            assert weight == sb.n_real * sb.loss_scale
            for f in ("input_ids", "attention_mask", "labels", "slot_item", "slot_abs"):
                assert getattr(batch, f).equal(getattr(ref, f)), f
    assert s.micro_batches_ahead(1.5) == n + -(-n // 2)  # fixed-size epochs: plain arithmetic


@pytest.mark.parametrize("paradigm,budget", [("speeder", 400), ("verbose", 700)])
def test_two_ranks_deal_the_one_process_global_batches(tok, prepared, paradigm, budget):
    """Rank 0 + rank 1 (world 2) run exactly the examples, curriculum draws and loss weights of one
    process given the same global batches, and both ranks take the same number of steps (verbose at
    700: some prompts are longer, run alone, and rank 1 pads that step with a zero-weight example)."""
    comp = _comp(tok, prepared, paradigm=paradigm)
    ranks = [MicroBatches(comp, 4, seed=2, world_size=2, rank=r, max_tokens=budget, curriculum=True) for r in (0, 1)]
    one = MicroBatches(comp, 4, seed=2, world_size=1, max_tokens=2 * budget, curriculum=True)
    n_pad = 0
    for e in range(2):  # one process, given the 2-rank global batches
        one._plans[e] = ranks[0].plan(e)
    assert [len(r.plan(0)) for r in ranks] == [len(ranks[0].plan(0))] * 2
    for epoch in range(2):
        plan = ranks[0].plan(epoch)
        assert all(np.array_equal(a, b) for a, b in zip(plan, ranks[1].plan(epoch)))
        for glob in plan:
            b1, w1 = one.next(0.6)
            parts = [r.next(0.6) for r in ranks]
            rows = [r.last_indices for r in ranks]
            np.testing.assert_array_equal(one.last_indices, glob)
            real = [np.asarray(p[1]) > 0 for p in parts]
            merged = np.empty(len(glob), np.int64)
            merged[0::2] = rows[0]
            if len(glob) > 1:
                merged[1::2] = rows[1]
            np.testing.assert_array_equal(merged, glob)  # glob[r::2] on rank r
            # mean over ranks of weight * rank mean == the global-batch mean: sum_r n_r / n_global == 1
            assert sum(p[1] for p in parts) / 2 == pytest.approx(1.0) and w1 == 1.0
            text_one = ~(b1.slot_item >= 0).any(1).numpy()
            for r, (batch, w) in enumerate(parts):
                if w == 0:
                    assert r == 1 and len(glob) == 1 and rows[1].tolist() == glob.tolist()  # padding example
                    n_pad += 1
                    continue
                assert real[r]
                np.testing.assert_array_equal(~(batch.slot_item >= 0).any(1).numpy(), text_one[r::2])
                cost = batch.input_ids.numel()
                assert cost <= budget or len(glob) == 1
    if paradigm == "verbose":  # many prompts are longer than 700 tokens
        assert n_pad >= 10


def test_seek_restores_the_stream_mid_epoch(tok, prepared):
    comp = _comp(tok, prepared, packing=True)
    a = MicroBatches(comp, 4, seed=9, max_tokens=600, curriculum=True)
    n0 = len(a.plan(0))
    for _ in range(n0 + 3):  # into epoch 1
        a.next(0.7)
    pos = a.position()
    assert pos == {"epoch": 1, "step_in_epoch": 3}
    b = MicroBatches(comp, 4, seed=9, max_tokens=600, curriculum=True)
    b.seek(**pos)
    for _ in range(len(a.plan(1)) + 2):  # across the next epoch boundary too
        (x, wx), (y, wy) = a.next(0.7), b.next(0.7)
        assert wx == wy and x.input_ids.equal(y.input_ids) and x.slot_item.equal(y.slot_item)
        assert a.position() == b.position()


def test_micro_batches_ahead_counts_the_real_plans(tok, prepared):
    comp = _comp(tok, prepared, paradigm="verbose", packing=True)
    s = MicroBatches(comp, 4, seed=0, max_tokens=1500)
    n = [len(s.plan(e)) for e in range(3)]
    assert min(n) > 2
    assert s.micro_batches_ahead(1.0) == n[0]
    assert s.micro_batches_ahead(2.0) == n[0] + n[1]
    assert s.micro_batches_ahead(0.5) == -(-n[0] // 2)
    for _ in range(n[0] - 1):
        s.next()
    assert s.micro_batches_ahead(1.0) == 1 + (n[1] - 1)  # rest of epoch 0, then (n1-1)/n1 of epoch 1
    s.next()
    assert s.micro_batches_ahead(1.0) == n[1]  # at the end of epoch 0: all of epoch 1


@pytest.fixture(scope="module")
def llm_dir(tmp_path_factory):
    return tiny.make_llm_dir(tmp_path_factory.mktemp("tiny_llama"))


def test_train_run_with_token_budget(llm_dir, tmp_path, monkeypatch, prepared):
    from speeder_fast.training import train

    monkeypatch.setenv("SPEEDER_CACHE", str(tmp_path / "cache"))
    cfg = tiny.train_config(llm_dir, tmp_path, "tok")
    cfg.prompt.paradigm, cfg.prompt.answer_mode = "speeder", "score"
    cfg.features.sasrec_epochs, cfg.features.sasrec_dim = 1, 16
    cfg.features.modalities = ["text"]
    cfg.train.grad_accum, cfg.train.log_every = 1, 1
    cfg.train.max_tokens_per_batch = 2500
    cfg.train.eval_max_examples = 8
    cfg.train.stages = [StageConfig(modalities=["text"], epochs=1.0, lr=3e-3, curriculum_ramp=0.5)]
    cfg.eval.max_examples, cfg.eval.batch_size = 8, 8
    res = train(cfg, progress=False, prepared=prepared)
    recs = [json.loads(x) for x in (res.run_dir / "metrics.jsonl").read_text().splitlines()]
    tr = [r for r in recs if r["type"] == "train"]
    # one epoch = exactly the plan's steps, every example once; batches vary in size
    assert res.steps == len(tr) and [r["global_step"] for r in tr] == list(range(1, res.steps + 1))
    assert sum(r["examples"] for r in tr) == len(prepared.train)
    assert res.steps < len(prepared.train) / 4  # bigger batches than batch_size=4 at this budget
    assert len({r["examples"] for r in tr}) > 1 and all(r["tokens"] > 0 and r["tokens_per_s"] > 0 for r in tr)
    assert tr[0]["hybrid_share"] == 0.0 and tr[-1]["hybrid_share"] == 1.0
    assert tr[-1]["epoch"] == pytest.approx(1.0)
    summary = json.loads((res.run_dir / "train_summary.json").read_text())
    assert summary["epochs"] == pytest.approx(1.0)
    state = json.loads((res.run_dir / "checkpoints" / "stage1" / "trainer_state.json").read_text())
    assert state["extra"]["stage_total"] == res.steps
