"""Per-slot collaborative user state (``model.user_state=sasrec``, :mod:`speeder_fast.model.user_state`) and
the raw-SASRec head block (``model.head_collab_dot``) in a run."""

from __future__ import annotations

import pytest
import torch

import tiny
from speeder_fast.config import ConfigError, StageConfig, load_config
from speeder_fast.features.sasrec import SASRec
from speeder_fast.model.item_head import ItemHead
from speeder_fast.model.user_state import UserState


@pytest.fixture(scope="module")
def llm_dir(tmp_path_factory):
    return tiny.make_llm_dir(tmp_path_factory.mktemp("tiny_llama_us"))


def _sasrec(n_items: int, seed: int = 0) -> SASRec:
    torch.manual_seed(seed)
    s = SASRec(n_items, dim=16, n_layers=2, n_heads=2, max_len=50, dropout=0.5)
    with torch.no_grad():  # std-0.02 init makes every state nearly the same: spread them out
        for p in s.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return s.eval()


def _model(llm_dir, user_state: bool = True, k: int = 2):
    from speeder_fast.model.llm import SpeederRecModel

    cfg, prepared, builder, model = tiny.make_rec_model(llm_dir, mode="item", k=k, lora_b_noise=True)
    n = prepared.dataset.n_items
    us = UserState(_sasrec(n), 64) if user_state else None
    if us is not None:
        with torch.no_grad():
            us.proj.weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
    m = SpeederRecModel(model.llm, model.mome, model.positions, item_head=ItemHead(64, n), user_state=us)
    return prepared.with_sequence_windows(5), builder, m


def test_slot_states_are_sasrec_on_each_prompts_own_history(llm_dir):
    """At history slot t of prompt b the state is SASRec's output at t on that prompt's history
    alone (the standard left-padded input), on every one of the k tokens; zero off history slots."""
    prepared, builder, m = _model(llm_dir)
    tr = prepared.train
    rows = list(range(9))
    batch = builder.build(tr.histories[rows], tr.lengths[rows], None, tr.targets[rows])
    B, L = batch.input_ids.shape
    st = m.user_state.slot_states(batch.slot_item, batch.slot_abs, torch.arange(B)[:, None].expand(B, L), B,
                                  batch.unique_items, m.mome.k)
    assert st.shape == (B, L, 16)
    for b in rows:
        n = int(tr.lengths[b])
        seq = torch.zeros(1, 50, dtype=torch.long)
        seq[0, 50 - n:] = torch.from_numpy(tr.histories[b, :n]) + 1
        with torch.no_grad():
            ref = m.user_state.sasrec(seq)[0, 50 - n:]  # [n, d]
        for p in range(L):
            a = int(batch.slot_abs[b, p])
            if a >= 0:
                torch.testing.assert_close(st[b, p], ref[a], rtol=1e-4, atol=1e-5)
            else:
                assert torch.count_nonzero(st[b, p]) == 0
    assert int((batch.slot_abs >= 0).sum()) == m.mome.k * int(tr.lengths[rows].sum())


def test_user_state_padded_packed_prefix_and_static_paths_agree(llm_dir):
    """The loss is the same padded and packed, and the catalogue scores the same eagerly, with the
    prefix cache and through the static scorer (each path rebuilds the histories on its own)."""
    from speeder_fast.model.static import StaticScorer

    prepared, builder, m = _model(llm_dir)
    tr = prepared.train
    batch = builder.build(tr.histories[:6], tr.lengths[:6], None, tr.targets[:6])
    m.eval()
    padded = m(batch)
    m.packing = True
    torch.testing.assert_close(m(batch), padded, rtol=1e-4, atol=1e-5)
    m.packing = False
    te = prepared.test
    ev = builder.build(te.histories[:7], te.lengths[:7], None, None, with_answer=False)
    with torch.no_grad():
        m.prefix_cache = False
        plain = m.score(ev)
        m.prefix_cache = True
        cached = m.score(ev)
        static = StaticScorer(m, batch_size=4, length_multiple=16, compile="static")(ev)
        m.packing = True
        packed = m.score(ev)
    for other in (cached, static, packed):
        torch.testing.assert_close(other, plain, rtol=1e-4, atol=1e-4)


def test_user_state_changes_the_scores_and_trains_only_its_projection(llm_dir):
    """A zero projection is the model without the user state; a non-zero one changes the scores;
    the loss reaches the projection and never SASRec."""
    prepared, builder, m = _model(llm_dir)
    _, _, plain = _model(llm_dir, user_state=False)
    te = prepared.test
    ev = builder.build(te.histories[:5], te.lengths[:5], None, None, with_answer=False)
    m.eval()
    plain.eval()
    with torch.no_grad():
        with_state = m.score(ev)
        m.user_state.proj.weight.zero_()
        m.invalidate_caches()
        zero = m.score(ev)
        ref = plain.score(ev)
    torch.testing.assert_close(zero, ref)
    assert not torch.allclose(with_state, ref, atol=1e-3)
    m.user_state.proj.weight.data.normal_(0, 0.1)
    tr = prepared.train
    batch = builder.build(tr.histories[:4], tr.lengths[:4], None, tr.targets[:4])
    m.train()
    assert not m.user_state.sasrec.training  # frozen: no dropout in training either
    m(batch).backward()
    assert m.user_state.proj.weight.grad is not None and m.user_state.proj.weight.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in m.user_state.sasrec.parameters())
    sd = m.trainable_state_dict()
    assert "user_state.proj.weight" in sd and not any(k.startswith("user_state.sasrec") for k in sd)
    # inactive collab (an MPO text stage): no user state
    m.eval()
    m.set_stage(["text"])
    plain.set_stage(["text"])
    with torch.no_grad():
        torch.testing.assert_close(m.score(ev), plain.score(ev))


def test_user_state_config_is_checked():
    with pytest.raises(ConfigError, match="user_state"):
        load_config(None, ["model.user_state=sasrec", 'features.modalities=["text"]'])
    with pytest.raises(ConfigError, match="max_history"):
        load_config(None, ["model.user_state=sasrec", "data.max_history=51"])
    with pytest.raises(ConfigError, match="model.user_state"):
        load_config(None, ["model.user_state=gru"])
    assert load_config(None, ["model.user_state=sasrec"]).model.user_state == "sasrec"
    with pytest.raises(ConfigError, match="head_collab_dot"):
        load_config(None, ["model.head_collab_dot=true", "prompt.answer_mode=score"])


def _user_state_run(llm_dir, tmp_path, monkeypatch, name: str, steps: int):
    """``(prepared, cfg)`` of a tiny item-mode run with ``model.user_state=sasrec`` (text + collab,
    a 2-epoch 16-wide SASRec, one stage of ``steps`` steps), its cache under ``tmp_path``."""
    monkeypatch.setenv("SPEEDER_CACHE", str(tmp_path / "cache"))
    torch.set_num_threads(1)
    prepared = tiny.make_prepared(n_users=30, n_items=20, n_candidates=8, max_history=5, seed=1)
    cfg = tiny.train_config(llm_dir, tmp_path, name)
    cfg.prompt.answer_mode = "item"
    cfg.model.user_state = "sasrec"
    cfg.features.modalities = ["text", "collab"]
    cfg.features.sasrec_epochs, cfg.features.sasrec_dim = 2, 16
    cfg.train.stages = [StageConfig(modalities=["text", "collab"], max_steps=steps, lr=5e-3)]
    return prepared, cfg


def test_user_state_run_trains_saves_and_reloads(llm_dir, tmp_path, monkeypatch):
    """A user-state + collab-dot run trains both projections, keeps SASRec in RUN/sasrec.safetensors,
    and evaluate / load_run rebuild the same model from the run folder (same test metrics)."""
    from speeder_fast.evaluate import evaluate_run, evaluate_split
    from speeder_fast.training import train
    from speeder_fast.training.run import load_run

    prepared, cfg = _user_state_run(llm_dir, tmp_path, monkeypatch, "us", 4)
    cfg.model.head_collab_dot = True
    cfg.train.batch_size = 8
    cfg.train.eval_max_examples = 10
    res = train(cfg, progress=False, prepared=prepared)
    m = res.components.model
    assert m.user_state is not None and m.user_state.proj.weight.abs().sum() > 0  # trained away from zero
    assert (res.run_dir / "sasrec.safetensors").is_file()
    assert m.item_head.collab_proj.weight.abs().sum() > 0  # the collab dot block trained too
    collab = m.mome.features_of("collab")  # standardised; the head block keeps the raw embeddings
    assert m.item_head.collab_keys.shape == (20, 16) and not torch.allclose(m.item_head.collab_keys, collab)
    r = evaluate_split(m, res.components.builder, res.components.prepared, "test", "item", 0, 16, device="cpu",
                       progress=False)
    result, _, _ = evaluate_run(res.run_dir, split="test", checkpoint="final", progress=False, prepared=prepared)
    assert result["full_NDCG@10"] == pytest.approx(r["full_NDCG@10"], abs=1e-6)
    assert result["HR@1"] == pytest.approx(r["HR@1"], abs=1e-6)
    loaded = load_run(res.run_dir, prepared=prepared)
    torch.testing.assert_close(loaded.model.user_state.proj.weight, m.user_state.proj.weight)
    torch.testing.assert_close(loaded.model.item_head.collab_keys, m.item_head.collab_keys)
    torch.testing.assert_close(loaded.model.item_head.collab_proj.weight, m.item_head.collab_proj.weight)
    (res.run_dir / "sasrec.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="sasrec.safetensors"):
        load_run(res.run_dir, prepared=prepared)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_user_state_scores_equal_the_cpu_model(llm_dir):
    """On CUDA the user-state model scores as on CPU: eagerly (padded and packed) and through the
    compiled static scorer (reduce-overhead: CUDA graphs over the device-side history rebuild)."""
    from speeder_fast.model.static import StaticScorer

    prepared, builder, m = _model(llm_dir)
    m.eval()
    te = prepared.test
    ev = builder.build(te.histories[:8], te.lengths[:8], None, None, with_answer=False)
    with torch.no_grad():
        ref = m.score(ev)
        g = m.to("cuda")
        evc = ev.to("cuda")
        got = g.score(evc).cpu()
        g.set_packing("on")
        packed = g.score(evc).cpu() if g.packing else got
        g.packing = False
        static = StaticScorer(g, batch_size=8, length_multiple=32, compile="reduce-overhead",
                              pad_id=builder.pad_id)(evc).cpu()
    for other in (got, packed, static):
        torch.testing.assert_close(other, ref, rtol=2e-3, atol=2e-3)


def test_without_last_shortens_every_sequence_and_resplits():
    prepared = tiny.make_prepared(n_users=12, n_items=20, n_candidates=8, max_history=5, seed=3)
    short = prepared.without_last(1)
    for u, s in enumerate(prepared.dataset.sequences):
        assert short.dataset.sequences[u].tolist() == s[:max(3, len(s) - 1)].tolist()
    vi = short.valid.users.tolist().index(0)
    assert short.valid.targets[vi] == prepared.dataset.sequences[0][-3]  # was the last training target
    assert short.test_candidates.shape == (len(short.test), 1)
    assert (short.test_candidates[:, 0] == short.test.targets).all()
    with pytest.raises(ValueError, match="n must be"):
        prepared.without_last(-1)


def test_sasrec_holdout_trains_the_collab_encoder_without_the_last_transitions(llm_dir, tmp_path, monkeypatch):
    """features.sasrec_holdout=1: the reference SASRec (RUN/sasrec.safetensors) is trained as usual, the
    collab features (and the user state) come from a second SASRec saved as sasrec_features.safetensors,
    and load_run rebuilds the user state from that one."""
    from speeder_fast.features.sasrec import load_sasrec, sasrec_item_embeddings
    from speeder_fast.training import train
    from speeder_fast.training.run import load_features, load_run

    prepared, cfg = _user_state_run(llm_dir, tmp_path, monkeypatch, "holdout", 2)
    cfg.features.sasrec_holdout = 1
    res = train(cfg, progress=False, prepared=prepared)
    run = res.run_dir
    ref, feat = load_sasrec(run / "sasrec.safetensors"), load_sasrec(run / "sasrec_features.safetensors")
    assert not torch.equal(ref.item_emb.weight, feat.item_emb.weight)
    stored = load_features(run / "item_features.safetensors")["collab"][0]
    torch.testing.assert_close(stored, sasrec_item_embeddings(feat, prepared.without_last(1))[0])
    loaded = load_run(run, prepared=prepared)
    torch.testing.assert_close(loaded.model.user_state.sasrec.item_emb.weight, feat.item_emb.weight)


def test_last_window_only_keeps_one_window_per_user_ending_at_the_last_training_item():
    prepared = tiny.make_prepared(n_users=12, n_items=20, n_candidates=8, max_history=5, seed=3)
    last = prepared.with_sequence_windows(3, last_only=True).train
    assert sorted(last.users.tolist()) == list(range(12))
    for i, u in enumerate(last.users):
        s = prepared.dataset.sequences[u]
        assert last.targets[i] == s[-3]
        assert last.histories[i, :last.lengths[i]].tolist() == s[:-3][-3:].tolist()
    every = prepared.with_sequence_windows(3).train
    assert len(every) > len(last)
