"""A tiny synthetic :class:`PreparedData` with learnable sequential structure (tests, smoke runs).

Each user walks a random "chain": the next item is ``(prev + step) % n_items`` with probability
``1 - noise`` (``step`` is drawn per user from a few values), else a uniformly random item. A
sequence model can learn it quickly; a popularity model cannot. Splits follow the data contract
(leave-one-out: valid target = second to last, test target = last; candidates contain the target
once plus never-interacted items).
"""

from __future__ import annotations

import numpy as np

from ..data.dataset import PreparedData, RecDataset, SplitArrays


def _windows(seqs: list[np.ndarray], users: np.ndarray, cut: int, h: int) -> SplitArrays:
    """History = ``seq[:len-cut][-h:]`` -> target ``seq[len-cut]`` for each user in ``users``."""
    n = len(users)
    hist = np.full((n, h), -1, dtype=np.int64)
    lens = np.zeros(n, dtype=np.int64)
    tgts = np.zeros(n, dtype=np.int64)
    for i, u in enumerate(users):
        s = seqs[u]
        prefix = s[: len(s) - cut][-h:]
        hist[i, : len(prefix)] = prefix
        lens[i] = len(prefix)
        tgts[i] = s[len(s) - cut]
    return SplitArrays(users.astype(np.int64), hist, lens, tgts)


def _train_windows(seqs: list[np.ndarray], h: int) -> SplitArrays:
    users, hists, lens, tgts = [], [], [], []
    for u, s in enumerate(seqs):
        prefix = s[:-2]
        for t in range(1, len(prefix)):
            w = prefix[max(0, t - h): t]
            row = np.full(h, -1, dtype=np.int64)
            row[: len(w)] = w
            users.append(u)
            hists.append(row)
            lens.append(len(w))
            tgts.append(prefix[t])
    if not users:
        return SplitArrays(np.zeros(0, np.int64), np.zeros((0, h), np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64))
    return SplitArrays(np.asarray(users, np.int64), np.stack(hists), np.asarray(lens, np.int64), np.asarray(tgts, np.int64))


def _candidates(seqs: list[np.ndarray], split: SplitArrays, n_items: int, n_cand: int,
                rng: np.random.Generator) -> np.ndarray:
    out = np.zeros((len(split), n_cand), dtype=np.int64)
    for i, (u, t) in enumerate(zip(split.users, split.targets)):
        seen = set(seqs[u].tolist())
        pool = np.asarray([j for j in range(n_items) if j not in seen], dtype=np.int64)
        neg = rng.choice(pool, size=n_cand - 1, replace=len(pool) < n_cand - 1)
        row = np.concatenate([[t], neg])
        rng.shuffle(row)
        out[i] = row
    return out


def toy_prepared(n_users: int = 64, n_items: int = 40, min_len: int = 6, max_len: int = 14,
                 noise: float = 0.1, n_candidates: int = 10, max_history: int = 10, seed: int = 0,
                 with_text: bool = True) -> PreparedData:
    """Build a synthetic :class:`PreparedData` (deterministic for a given ``seed``)."""
    rng = np.random.default_rng(seed)
    seqs: list[np.ndarray] = []
    for _ in range(n_users):
        length = int(rng.integers(min_len, max_len + 1))
        step = int(rng.choice([1, 2, 3]))
        cur = int(rng.integers(n_items))
        s = [cur]
        for _ in range(length - 1):
            cur = int(rng.integers(n_items)) if rng.random() < noise else (cur + step) % n_items
            s.append(cur)
        seqs.append(np.asarray(s, dtype=np.int64))
    item_text: dict[str, list[str]] = {}
    if with_text:
        item_text = {
            "title": [f"item {i}" if i % 7 else "" for i in range(n_items)],
            "description": [f"a thing number {i} of colour {['red', 'green', 'blue'][i % 3]}" if i % 7 else ""
                            for i in range(n_items)],
            "brand": [f"brand{i % 4}" if i % 7 else "" for i in range(n_items)],
            "categories": [f"cat{i % 5}, sub{i % 2}" if i % 7 else "" for i in range(n_items)],
        }
    ds = RecDataset(name=f"toy-{seed}", user_ids=[f"u{u}" for u in range(n_users)],
                    item_ids=[f"i{i}" for i in range(n_items)], sequences=seqs, item_text=item_text,
                    source="toy")
    users = np.arange(n_users, dtype=np.int64)
    valid = _windows(seqs, users, 2, max_history)
    test = _windows(seqs, users, 1, max_history)
    n_cand = min(n_candidates, n_items - max_len)
    return PreparedData(dataset=ds, train=_train_windows(seqs, max_history), valid=valid, test=test,
                        valid_candidates=_candidates(seqs, valid, n_items, n_cand, rng),
                        test_candidates=_candidates(seqs, test, n_items, n_cand, rng))
