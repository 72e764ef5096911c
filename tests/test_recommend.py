"""speeder_fast.recommend on a tiny trained run (random Llama, CPU)."""

import json

import pytest
import torch

import tiny
from speeder_fast.config import StageConfig


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(run_dir, prepared, components) of a 2-step speeder run with the text modality only."""
    from speeder_fast.training import train

    root = tmp_path_factory.mktemp("rec")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SPEEDER_CACHE", str(root / "cache"))
        llm_dir = tiny.make_llm_dir(root / "llm")
        prepared = tiny.make_prepared(n_candidates=8, max_history=5)
        cfg = tiny.train_config(llm_dir, root / "runs", "rec")
        cfg.features.modalities = ["text"]
        cfg.train.eval_every = 0
        cfg.train.checkpoint_every = 0
        cfg.train.stages = [StageConfig(modalities=["text"], max_steps=2, lr=3e-3)]
        cfg.eval.max_examples = 8
        cfg.eval.batch_size = 8
        res = train(cfg, progress=False, prepared=prepared)
        yield res.run_dir, prepared


@pytest.fixture(scope="module")
def comp(run):
    from speeder_fast.training.run import load_run

    return load_run(run[0], prepared=run[1])


@pytest.fixture
def cli(run, monkeypatch):
    """recommend.main with load_run bound to the in-memory tiny dataset (no prepare from disk)."""
    import speeder_fast.training.run as run_mod
    from speeder_fast import recommend

    orig = run_mod.load_run
    monkeypatch.setattr(run_mod, "load_run", lambda *a, **k: orig(*a, prepared=run[1], **k))
    return recommend.main


def _users(comp, n):
    ds = comp.prepared.dataset
    rows = comp.prepared.test.users[:n]
    return [(i + 1, ds.user_ids[int(u)], int(u)) for i, u in enumerate(rows)]


@pytest.mark.parametrize("compile_mode", ["off", "static"])
def test_persisted_candidates_match_evaluation(comp, compile_mode):
    from speeder_fast.recommend import recommend

    users = _users(comp, 10)
    recs = list(recommend(comp, users, top_k=3, batch_size=4, progress=False, compile_mode=compile_mode))
    assert [r["user"] for r in recs] == [u for _, u, _ in users]
    te, cands = comp.prepared.test, comp.prepared.test_candidates
    b = comp.builder.build(te.histories[:10], te.lengths[:10], cands[:10], te.targets[:10], with_answer=False)
    with torch.no_grad():
        scores = comp.model.score(b)
    ds = comp.prepared.dataset
    for i, r in enumerate(recs):
        items = [x["item"] for x in r["recommendations"]]
        want = [ds.item_ids[int(cands[i, j])] for j in scores[i].topk(3).indices.tolist()]
        assert items == want  # same ranking as evaluate's score mode
        s = [x["score"] for x in r["recommendations"]]
        assert s == sorted(s, reverse=True) and [x["rank"] for x in r["recommendations"]] == [1, 2, 3]
        assert all(x["title"] == comp.builder.titles[ds.item_ids.index(x["item"])] for x in r["recommendations"])
        assert 0 < sum(x["prob"] for x in r["recommendations"]) <= 1.0 + 1e-5
        L = int(te.lengths[i])
        assert [x["item"] for x in r["history"]] == [ds.item_ids[int(h)] for h in te.histories[i, :L]]
        assert [x["title"] for x in r["history"]] == [ds.item_text["title"][int(h)] for h in te.histories[i, :L]]


def test_all_unseen_candidates(comp):
    from speeder_fast.recommend import recommend

    users = _users(comp, 4)
    a = list(recommend(comp, users, top_k=8, candidates="all-unseen", n_unseen=8, seed=3, progress=False))
    b = list(recommend(comp, users, top_k=8, candidates="all-unseen", n_unseen=8, seed=3, progress=False))
    c = list(recommend(comp, users, top_k=8, candidates="all-unseen", n_unseen=8, seed=4, progress=False))
    assert a == b and a != c
    ds = comp.prepared.dataset
    for r, (_, _, u) in zip(a, users):
        seen = {ds.item_ids[int(i)] for i in ds.sequences[u]}
        got = [x["item"] for x in r["recommendations"]]
        assert len(set(got)) == 8 and not (set(got) & seen)
        assert [x["item"] for x in r["history"]] == [ds.item_ids[int(i)] for i in ds.sequences[u][-5:]]  # full history, newest 5
    with pytest.raises(ValueError, match="n_candidates"):
        list(recommend(comp, users, candidates="all-unseen", n_unseen=5, progress=False))
    with pytest.raises(ValueError, match="top-k"):
        list(recommend(comp, users, top_k=9, progress=False))


def test_cli_writes_jsonl(cli, comp, run, tmp_path):
    ds = comp.prepared.dataset
    ids = [ds.user_ids[int(u)] for u in comp.prepared.test.users[:3]]
    users = tmp_path / "users.txt"
    users.write_text(f"# header\n{ids[0]}\n\n{ids[1]}\n{ids[2]}\n")
    out = tmp_path / "recs.jsonl"
    assert cli(["--run", str(run[0]), "--users", str(users), "--top-k", "2", "--out", str(out), "--batch-size", "2"]) == 0
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["user"] for r in recs] == ids and [r["line"] for r in recs] == [2, 4, 5]
    assert all(len(r["recommendations"]) == 2 for r in recs)
    # 'all' = every user with a test example
    out2 = tmp_path / "all.jsonl"
    assert cli(["--run", str(run[0]), "--users", "all", "--out", str(out2)]) == 0
    assert len(out2.read_text().splitlines()) == len(comp.prepared.test)


def test_cli_errors_name_the_line(cli, run, tmp_path, capsys):
    users = tmp_path / "users.txt"
    users.write_text("u0\nu1\nnobody\n")
    out = tmp_path / "recs.jsonl"
    assert cli(["--run", str(run[0]), "--users", str(users), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"{users}:3" in err and "nobody" in err
    assert not out.exists()  # nothing written half
    assert cli(["--run", str(run[0]), "--users", str(users), "--candidates", "all-unseen", "x"]) == 2
    assert cli(["--run", str(tmp_path / "missing"), "--users", str(users)]) == 2


def test_cli_logs_the_packing_line_once(cli, run, tmp_path, caplog):
    """load_run applies train.packing (one `packing:` line); the CLI does not apply it a second time."""
    import logging

    lg = logging.getLogger("speeder_fast")
    lg.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.INFO, logger="speeder_fast"):
            assert cli(["--run", str(run[0]), "--users", "all", "--out", str(tmp_path / "r.jsonl")]) == 0
    finally:
        lg.removeHandler(caplog.handler)
    assert sum(r.getMessage().startswith("packing:") for r in caplog.records) == 1, caplog.text
