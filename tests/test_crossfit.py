"""Cross-fitted collab features (``features.sasrec_crossfit``, :mod:`speeder_fast.features.crossfit`):
folds, alignment, the fold SASRecs never see their fold's users, one-fold batches, the MoME reads the
batch's fold table, and a run trains, resumes and evaluates with them."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

import tiny
from speeder_fast.config import ConfigError, load_config
from speeder_fast.features.crossfit import procrustes_align, user_folds
from speeder_fast.training.batches import FoldBlockedSampler


@pytest.fixture(scope="module")
def llm_dir(tmp_path_factory):
    return tiny.make_llm_dir(tmp_path_factory.mktemp("tiny_llama_crossfit"))


def test_user_folds_are_balanced_seeded_and_checked():
    f = user_folds(103, 4, seed=7)
    assert f.shape == (103,) and f.dtype == np.int64
    assert sorted(np.bincount(f).tolist()) == [25, 26, 26, 26]
    assert np.array_equal(f, user_folds(103, 4, seed=7))
    assert not np.array_equal(f, user_folds(103, 4, seed=8))
    for bad in (1, 0, 104):
        with pytest.raises(ValueError, match="2 <= K"):
            user_folds(103, bad, seed=0)


def test_procrustes_recovers_a_rotation_from_the_common_items_only():
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(40, 6, generator=g)
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=g))
    x = ref @ q.T + 0.01 * torch.randn(40, 6, generator=g)
    common = torch.ones(40, dtype=torch.bool)
    common[30:] = False
    x[30:] = 100.0 * torch.randn(10, 6, generator=g)  # junk rows outside `common` must not move the fit
    xa, res = procrustes_align(x, ref, common)
    assert res < 0.02
    assert torch.allclose(xa[:30], ref[:30], atol=0.05)
    assert torch.allclose(xa[30:].norm(dim=1), x[30:].norm(dim=1), rtol=1e-5)  # a rotation keeps norms
    _, unrelated = procrustes_align(torch.randn(40, 6, generator=g), ref, common)
    assert unrelated > 0.5
    with pytest.raises(ValueError, match="common items"):
        procrustes_align(x, ref, torch.arange(40) < 3)
    with pytest.raises(ValueError, match="shapes"):
        procrustes_align(x[:, :5], ref, common)


def test_without_users_keeps_the_catalogue_and_drops_every_event_of_the_users():
    prepared = tiny.make_prepared(n_candidates=8, max_history=5)
    n = prepared.dataset.n_users
    drop = np.zeros(n, bool)
    drop[::3] = True
    kept = prepared.without_users(drop)
    assert kept.dataset.n_items == prepared.dataset.n_items
    assert kept.dataset.user_ids == [u for i, u in enumerate(prepared.dataset.user_ids) if not drop[i]]
    assert all(np.array_equal(a, prepared.dataset.sequences[i])
               for a, i in zip(kept.dataset.sequences, np.flatnonzero(~drop)))
    assert len(kept.test) == int((~drop).sum()) and kept.test_candidates.shape == (len(kept.test), 1)
    with pytest.raises(ValueError, match="every user"):
        prepared.without_users(np.ones(n, bool))
    with pytest.raises(ValueError, match="drop must be"):
        prepared.without_users(np.zeros(n + 1, bool))


def test_each_fold_sasrec_trains_without_its_users(monkeypatch):
    """crossfit_tables gives fold k's SASRec exactly the users outside fold k, and aligns its table."""
    from speeder_fast.features import crossfit, sasrec
    from speeder_fast.features.sasrec import SASRecConfig, sasrec_item_embeddings, train_sasrec

    prepared = tiny.make_prepared(n_candidates=8, max_history=5)
    scfg = SASRecConfig(dim=16, epochs=2, seed=3)
    ref_model, _ = train_sasrec(prepared, scfg, progress=False)
    ref, ref_mask = sasrec_item_embeddings(ref_model, prepared)
    seen_users = []
    real = sasrec.train_sasrec

    def spy(p, cfg, **kw):
        seen_users.append(set(p.dataset.user_ids))
        return real(p, cfg, **kw)

    monkeypatch.setattr(sasrec, "train_sasrec", spy)
    tables, folds, info = crossfit.crossfit_tables(prepared, scfg, 3, ref, ref_mask, progress=False)
    ids = np.asarray(prepared.dataset.user_ids)
    assert np.array_equal(folds, user_folds(prepared.dataset.n_users, 3, 3))
    for k in range(3):
        assert seen_users[k] == set(ids[folds != k])  # every user but fold k's, and no one of fold k
        x, mask = tables[k]
        assert x.shape == ref.shape and mask.dtype == torch.bool
        assert torch.all(x[~mask] == 0)
        assert info["folds"][k]["users_left_out"] == int((folds == k).sum())
        assert 0 <= info["folds"][k]["procrustes_residual"] < 1.5


def test_fold_blocked_batches_hold_one_fold_and_cover_every_row():
    groups = np.repeat([0, 1, 2], [13, 8, 21])
    np.random.default_rng(0).shuffle(groups)
    s = FoldBlockedSampler(groups, batch_size=4, seed=1)
    for epoch in (0, 1):
        s.set_epoch(epoch)
        batches = [b.indices for b in s.batches()]
        assert len(batches) == s.num_steps == 4 + 2 + 6
        assert all(len(b) == 4 and len(set(groups[b])) == 1 for b in batches)
        seen = np.concatenate(batches)
        assert set(seen.tolist()) == set(range(len(groups)))
        assert len(seen) - len(groups) == 3 + 0 + 3  # each group's last batch is filled by repeats
    s.set_epoch(0)
    first = [b.indices for b in s.batches()]
    s.set_epoch(1)
    assert first != [b.indices for b in s.batches()]
    assert [b.indices for b in s.batches(start_step=5)] == [b.indices for b in s.batches()][5:]  # resumable
    two = [FoldBlockedSampler(groups, 2, r, batch_size=2, seed=1) for r in (0, 1)]
    for b0, b1 in zip(two[0].batches(), two[1].batches()):  # ranks split one global batch of one fold
        both = b0.indices + b1.indices
        assert len(both) == 4 and len(set(groups[both])) == 1
    with pytest.raises(ValueError, match="non-negative"):
        FoldBlockedSampler(np.array([0, -1]))


def _tables(mome, seed=5):
    g = torch.Generator().manual_seed(seed)
    x = mome.features_of("collab")
    out = []
    for k in range(2):
        mask = torch.rand(x.shape[0], generator=g) > 0.3
        out.append((torch.randn(x.shape, generator=g) * 4, mask))
    return out


def test_mome_reads_the_fold_table_inside_using_fold_only(llm_dir):
    from speeder_fast.model.mome import MoME

    _, prepared, _, model = tiny.make_rec_model(llm_dir, mode="item")
    mome = model.mome.eval()
    feats = tiny.tiny_features(prepared)
    tables = _tables(mome)
    mome.set_collab_folds(tables)
    items = torch.arange(mome.n_items)
    ref_tokens = mome.encode(items)
    cached = mome.encode_catalog()
    for k, (x, mask) in enumerate(tables):
        twin = MoME({**feats, "collab": (x, mask)}, mome.hidden_size, mome.k, 32, False, 1.0)
        twin.load_state_dict(mome.state_dict())
        twin.eval()
        with mome.using_fold(k):
            assert mome.fold == k
            torch.testing.assert_close(mome.encode(items), twin.encode(items))
            torch.testing.assert_close(mome.encode_catalog(), twin.encode(items))
            torch.testing.assert_close(mome.expert_vectors(items), twin.expert_vectors(items))
            assert not torch.allclose(mome.encode(items), ref_tokens)
        assert mome.fold is None
    torch.testing.assert_close(mome.encode(items), ref_tokens)
    assert mome.encode_catalog() is cached  # the reference cache survives a fold
    with pytest.raises(ValueError, match="2 cross-fitted tables"):
        with mome.using_fold(2):
            pass
    with pytest.raises(ValueError, match="shape"):
        mome.set_collab_folds([(torch.zeros(3, 2), torch.ones(3, dtype=torch.bool))])


def test_a_batch_with_a_fold_trains_on_that_fold_table(llm_dir):
    """The loss of a batch carrying fold k equals the loss of the same model whose reference collab
    table is fold k's (item mode, all positions, gradients included)."""
    from speeder_fast.model.item_head import ItemHead
    from speeder_fast.model.llm import ItemLossSettings, SpeederRecModel
    from speeder_fast.model.mome import MoME

    _, prepared, builder, model = tiny.make_rec_model(llm_dir, mode="item")
    prepared = prepared.with_sequence_windows(5)
    feats = tiny.tiny_features(prepared)
    n = prepared.dataset.n_items
    m = SpeederRecModel(model.llm, model.mome, model.positions, item_head=ItemHead(64, n))
    m.item_loss = ItemLossSettings()
    tables = _tables(m.mome)
    m.mome.set_collab_folds(tables)
    tr = prepared.train
    batch = builder.build(tr.histories[:4], tr.lengths[:4], None, tr.targets[:4], with_answer=True)
    base = m(batch)
    batch.fold = 1
    loss = m(batch)
    assert not torch.allclose(loss, base)
    loss.backward()
    grad = m.mome.experts["collab"][0].weight.grad.clone()
    twin_mome = MoME({**feats, "collab": tables[1]}, 64, m.mome.k, 32, False, 1.0)
    twin_mome.load_state_dict(m.mome.state_dict())
    twin = SpeederRecModel(model.llm, twin_mome, model.positions, item_head=m.item_head)
    twin.item_loss = m.item_loss
    batch.fold = None
    m.zero_grad()
    want = twin(batch)
    want.backward()
    torch.testing.assert_close(loss, want)
    torch.testing.assert_close(grad, twin_mome.experts["collab"][0].weight.grad)
    # scoring: model.score and the static scorer read the batch's fold, like the twin's reference table
    from speeder_fast.model.static import StaticScorer

    m.eval()
    twin.eval()
    ev = builder.build(prepared.test.histories[:5], prepared.test.lengths[:5], None, None, with_answer=False)
    with torch.no_grad():
        plain = m.score(ev)
        ev.fold = 1
        torch.testing.assert_close(m.score(ev), twin.score(dataclasses.replace(ev, fold=None)))
        torch.testing.assert_close(StaticScorer(m, 8, compile="static")(ev), m.score(ev), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(m.score(ev), plain)
        ev.fold = None
        torch.testing.assert_close(m.score(ev), plain)  # the reference cache is still the reference's


def test_crossfit_config_is_checked():
    cfg = load_config(None, ["features.sasrec_crossfit=4"])
    assert cfg.features.sasrec_crossfit == 4
    for sets, msg in ((["features.sasrec_crossfit=1"], ">= 2 folds"),
                      (["features.sasrec_crossfit=4", "features.sasrec_holdout=1"], "sasrec_holdout"),
                      (["features.sasrec_crossfit=4", "model.user_state=sasrec"], "user_state"),
                      (["features.sasrec_crossfit=4", "train.max_tokens_per_batch=512"], "max_tokens_per_batch"),
                      (["features.sasrec_crossfit=4", "prompt.answer_mode=score"], "answer_mode=item"),
                      (["features.sasrec_crossfit=4", 'features.modalities=["text"]'], "collab")):
        with pytest.raises(ConfigError, match=msg):
            load_config(None, sets)


def test_crossfit_run_trains_each_batch_on_its_fold_resumes_and_evaluates(llm_dir, tmp_path, monkeypatch):
    """A tiny run writes the fold tables; every training batch holds users of one fold and the MoME
    reads that fold's table for it; validation reads each user's own fold; a run stopped after a
    checkpoint resumes from the saved tables with the batches of an uninterrupted run; evaluation
    pools the per-fold evaluations; a run without its tables is refused."""
    from test_resume import tiny_config, write_atomic_dataset

    from speeder_fast.config import StageConfig
    from speeder_fast.evaluate import evaluate_run
    from speeder_fast.model.mome import MoME
    from speeder_fast.training import train
    from speeder_fast.training.run import COLLAB_FOLDS_FILE, load_collab_folds

    monkeypatch.setenv("SPEEDER_CACHE", str(tmp_path / "cache"))
    torch.set_num_threads(1)
    data = write_atomic_dataset(tmp_path / "data")
    cfg = tiny_config(llm_dir, data, tmp_path / "out", "cf")
    cfg.prompt.answer_mode = "item"
    cfg.features.sasrec_crossfit = 3
    cfg.train.stages = [StageConfig(modalities=["text", "collab"], max_steps=4, lr=3e-3)]
    reads: list[tuple[int | None, bool]] = []
    real = MoME.encode

    def spy(self, items):
        reads.append((self.fold, self.training))
        return real(self, items)

    monkeypatch.setattr(MoME, "encode", spy)
    folds_of_batches = []
    import speeder_fast.training.batches as B

    real_next = B.MicroBatches.next

    def spy_next(self, *a, **kw):
        batch, w = real_next(self, *a, **kw)
        users = self.comp.prepared.train.users[self.last_indices]
        folds_of_batches.append((batch.fold, set(self.comp.model.mome.user_folds[users].tolist())))
        return batch, w

    monkeypatch.setattr(B.MicroBatches, "next", spy_next)
    class Stop(Exception):
        pass

    def stop_at_2(progress):
        if progress.global_step == 2:  # a crash right after the step-2 checkpoint
            raise Stop

    with pytest.raises(Stop):
        train(cfg, progress=False, on_step=stop_at_2)
    run = tmp_path / "out" / "cf"
    tables, folds = load_collab_folds(run / COLLAB_FOLDS_FILE)
    assert len(tables) == 3 and len(folds_of_batches) == 2
    res = train(cfg, run_dir=run, progress=False, resume=True)  # steps 3 and 4, from the saved tables
    assert np.array_equal(folds, res.components.model.mome.user_folds)
    assert len(folds_of_batches) == 4 and all(f is not None and s == {f} for f, s in folds_of_batches)
    assert {f for f, train_mode in reads if train_mode} == {f for f, _ in folds_of_batches}  # the batches' folds
    assert {f for f, train_mode in reads if not train_mode} == {0, 1, 2}  # validation: each user's own fold
    for (x, m), (x2, m2) in zip(tables, load_collab_folds(run / COLLAB_FOLDS_FILE)[0]):
        assert torch.equal(x, x2) and torch.equal(m, m2)
    # the resumed run's batches are the uninterrupted run's
    cfg2 = tiny_config(llm_dir, data, tmp_path / "out", "cf2")
    cfg2.prompt.answer_mode, cfg2.features.sasrec_crossfit, cfg2.train.stages = "item", 3, cfg.train.stages
    folds_once = list(folds_of_batches)
    folds_of_batches.clear()
    train(cfg2, progress=False)
    assert folds_of_batches == folds_once
    # evaluation scores every user through its own fold: the metrics are the per-fold evaluations pooled
    from speeder_fast.evaluate import evaluate_split
    from speeder_fast.training.run import load_run

    got, _, _ = evaluate_run(run, progress=False, max_examples=0)
    comp = load_run(run, checkpoint="best" if (run / "checkpoints" / "best").is_dir() else "final")
    assert np.array_equal(comp.model.mome.user_folds, folds)
    te, cands, pooled, n = comp.prepared.test, comp.prepared.test_candidates, 0.0, 0
    for k in range(3):
        rows = np.flatnonzero(folds[te.users] == k)
        sub = dataclasses.replace(comp.prepared, test=te.subset(rows), test_candidates=cands[rows])
        with comp.model.mome.using_fold(k):
            comp.model.mome.user_folds, saved = None, comp.model.mome.user_folds  # score the subset in fold k
            r = evaluate_split(comp.model, comp.builder, sub, "test", "item", 0, 8, progress=False)
            comp.model.mome.user_folds = saved
        pooled, n = pooled + r["full_NDCG@10"] * r["n"], n + r["n"]
    assert got["n"] == n and got["full_NDCG@10"] == pytest.approx(pooled / n, abs=1e-6)
    # recommend ranks each user by the scores of its own fold
    from speeder_fast.recommend import build_queries, recommend

    users = [(None, comp.prepared.dataset.user_ids[u], u) for u in range(9)]
    recs = list(recommend(comp, users, 2, compile_mode="off", progress=False))
    hist, lens, _, seen = build_queries(comp, users, "test", "catalogue", 0, 0)
    for i, (_, _, u) in enumerate(users):
        b = comp.builder.build(hist[i:i + 1], lens[i:i + 1], None, None, with_answer=False)
        b.fold = int(folds[u])
        with torch.no_grad():
            sc = comp.model.score(b)[0]
        sc[torch.from_numpy(seen[i])] = float("-inf")
        assert recs[i]["recommendations"][0]["score"] == pytest.approx(float(sc.max()), abs=2e-6)
    (run / COLLAB_FOLDS_FILE).unlink()
    with pytest.raises(FileNotFoundError, match=COLLAB_FOLDS_FILE):
        load_run(run)
    (run / "FINISHED.json").unlink()
    with pytest.raises(FileNotFoundError, match=COLLAB_FOLDS_FILE):  # resuming needs them
        train(cfg, run_dir=run, progress=False, resume=True)


def test_fold_batches_group_rows_by_fold_in_order():
    rows = np.array([10, 11, 12, 13, 14, 15, 16])
    folds = np.array([1, 0, 1, -1, 0, 1, 1])
    from speeder_fast.features.crossfit import fold_batches, row_folds

    got = [(r.tolist(), f) for r, f in fold_batches(rows, folds, 2)]
    assert got == [([11, 14], 0), ([10, 12], 1), ([15, 16], 1), ([13], None)]

    assert [(r.tolist(), f) for r, f in fold_batches(rows, None, 3)] == [([10, 11, 12], None), ([13, 14, 15], None),
                                                                         ([16], None)]

    class M:
        class mome:
            user_folds = np.array([2, 0, 1])

    assert row_folds(M, np.array([1, 2, -1, 5, 0])).tolist() == [0, 1, -1, -1, 2]
    assert row_folds(object(), np.array([0])) is None


def test_a_presets_crossfit_and_fusion_are_left_off_where_they_cannot_apply(monkeypatch, caplog, tmp_path):
    """A preset's sasrec_crossfit / sasrec_fusion that the file and --set left alone are turned off for
    runs that cannot use them (another paradigm, a label head, a clashing option); chosen explicitly,
    they still fail validation."""
    import logging

    from speeder_fast import config as C

    monkeypatch.setitem(C.PRESETS, "cf", ["features.sasrec_crossfit=4", "model.sasrec_fusion=auto"])
    cfg = C.resolve("cf")
    assert (cfg.features.sasrec_crossfit, cfg.model.sasrec_fusion) == (4, "auto")
    with caplog.at_level(logging.INFO, logger="speeder_fast.config"):
        cfg = C.resolve("cf", None, ["prompt.paradigm=titles"])
    assert (cfg.features.sasrec_crossfit, cfg.model.sasrec_fusion) == (0, "off")
    assert "preset setting features.sasrec_crossfit=4 left off" in caplog.text
    cfg = C.resolve("cf", None, ["features.sasrec_holdout=1"])  # the holdout recipe keeps the fusion
    assert (cfg.features.sasrec_crossfit, cfg.model.sasrec_fusion) == (0, "auto")
    cfg = C.resolve("cf", None, ["prompt.answer_mode=score"])
    assert (cfg.features.sasrec_crossfit, cfg.model.sasrec_fusion) == (0, "off")
    with pytest.raises(ConfigError, match="features.sasrec_crossfit needs"):
        C.resolve("cf", None, ["prompt.paradigm=titles", "features.sasrec_crossfit=4"])
    toml = tmp_path / "c.toml"
    toml.write_text('[prompt]\nparadigm = "titles"\n[model]\nsasrec_fusion = "auto"\n')  # chosen by the file
    with pytest.raises(ConfigError, match="model.sasrec_fusion needs"):
        C.resolve("cf", toml)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_fold_scores_and_loss_equal_the_cpu_model(llm_dir):
    """On CUDA a batch of fold k trains and scores through fold k's table as on the CPU (the loss,
    ``model.score`` and the static scorer, fold tables moved with the module)."""
    from speeder_fast.model.item_head import ItemHead
    from speeder_fast.model.llm import ItemLossSettings, SpeederRecModel
    from speeder_fast.model.static import StaticScorer

    _, prepared, builder, model = tiny.make_rec_model(llm_dir, mode="item")
    prepared = prepared.with_sequence_windows(5)
    m = SpeederRecModel(model.llm, model.mome, model.positions, item_head=ItemHead(64, prepared.dataset.n_items))
    m.item_loss = ItemLossSettings()
    m.mome.set_collab_folds(_tables(m.mome))
    tr, te = prepared.train, prepared.test
    batch = builder.build(tr.histories[:4], tr.lengths[:4], None, tr.targets[:4], with_answer=True)
    batch.fold = 1
    ev = builder.build(te.histories[:8], te.lengths[:8], None, None, with_answer=False)
    ev.fold = 0
    loss = m(batch).detach()
    m.eval()
    with torch.no_grad():
        ref = m.score(ev)
        g = m.to("cuda")
        evc = ev.to("cuda")
        got = g.score(evc).cpu()
        static = StaticScorer(g, batch_size=8, length_multiple=32, compile="static", pad_id=builder.pad_id)(evc).cpu()
    g.train()
    torch.testing.assert_close(g(batch.to("cuda")).detach().cpu(), loss, rtol=2e-3, atol=2e-3)
    for other in (got, static):
        torch.testing.assert_close(other, ref, rtol=2e-3, atol=2e-3)
