"""SASRec: shapes, causality, training, evaluation conventions, checkpoints, CLI."""

import json

import numpy as np
import pytest
import torch

from speeder_fast.features.sasrec import (
    SASRec,
    SASRecConfig,
    _eval_set,
    evaluate,
    length_bucketed_batches,
    load_sasrec,
    sasrec_item_embeddings,
    save_sasrec,
    train_sasrec,
    trained_item_mask,
)
from speeder_fast.features.toy import toy_prepared


def _model(n_items=30, **kw):
    torch.manual_seed(0)
    return SASRec(n_items, dim=16, n_layers=2, n_heads=2, max_len=12, dropout=0.3, **kw).eval()


def test_forward_shapes_and_scores():
    m = _model()
    seq = torch.tensor([[0, 0, 3, 4, 5], [1, 2, 3, 4, 5]])
    h = m(seq)
    assert h.shape == (2, 5, 16)
    assert torch.isfinite(h).all()
    assert m.score_all(h[:, -1]).shape == (2, 30)
    assert m.item_table().shape == (30, 16)


def test_causality_future_items_do_not_change_past_outputs():
    m = _model()
    a = torch.tensor([[0, 0, 7, 8, 9, 10, 11, 12]])
    b = a.clone()
    b[0, 5:] = torch.tensor([1, 2, 3])  # change only the last three (future) items
    ha, hb = m(a), m(b)
    assert torch.allclose(ha[0, :5], hb[0, :5], atol=1e-6)
    assert not torch.allclose(ha[0, 5:], hb[0, 5:], atol=1e-4)  # the change is visible later on


def test_prefix_and_padding_invariance():
    m = _model()
    full = torch.tensor([[5, 6, 7, 8, 9]])
    prefix = torch.tensor([[0, 0, 0, 0, 5, 6, 7]])  # same first 3 items, more left padding
    h_full, h_pre = m(full), m(prefix)
    # positions count from the oldest item, so a prefix is encoded the same wherever it sits
    assert torch.allclose(h_full[0, :3], h_pre[0, -3:], atol=1e-5)


def test_padding_row_is_zero_and_no_nan_for_all_pad_rows():
    m = _model()
    h = m(torch.zeros(2, 6, dtype=torch.long))
    assert torch.isfinite(h).all()
    assert torch.count_nonzero(m.item_emb.weight[0]) == 0


def test_length_bucketed_batches_cover_every_sequence_once():
    rng = np.random.default_rng(0)
    lens = rng.integers(1, 50, size=1000)
    batches = length_bucketed_batches(lens, 64, rng, pool_batches=4)
    flat = np.concatenate(batches)
    assert sorted(flat.tolist()) == list(range(1000))
    assert max(len(b) for b in batches) == 64
    # batches are length-homogeneous compared with random ones
    spread = np.mean([lens[b].max() - lens[b].min() for b in batches])
    assert spread < 25


@pytest.mark.parametrize("loss", ["ce", "bce"])
def test_tiny_training_decreases_loss_and_learns(loss):
    p = toy_prepared(n_users=120, n_items=40, seed=3)
    model, m = train_sasrec(p, SASRecConfig(dim=32, max_len=20, epochs=12, batch_size=32, dropout=0.1,
                                            patience=0, loss=loss, seed=1), progress=False)
    losses = [h["loss"] for h in m["history"]]
    assert losses[-1] < 0.8 * losses[0]
    assert m["epochs_run"] == 12 and 1 <= m["best_epoch"] <= 12
    # random full ranking over 40 items: HR@10 ~ 0.25; the chain structure is learnable
    assert m["test_full"]["HR@10"] > 0.5
    assert m["test_candidates"]["n"] == len(p.test)
    for key in ("valid_full", "test_full", "test_full_with_history", "test_candidates", "valid_candidates"):
        assert 0.0 <= m[key]["HR@1"] <= 1.0


def test_training_is_deterministic():
    p = toy_prepared(n_users=40, n_items=25, seed=5)
    cfg = SASRecConfig(dim=16, max_len=10, epochs=2, batch_size=16, patience=0, seed=7)
    m1, r1 = train_sasrec(p, cfg, progress=False)
    m2, r2 = train_sasrec(p, cfg, progress=False)
    assert torch.equal(m1.item_emb.weight, m2.item_emb.weight)
    assert r1["test_full"] == r2["test_full"]


def test_early_stopping_restores_best():
    p = toy_prepared(n_users=60, n_items=30, seed=2)
    model, m = train_sasrec(p, epochs=40, patience=2, dim=16, batch_size=16, lr=3e-2, progress=False)
    assert m["epochs_run"] < 40 or m["best_epoch"] == 40
    best = max(h["valid_NDCG@10"] for h in m["history"])
    assert m["valid_full"]["NDCG@10"] == pytest.approx(best, abs=1e-9)


def test_full_ranking_excludes_history_but_not_target():
    p = toy_prepared(n_users=30, n_items=20, seed=4)
    m = SASRec(20, dim=8, n_layers=1, n_heads=1, max_len=10, dropout=0.0).eval()
    es = _eval_set(p, "test", 10)
    # make history items score highest: items embedding = one shared direction, and target lowest
    with torch.no_grad():
        m.item_emb.weight.zero_()
    res_plain = evaluate(m, es, torch.device("cpu"), exclude_history=False)
    res_excl = evaluate(m, es, torch.device("cpu"), exclude_history=True)
    # all scores tie at 0 -> pessimistic: without exclusion rank = 19; with it = 19 - |history \ {target}|
    assert res_plain["full"]["HR@10"] == 0.0
    seqs = p.dataset.sequences
    n_hist = np.asarray([len(set(seqs[u][:-1].tolist()) - {seqs[u][-1]}) for u in p.test.users])
    want = float(np.mean(19 - n_hist < 10))
    assert res_excl["full"]["HR@10"] == pytest.approx(want)


def test_contract_violation_is_reported():
    p = toy_prepared(n_users=10, n_items=20, seed=0)
    p.test.targets[3] = (p.test.targets[3] + 1) % 20
    with pytest.raises(ValueError, match="disagree"):
        train_sasrec(p, epochs=1, progress=False)


def test_item_embeddings_mask_and_checkpoint_roundtrip(tmp_path):
    p = toy_prepared(n_users=20, n_items=60, seed=1)  # 60 items: several never in a training prefix
    model, _ = train_sasrec(p, epochs=1, dim=16, max_len=10, progress=False)
    feats, mask = sasrec_item_embeddings(model, p)
    assert feats.shape == (60, 16) and mask.dtype == torch.bool
    assert torch.equal(mask, trained_item_mask(p, 10))
    assert 0 < int(mask.sum()) < 60
    assert torch.count_nonzero(feats[~mask]) == 0
    save_sasrec(model, tmp_path / "m.safetensors")
    back = load_sasrec(tmp_path / "m.safetensors")
    x = torch.tensor([[0, 3, 4, 5]])
    assert torch.allclose(model.eval()(x), back(x))


def _write_atomic(folder, n_users=40, n_items=30, seed=0):
    rng = np.random.default_rng(seed)
    folder.mkdir()
    lines = ["user_id:token\titem_id:token\ttimestamp:float"]
    for u in range(n_users):
        cur, step = int(rng.integers(n_items)), int(rng.integers(1, 3))
        for t in range(int(rng.integers(6, 12))):
            lines.append(f"u{u}\ti{cur}\t{t}")
            cur = (cur + step) % n_items
    (folder / f"{folder.name}.inter").write_text("\n".join(lines) + "\n")


def test_cli_end_to_end(tmp_path, capsys):
    pytest.importorskip("speeder_fast.data.prepare")
    from speeder_fast.sasrec import main

    _write_atomic(tmp_path / "toyset")
    out = tmp_path / "out"
    rc = main(["--data", str(tmp_path / "toyset"), "--out", str(out), "--epochs", "2", "--dim", "16",
               "--user-kcore", "0", "--item-kcore", "0", "--n-candidates", "5", "--cache-dir", str(tmp_path / "c"),
               "--batch-size", "16", "--no-progress", "--device", "cpu"])
    assert rc == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["epochs_run"] == 2 and "test_candidates" in metrics
    emb = load_sasrec(out / "sasrec.safetensors")
    assert emb.dim == 16
    from safetensors.torch import load_file

    t = load_file(str(out / "item_embeddings.safetensors"))
    assert t["features"].shape == (emb.n_items, 16) and t["mask"].dtype == torch.bool
    assert "test_full" in capsys.readouterr().out


def test_cli_help_documents_every_flag(capsys):
    from speeder_fast.sasrec import build_parser

    p = build_parser()
    for action in p._actions:
        if action.option_strings and action.dest != "help":
            assert action.help, f"{action.option_strings} has no help"
