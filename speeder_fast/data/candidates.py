"""Candidate sets: the target plus ``N-1`` sampled negatives, target at a random position.

Negatives are drawn uniformly *without replacement* from the items a user never interacted with:
each row takes the first ``N-1`` distinct admissible items from a stream of i.i.d. uniform draws
(equivalent to sampling without replacement from the admissible set), vectorised over all rows;
rows that run short are re-drawn with a larger batch, and rows whose admissible set is small
fall back to an explicit ``Generator.choice`` over that set. Everything comes from the given
``numpy.random.Generator``, so a seed fixes the result.
"""

from __future__ import annotations

import numpy as np

from speeder_fast.data.dataset import PreparedData
from speeder_fast.errors import CatalogueTooSmallError  # noqa: F401 - re-exported (speeder_fast.data)


def interaction_keys(users: np.ndarray, items: np.ndarray, n_items: int) -> np.ndarray:
    """Sorted unique ``user * n_items + item`` keys (the exclusion sets of all users)."""
    return np.unique(users.astype(np.int64) * n_items + items.astype(np.int64))


def _contains(sorted_keys: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Membership of ``q`` in the sorted array ``sorted_keys`` (binary search, no re-sort)."""
    if sorted_keys.shape[0] == 0:
        return np.zeros(q.shape, dtype=bool)
    idx = np.searchsorted(sorted_keys, q)
    return sorted_keys[np.minimum(idx, sorted_keys.shape[0] - 1)] == q


def _check_catalogue(keys: np.ndarray, n_users: int, n_items: int, k: int, what: str) -> np.ndarray:
    n_seen = np.bincount(keys // n_items, minlength=n_users)
    room = n_items - n_seen
    if room.shape[0] and room.min() < k:
        bad = int(np.argmin(room))
        n_bad = int((room < k).sum())
        fits = int(room.min()) + 1
        fix = (f"set data.n_candidates <= {fits}" if fits >= 2 else
               "no data.n_candidates fits (some user interacted with every item)")
        raise CatalogueTooSmallError(
            f"data.n_candidates={k + 1} needs {k} never-interacted items per user ({what} negatives), but "
            f"{n_bad} of {room.shape[0]} users have fewer (worst: user index {bad} interacted with "
            f"{int(n_seen[bad])} of {n_items} items, leaving {int(room[bad])}); {fix} or use a larger catalogue")
    return room


def sample_negatives(rng: np.random.Generator, row_users: np.ndarray, keys: np.ndarray, n_items: int,
                     k: int, room: np.ndarray | None = None) -> np.ndarray:
    """``[len(row_users), k]`` distinct items per row, none of them in the row user's key set."""
    n = row_users.shape[0]
    out = np.empty((n, k), dtype=np.int64)
    if n == 0 or k == 0:
        return out
    todo = np.arange(n, dtype=np.int64)
    draws = max(2 * k, k + 8)
    for _ in range(6):
        if todo.shape[0] == 0:
            return out
        ru = row_users[todo]
        cand = rng.integers(0, n_items, size=(todo.shape[0], draws), dtype=np.int64)
        ok = ~_contains(keys, ru[:, None] * n_items + cand)
        # first occurrence within a row only (stable sort keeps the leftmost duplicate first)
        order = np.argsort(cand, axis=1, kind="stable")
        srt = np.take_along_axis(cand, order, axis=1)
        dup_sorted = np.zeros_like(srt, dtype=bool)
        dup_sorted[:, 1:] = srt[:, 1:] == srt[:, :-1]
        dup = np.zeros_like(dup_sorted)
        np.put_along_axis(dup, order, dup_sorted, axis=1)
        ok &= ~dup
        enough = ok.sum(axis=1) >= k
        rows = np.flatnonzero(enough)
        if rows.shape[0]:
            sub_ok = ok[rows]
            # column positions of the first k admissible draws of each row
            rank = np.cumsum(sub_ok, axis=1)
            take = sub_ok & (rank <= k)
            vals = cand[rows][take].reshape(rows.shape[0], k)
            out[todo[rows]] = vals
        todo = todo[~enough]
        draws *= 2
    # rare leftovers (admissible set small relative to k): explicit choice per row
    for r in todo.tolist():
        u = int(row_users[r])
        lo, hi = np.searchsorted(keys, [u * n_items, (u + 1) * n_items])
        seen = keys[lo:hi] - u * n_items
        pool = np.setdiff1d(np.arange(n_items, dtype=np.int64), seen, assume_unique=True)
        if pool.shape[0] < k:
            raise CatalogueTooSmallError(f"user index {u}: only {pool.shape[0]} never-interacted items, need {k} "
                                         f"(data.n_candidates - 1)")
        out[r] = rng.choice(pool, size=k, replace=False)
    return out


def insert_targets(rng: np.random.Generator, negatives: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """``[n, k+1]``: each row's negatives with its target inserted at a uniform random position."""
    n, k = negatives.shape
    pos = rng.integers(0, k + 1, size=n)
    cols = np.arange(k + 1)[None, :]
    src = np.clip(np.where(cols < pos[:, None], cols, cols - 1), 0, max(k - 1, 0))
    out = np.take_along_axis(negatives, src, axis=1) if k else np.empty((n, 1), np.int64)
    out = np.where(cols == pos[:, None], targets[:, None], out)
    return out.astype(np.int64)


def eval_candidates(flat: np.ndarray, offsets: np.ndarray, n_items: int, n_candidates: int, seed: int,
                    valid_targets: np.ndarray, test_targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Valid and test candidates (one row per user), excluding every item of the whole sequence.

    One generator seeded by ``seed`` draws valid negatives, valid positions, test negatives,
    test positions, in that order.
    """
    if n_candidates < 2:
        raise ValueError(f"n_candidates must be >= 2, got {n_candidates}")
    n_users = offsets.shape[0] - 1
    users = np.repeat(np.arange(n_users, dtype=np.int64), np.diff(offsets))
    keys = interaction_keys(users, flat, n_items)
    k = n_candidates - 1
    _check_catalogue(keys, n_users, n_items, k, "evaluation")
    rng = np.random.default_rng(seed)
    uid = np.arange(n_users, dtype=np.int64)
    out = []
    for targets in (valid_targets, test_targets):
        neg = sample_negatives(rng, uid, keys, n_items, k)
        out.append(insert_targets(rng, neg, targets))
    return out[0], out[1]


def sample_train_candidates(prepared: PreparedData, epoch: int, n: int, seed: int) -> np.ndarray:
    """``[n_train, n]`` candidates for every training example, drawn for one epoch.

    Row ``i`` holds ``prepared.train.targets[i]`` exactly once (random position) and ``n-1``
    distinct items the user never interacted with in their *training prefix* (the events before
    the validation target), so training never looks at validation/test interactions. The
    generator is ``numpy.random.default_rng([seed, epoch])``: the same (seed, epoch) gives the
    same array, different epochs differ.
    """
    if n < 2:
        raise ValueError(f"n must be >= 2, got {n}")
    ds = prepared.dataset
    lengths = np.fromiter((len(s) for s in ds.sequences), np.int64, ds.n_users)
    pre = np.maximum(lengths - 2, 0)
    users = np.repeat(np.arange(ds.n_users, dtype=np.int64), pre)
    items = (np.concatenate([s[: max(len(s) - 2, 0)] for s in ds.sequences]).astype(np.int64)
             if ds.n_users else np.zeros(0, np.int64))
    keys = interaction_keys(users, items, ds.n_items)
    row_users = prepared.train.users
    if row_users.shape[0]:
        present = np.zeros(ds.n_users, dtype=bool)
        present[row_users] = True
        sub = keys[present[keys // ds.n_items]]
        _check_catalogue(sub, ds.n_users, ds.n_items, n - 1, "training")
    rng = np.random.default_rng([int(seed), int(epoch)])
    neg = sample_negatives(rng, row_users, keys, ds.n_items, n - 1)
    return insert_targets(rng, neg, prepared.train.targets)
