"""benchmarks/text_feature_probe.py: split arrays, exclusion of history items, metrics, the probes."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import text_feature_probe as tfp  # noqa: E402

from speeder_fast.features.toy import toy_prepared  # noqa: E402


@pytest.fixture(scope="module")
def prepared():
    return toy_prepared(n_users=30, n_items=40, n_candidates=10, max_history=5, seed=4)


def test_split_excludes_earlier_items_but_never_the_target(prepared):
    test = tfp.make_split(prepared, "test")
    for r, u in enumerate(prepared.test.users):
        seq = prepared.dataset.sequences[u]
        got = set(test.excl_items[test.excl_rows == r].tolist())
        assert got == set(seq[:-1].tolist()) - {int(seq[-1])}
    valid = tfp.make_split(prepared, "valid")
    u = prepared.valid.users[0]
    assert set(valid.excl_items[valid.excl_rows == 0].tolist()) == set(prepared.dataset.sequences[u][:-2].tolist()) - {
        int(prepared.valid.targets[0])}


def test_evaluate_ranks_after_exclusion_and_on_candidates(prepared):
    test = tfp.make_split(prepared, "test")
    n_items = prepared.dataset.n_items

    seen = [0]  # evaluate() calls the scorer on consecutive row chunks

    def history_first(hist, lens):
        """The user's earlier items score 2, the target 1, everything else 0."""
        b, start = len(hist), seen[0]
        seen[0] += b
        s = torch.zeros(b, n_items)
        s[torch.arange(b), test.targets[start:start + b]] = 1.0
        for r in range(b):
            s[r, test.excl_items[test.excl_rows == start + r]] = 2.0
        return s

    res = tfp.evaluate(history_first, test, chunk=7)
    assert seen[0] == len(test.targets)
    assert res["full"]["HR@1"] == 1.0 and res["cand"]["HR@1"] == 1.0 and res["full"]["n"] == len(test.targets)
    # constant scores: pessimistic ties -> worst ranks
    res = tfp.evaluate(lambda hist, lens: torch.zeros(len(hist), n_items), test)
    assert res["full"]["HR@20"] == 0.0 and res["cand"]["HR@1"] == 0.0


def test_knn_and_trained_probe_find_a_text_signal(prepared):
    # a feature that makes each item's successor its nearest neighbour along the chain
    n = prepared.dataset.n_items
    ang = torch.arange(n, dtype=torch.float32) * 2 * np.pi / n
    x = torch.stack([torch.cos(ang), torch.sin(ang)], 1) * 5 + 1.0  # offset removed by the centring
    mask = torch.ones(n, dtype=torch.bool)
    train, valid, test = (tfp.make_split(prepared, s) for s in ("train", "valid", "test"))
    knn = tfp.knn_metrics(x, mask, test)
    rnd = tfp.knn_metrics(torch.randn(n, 2, generator=torch.Generator().manual_seed(0)), mask, test)
    assert knn["knn"]["full"]["NDCG@10"] > rnd["knn"]["full"]["NDCG@10"]
    torch.set_num_threads(1)
    probe = tfp.train_probe(x, mask, train, valid, test, epochs=3, patience=2, lr=1e-2, batch=64, seed=0)
    assert set(probe) >= {"valid", "test", "epochs", "best_epoch"} and 1 <= probe["best_epoch"] <= 3
    assert probe["test"]["full"]["n"] == len(test.targets)
    again = tfp.train_probe(x, mask, train, valid, test, epochs=3, patience=2, lr=1e-2, batch=64, seed=0)
    assert again["test"] == probe["test"]  # deterministic
