"""Ranking metrics vs hand-computed values."""

import math

import numpy as np
import pytest
import torch

from speeder_fast.metrics import hit_rate, mrr, ndcg, rank_of_target, ranking_metrics


def test_rank_of_target_hand_cases():
    scores = torch.tensor([
        [0.9, 0.1, 0.5, 0.3],  # target col 0 is best -> 0
        [0.9, 0.1, 0.5, 0.3],  # target col 3 (0.3): beaten by 0.9, 0.5 -> 2
        [0.2, 0.2, 0.2, 0.2],  # all tied: pessimistic -> 3
        [0.1, 0.7, 0.7, 0.0],  # target col 1 tied with col 2 -> 1
        [float("-inf"), 0.0, float("-inf"), -1.0],  # excluded items never beat a finite target -> 0
    ])
    tgt = torch.tensor([0, 3, 2, 1, 3])
    assert rank_of_target(scores, tgt).tolist() == [0, 2, 3, 1, 1]


def test_rank_of_target_nan_and_numpy():
    scores = np.array([[np.nan, 1.0, 2.0], [3.0, np.nan, 1.0]])
    r = rank_of_target(scores, np.array([0, 2]))
    # NaN target -> worst (C-1); a NaN competitor does not beat the target
    assert r.tolist() == [2, 1]


def test_rank_of_target_validates():
    with pytest.raises(ValueError, match="2-D"):
        rank_of_target(torch.zeros(3), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="out of range"):
        rank_of_target(torch.zeros(2, 3), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match=r"\[n=2\]"):
        rank_of_target(torch.zeros(2, 3), torch.tensor([0]))


def test_hit_rate_and_ndcg_hand_computed():
    ranks = [0, 1, 4, 9, 10, 30]
    assert hit_rate(ranks, 1) == pytest.approx(1 / 6)
    assert hit_rate(ranks, 5) == pytest.approx(3 / 6)
    assert hit_rate(ranks, 10) == pytest.approx(4 / 6)
    assert hit_rate(ranks, 20) == pytest.approx(5 / 6)
    # NDCG@5: ranks 0,1,4 -> 1, 1/log2(3), 1/log2(6)
    want5 = (1 + 1 / math.log2(3) + 1 / math.log2(6)) / 6
    assert ndcg(ranks, 5) == pytest.approx(want5)
    want10 = (1 + 1 / math.log2(3) + 1 / math.log2(6) + 1 / math.log2(11)) / 6
    assert ndcg(ranks, 10) == pytest.approx(want10)
    assert ndcg([0, 0], 1) == pytest.approx(1.0)
    assert ndcg([1], 1) == 0.0
    assert mrr([0, 1, 3]) == pytest.approx((1 + 1 / 2 + 1 / 4) / 3)
    assert mrr([0, 1, 3], k=2) == pytest.approx((1 + 1 / 2) / 3)


def test_ranking_metrics_dict_and_errors():
    m = ranking_metrics(torch.tensor([0, 2, 7]), hr_ks=(1, 5), ndcg_ks=(5,))
    assert set(m) == {"HR@1", "HR@5", "NDCG@5", "MRR", "n"}
    assert m["n"] == 3 and m["HR@1"] == pytest.approx(1 / 3) and m["HR@5"] == pytest.approx(2 / 3)
    assert m["NDCG@5"] == pytest.approx((1 + 1 / math.log2(4)) / 3)
    with pytest.raises(ValueError, match="empty"):
        hit_rate([], 1)
    with pytest.raises(ValueError, match=">= 0"):
        ndcg([-1], 5)
    with pytest.raises(ValueError, match="k must be"):
        hit_rate([0], 0)


def test_candidate_style_use():
    # LLM-evaluation style: [n, C] candidate scores and the target's column
    scores = torch.tensor([[0.1, 0.8, 0.3], [0.5, 0.2, 0.9]])
    ranks = rank_of_target(scores, torch.tensor([1, 0]))
    assert ranks.tolist() == [0, 1]
    assert hit_rate(ranks, 1) == 0.5


def test_popularity_reference_hand_computed():
    """Popularity counts only the training part (no valid/test target leaks) and ranks the persisted
    candidates with pessimistic ties."""
    import numpy as np

    from speeder_fast.data.dataset import PreparedData, RecDataset, SplitArrays
    from speeder_fast.evaluate import item_popularity, popularity_reference

    # user 0: train [0, 0, 1], valid 2, test 3; user 1: train [0, 1], valid 3, test 2
    seqs = [np.array([0, 0, 1, 2, 3]), np.array([0, 1, 3, 2])]
    ds = RecDataset(name="hand", user_ids=["a", "b"], item_ids=["0", "1", "2", "3", "4"], sequences=seqs, item_text={})
    pop = item_popularity(PreparedData(ds, None, None, None, None, None))
    assert pop.tolist() == [3, 2, 0, 0, 0]  # items 2 and 3 occur only as valid/test targets

    hist = np.array([[0, 0, 1, 2], [0, 1, 3, -1]])
    test = SplitArrays(np.array([0, 1]), hist, np.array([4, 3]), np.array([3, 2]))
    # user 0: target 3 (count 0) vs 0 (3) and 4 (0): rank 2 (tie with 4 is pessimistic)
    # user 1: target 2 (count 0) vs 1 (2) and 4 (0, tie): rank 2
    test_c = np.array([[3, 0, 4], [1, 2, 4]])
    prepared = PreparedData(ds, None, None, test, None, test_c)
    out = popularity_reference(prepared, "test", 0)
    assert out["n"] == 2 and out["HR@1"] == 0.0 and out["mode"] == "popularity"
    assert out["HR@5"] == 1.0
    assert abs(out["NDCG@5"] - 0.5) < 1e-9  # 1/log2(2+2) = 0.5 for both
