"""benchmarks/sasrec_leakage_check.py: its metric equals SASRec's own full ranking; the refit."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import sasrec_leakage_check as slc  # noqa: E402

from speeder_fast.features.sasrec import train_sasrec  # noqa: E402
from speeder_fast.features.toy import toy_prepared  # noqa: E402


@pytest.fixture(scope="module")
def trained():
    torch.set_num_threads(1)
    prepared = toy_prepared(n_users=40, n_items=30, n_candidates=10, max_history=5, seed=2)
    model, metrics = train_sasrec(prepared, epochs=3, dim=16, patience=0, progress=False)
    return prepared, model.eval(), metrics


def test_next_item_metrics_equal_sasrecs_own_full_ranking(trained):
    """At the valid and test positions, with SASRec's window, the script's NDCG@10 / HR@10 are the
    numbers train_sasrec reports (history excluded, pessimistic ties)."""
    prepared, model, metrics = trained
    seqs = prepared.dataset.sequences
    got = slc.positions_metrics(model, seqs, list(range(len(seqs))), model.max_len)
    for split in ("valid", "test"):
        assert got[split]["NDCG@10"] == pytest.approx(metrics[f"{split}_full"]["NDCG@10"], abs=1e-6)
        assert got[split]["HR@10"] == pytest.approx(metrics[f"{split}_full"]["HR@10"], abs=1e-6)
    assert got["train_last"]["n"] == sum(len(s) > 3 for s in seqs)


def test_refit_keeps_the_item_table_and_trains_the_rest(trained):
    prepared, model, _ = trained
    seqs = prepared.dataset.sequences
    refit = slc.refit_transformer(model, seqs, list(range(0, len(seqs), 2)), epochs=2, seed=0)
    assert torch.equal(refit.item_emb.weight, model.item_emb.weight)
    assert not refit.item_emb.weight.requires_grad and not refit.training
    assert not torch.allclose(refit.blocks[0].qkv.weight, model.blocks[0].qkv.weight)
