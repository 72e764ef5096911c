"""Score fusion with the run's SASRec (``model.sasrec_fusion``, :mod:`speeder_fast.model.fusion` and
:mod:`speeder_fast.training.fusion`)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import tiny
from speeder_fast.config import ConfigError, load_config
from speeder_fast.model.fusion import FUSION_GRID, SasrecFusion, fuse_scores
from test_user_state import _sasrec


@pytest.fixture(scope="module")
def llm_dir(tmp_path_factory):
    return tiny.make_llm_dir(tmp_path_factory.mktemp("tiny_llama_fusion"))


def _model(llm_dir, weight: float = 0.7, k: int = 2):
    """``(prepared, builder, model)``: a tiny item-mode model with a SASRec fusion at ``weight``."""
    from speeder_fast.model.item_head import ItemHead
    from speeder_fast.model.llm import SpeederRecModel

    cfg, prepared, builder, model = tiny.make_rec_model(llm_dir, mode="item", k=k, lora_b_noise=True)
    n = prepared.dataset.n_items
    m = SpeederRecModel(model.llm, model.mome, model.positions, item_head=ItemHead(64, n))
    m.fusion = SasrecFusion(_sasrec(n), weight)
    m.eval()
    return prepared.with_sequence_windows(5), builder, m


def _sasrec_log_probs(sas, history: np.ndarray) -> torch.Tensor:
    """Reference: SASRec's log-softmax after the newest item of ``history``, on the standard
    left-padded input of its window."""
    L = sas.max_len
    seq = torch.zeros(1, L, dtype=torch.long)
    h = torch.from_numpy(np.asarray(history, dtype=np.int64))[-L:]
    seq[0, L - len(h):] = h + 1
    with torch.no_grad():
        return torch.log_softmax(sas.score_all(sas(seq)[0, -1]).float(), -1)


def test_log_probs_are_sasrec_on_each_prompts_own_history(llm_dir):
    prepared, builder, m = _model(llm_dir)
    te = prepared.test
    rows = list(range(7))
    batch = builder.build(te.histories[rows], te.lengths[rows], None, None, with_answer=False)
    B, L = batch.slot_abs.shape
    lp = m.fusion.log_probs(batch.slot_item, batch.slot_abs, torch.arange(B)[:, None].expand(B, L), B,
                            batch.unique_items, m.mome.k)
    assert lp.shape == (B, prepared.dataset.n_items) and lp.dtype == torch.float32
    for b in rows:
        ref = _sasrec_log_probs(m.fusion.sasrec, te.histories[b, : int(te.lengths[b])])
        torch.testing.assert_close(lp[b], ref, rtol=1e-4, atol=1e-4)


def test_fused_scores_are_the_formula_on_every_scoring_path(llm_dir):
    """score = log_softmax(head) + w * log_softmax(SASRec): eagerly, with the prefix cache, packed and
    through the static scorer; weight 0 leaves the head's scores untouched."""
    from speeder_fast.model.static import StaticScorer

    prepared, builder, m = _model(llm_dir, weight=0.7)
    te = prepared.test
    ev = builder.build(te.histories[:6], te.lengths[:6], None, None, with_answer=False)
    with torch.no_grad():
        m.prefix_cache = False
        fused = m.score(ev)
        m.fusion.set_weight(0.0)
        head = m.score(ev)
        m.fusion.set_weight(0.7)
        m.prefix_cache = True
        cached = m.score(ev)
        static = StaticScorer(m, batch_size=4, length_multiple=16, compile="static")(ev)
        m.packing = True
        packed = m.score(ev)
        m.packing = False
    ref = torch.stack([torch.log_softmax(head[b], -1) + 0.7 * _sasrec_log_probs(m.fusion.sasrec, te.histories[b, : int(te.lengths[b])])
                       for b in range(6)])
    torch.testing.assert_close(fused, ref, rtol=1e-4, atol=1e-4)
    for other in (cached, static, packed):
        torch.testing.assert_close(other, fused, rtol=1e-4, atol=1e-4)
    m.fusion = None
    with torch.no_grad():
        torch.testing.assert_close(m.score(ev), head)  # weight 0 = no fusion at all
    assert not torch.equal(fused.argsort(1, descending=True)[:, :5], head.argsort(1, descending=True)[:, :5])


def test_fuse_scores_and_weights_are_checked():
    h = torch.randn(3, 9, dtype=torch.bfloat16)
    lp = torch.log_softmax(torch.randn(3, 9), -1)
    torch.testing.assert_close(fuse_scores(h, lp, 0.0), torch.log_softmax(h.float(), -1))
    torch.testing.assert_close(fuse_scores(h, lp, 2.0), torch.log_softmax(h.float(), -1) + 2 * lp)
    with pytest.raises(ValueError, match=">= 0"):
        SasrecFusion(_sasrec(9), -0.5)
    with pytest.raises(ValueError, match=">= 0"):
        SasrecFusion(_sasrec(9), float("nan"))
    fu = SasrecFusion(_sasrec(9), 1.0)
    fu.train()
    assert not fu.sasrec.training and not any(p.requires_grad for p in fu.parameters())


def test_tuned_weight_is_the_grid_weight_with_the_best_validation_ndcg(llm_dir):
    """The tuning table equals evaluate_split of the fused model at each weight (brute force), and the
    pick is the best full NDCG@10 on validation, ties to the smaller weight."""
    from speeder_fast.evaluate import evaluate_split
    from speeder_fast.training.fusion import tune_fusion_weight

    prepared, builder, m = _model(llm_dir, weight=0.3)
    grid = (0.0, 0.5, 2.0, 50.0)
    info = tune_fusion_weight(m, builder, prepared, "valid", 0, 8, "cpu", grid=grid, progress=False)
    assert m.fusion.weight == 0.3  # restored
    assert [row["weight"] for row in info["grid"]] == list(grid) and info["n"] == len(prepared.valid)
    for row in info["grid"]:
        m.fusion.set_weight(row["weight"])
        ref = evaluate_split(m, builder, prepared, "valid", "item", 0, 8, progress=False)
        for key in ("HR@1", "NDCG@10", "full_HR@10", "full_NDCG@10"):
            assert row[key] == pytest.approx(ref[key], abs=1e-9), (row["weight"], key)
    best = max(r["full_NDCG@10"] for r in info["grid"])
    assert info["weight"] == min(r["weight"] for r in info["grid"] if r["full_NDCG@10"] == best)
    with pytest.raises(ValueError, match="grid"):
        tune_fusion_weight(m, builder, prepared, grid=(), progress=False)
    m.fusion = None
    with pytest.raises(ValueError, match="fusion"):
        tune_fusion_weight(m, builder, prepared, progress=False)
    assert FUSION_GRID[0] == 0.0  # auto can always fall back to the head alone


def test_fusion_config_is_checked():
    with pytest.raises(ConfigError, match="sasrec_fusion"):
        load_config(None, ["model.sasrec_fusion=auto", 'features.modalities=["text"]'])
    with pytest.raises(ConfigError, match="sasrec_fusion"):
        load_config(None, ["model.sasrec_fusion=auto", "prompt.answer_mode=score"])
    with pytest.raises(ConfigError, match="model.sasrec_fusion"):
        load_config(None, ["model.sasrec_fusion=sometimes"])
    with pytest.raises(ConfigError, match="sasrec_fusion_weight"):
        load_config(None, ["model.sasrec_fusion=fixed", "model.sasrec_fusion_weight=-1"])
    assert load_config(None, ["model.sasrec_fusion=auto"]).model.sasrec_fusion == "auto"
    assert load_config(None, []).model.sasrec_fusion == "off"


def test_fusion_run_tunes_on_validation_writes_the_weight_and_reloads(llm_dir, tmp_path, monkeypatch, capsys):
    """The train CLI picks the weight after training (RUN/sasrec_fusion.json, the same pick as
    tune_fusion_weight), reports the fused row; load_run and evaluate read the weight back and score
    the same; --sasrec-fusion overrides it into a report of its own; a bad value or a missing file fails
    with one error line."""
    from test_resume import tiny_config, write_atomic_dataset

    from speeder_fast.config import StageConfig, to_toml
    from speeder_fast.evaluate import evaluate_run, evaluate_split
    from speeder_fast.evaluate import main as evaluate_main
    from speeder_fast.train import main
    from speeder_fast.training.fusion import FUSION_FILE, attach_fusion
    from speeder_fast.training.run import load_run

    monkeypatch.setenv("SPEEDER_CACHE", str(tmp_path / "cache"))
    torch.set_num_threads(1)
    data = write_atomic_dataset(tmp_path / "data")
    cfg = tiny_config(llm_dir, data, tmp_path / "out", "fu")
    cfg.prompt.answer_mode = "item"
    cfg.model.sasrec_fusion = "auto"
    cfg.train.stages = [StageConfig(modalities=["text", "collab"], max_steps=4, lr=3e-3)]
    cfg.eval.max_examples = 0
    (tmp_path / "c.toml").write_text(to_toml(cfg))
    assert main(["--config", str(tmp_path / "c.toml"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "SASRec fusion: weight" in out
    run = tmp_path / "out" / "fu"
    info = json.loads((run / FUSION_FILE).read_text())
    assert info["split"] == "valid" and info["weight"] in FUSION_GRID and len(info["grid"]) == len(FUSION_GRID)
    own = json.loads((run / "eval_test_item.json").read_text())["result"]
    if info["weight"] > 0:
        assert own["sasrec_fusion_weight"] == info["weight"] and "SASRec fusion" in out
    comp = load_run(run, checkpoint="best" if (run / "checkpoints" / "best").is_dir() else "final")
    assert comp.model.fusion is not None and comp.model.fusion.weight == info["weight"]
    again = attach_fusion(comp, run, tune=True, write=False, progress=False)  # the same pick, recomputed
    assert again["weight"] == info["weight"]
    r = evaluate_split(comp.model, comp.builder, comp.prepared, "test", "item", 0, 8, progress=False)
    assert r["full_NDCG@10"] == pytest.approx(own["full_NDCG@10"], abs=1e-6)
    from speeder_fast.recommend import recommend

    users = [(None, comp.prepared.dataset.user_ids[u], u) for u in range(6)]
    comp.model.fusion.set_weight(1.0)  # recommend ranks by the fused scores (log-probabilities: all < 0)
    fused = [r["recommendations"] for r in recommend(comp, users, 3, compile_mode="off")]
    assert all(rec["score"] < 0 for recs in fused for rec in recs)
    kept, comp.model.fusion = comp.model.fusion, None
    plain = [r["recommendations"] for r in recommend(comp, users, 3, compile_mode="off")]
    assert [[x["score"] for x in r] for r in plain] != [[x["score"] for x in r] for r in fused]
    comp.model.fusion = kept
    comp.model.fusion.set_weight(info["weight"])
    res, _, _ = evaluate_run(run, progress=False)
    assert res["full_NDCG@10"] == pytest.approx(own["full_NDCG@10"], abs=1e-6) and res["report"] == "eval_test_item"
    off, _, _ = evaluate_run(run, progress=False, sasrec_fusion="off")
    assert "sasrec_fusion_weight" not in off and off["report"].endswith("_fusion-off")
    w3, _, _ = evaluate_run(run, progress=False, sasrec_fusion="3")
    assert w3["sasrec_fusion_weight"] == 3.0 and (run / f"{w3['report']}.json").is_file()
    assert json.loads((run / FUSION_FILE).read_text()) == info  # overrides never rewrite the run's weight
    capsys.readouterr()
    assert evaluate_main(["--run", str(run), "--sasrec-fusion", "2"]) == 0
    assert "SASRec fusion: weight 2 (fixed)" in capsys.readouterr().out  # the CLI says what it scored
    assert evaluate_main(["--run", str(run), "--sasrec-fusion", "-1"]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "--sasrec-fusion" in err and "Traceback" not in err
    from speeder_fast.recommend import main as recommend_main

    recs = tmp_path / "recs.jsonl"
    assert recommend_main(["--run", str(run), "--users", "all", "--top-k", "2", "--sasrec-fusion", "1",
                           "--out", str(recs)]) == 0
    got = [json.loads(ln) for ln in recs.read_text().splitlines()]
    assert len(got) == comp.prepared.dataset.n_users and all(r["recommendations"][0]["score"] < 0 for r in got)
    assert recommend_main(["--run", str(run), "--users", "all", "--sasrec-fusion", "often"]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "--sasrec-fusion" in err and "Traceback" not in err
    (run / FUSION_FILE).unlink()
    with pytest.raises(FileNotFoundError, match=FUSION_FILE):
        load_run(run)
    assert evaluate_main(["--run", str(run)]) == 2
    assert FUSION_FILE in capsys.readouterr().err


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_fused_scores_equal_the_cpu_model(llm_dir):
    """On CUDA the fused scores equal the CPU model's: eagerly and through the static scorer (static
    shapes, not compiled: the CUDA-graph replay of the same history rebuild and SASRec forward is
    covered by the user-state GPU test, which keeps this step's compile time down)."""
    from speeder_fast.model.static import StaticScorer

    prepared, builder, m = _model(llm_dir)
    te = prepared.test
    ev = builder.build(te.histories[:8], te.lengths[:8], None, None, with_answer=False)
    with torch.no_grad():
        ref = m.score(ev)
        g = m.to("cuda")
        evc = ev.to("cuda")
        got = g.score(evc).cpu()
        static = StaticScorer(g, batch_size=8, length_multiple=32, compile="static",
                              pad_id=builder.pad_id)(evc).cpu()
    for other in (got, static):
        torch.testing.assert_close(other, ref, rtol=2e-3, atol=2e-3)


def test_fusion_of_a_label_run_or_a_bad_value_is_a_usage_error(tmp_path):
    from types import SimpleNamespace

    from speeder_fast.errors import UsageError
    from speeder_fast.training.fusion import attach_fusion, parse_fusion_spec

    assert parse_fusion_spec("off") is None and parse_fusion_spec("auto") is None and parse_fusion_spec("0.5") == 0.5
    for bad in ("-1", "nan", "sometimes", ""):
        with pytest.raises(UsageError, match="--sasrec-fusion"):
            parse_fusion_spec(bad)
    label_run = SimpleNamespace(cfg=load_config(None, ["prompt.answer_mode=score"]), device="cpu",
                                model=SimpleNamespace(item_head=None, mome=None, fusion=None))
    assert attach_fusion(label_run, tmp_path, spec="off") is None
    with pytest.raises(UsageError, match="item-mode"):
        attach_fusion(label_run, tmp_path, spec="1")
