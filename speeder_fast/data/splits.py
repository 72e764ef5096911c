"""Leave-one-out splits as dense :class:`SplitArrays`, built without per-example Python loops.

For a user sequence ``s`` of length ``L`` (``L >= 3``):

* test: history ``s[:L-1]`` (last ``H`` items), target ``s[L-1]``;
* valid: history ``s[:L-2]`` (last ``H``), target ``s[L-2]``;
* train: the prefix ``p = s[:L-2]``; every position ``t >= 1`` of ``p`` is a target with history
  ``p[max(0, t-H):t]`` (sliding windows), in user order then position order.

Histories are left-aligned (oldest first) and ``-1``-padded on the right to width ``H``.
"""

from __future__ import annotations

import numpy as np

from speeder_fast.data.dataset import SplitArrays


def seq_offsets(lengths: np.ndarray) -> np.ndarray:
    """``[n+1]`` start offsets of each sequence in the flat array."""
    off = np.zeros(lengths.shape[0] + 1, dtype=np.int64)
    np.cumsum(lengths, out=off[1:])
    return off


def gather_windows(flat: np.ndarray, users: np.ndarray, starts: np.ndarray, ends: np.ndarray,
                   max_history: int) -> SplitArrays:
    """Examples whose history is ``flat[max(starts, ends-H):ends]`` and target ``flat[ends]``."""
    h0 = np.maximum(starts, ends - max_history).astype(np.int64)
    lengths = (ends - h0).astype(np.int64)
    n = lengths.shape[0]
    hist = np.full((n, max_history), -1, dtype=np.int64)
    # fill only the occupied cells: cost O(n*H) memset + O(sum(lengths)) gather
    rows = np.repeat(np.arange(n, dtype=np.int64), lengths)
    cols = np.arange(rows.shape[0], dtype=np.int64) - seq_offsets(lengths)[:-1][rows]
    hist[rows, cols] = flat[h0[rows] + cols]
    return SplitArrays(users=users.astype(np.int64), histories=hist,
                       lengths=lengths, targets=flat[ends].astype(np.int64))


def leave_one_out(flat: np.ndarray, offsets: np.ndarray, max_history: int,
                  max_train_examples: int = 0, train_stride: int = 1,
                  last_only: bool = False) -> tuple[SplitArrays, SplitArrays, SplitArrays]:
    """``(train, valid, test)`` from flat chronological items and ``[n_users+1]`` offsets.

    Every user must have at least 3 events. Training targets are prefix positions ``t`` with
    ``(L - 3 - t) % train_stride == 0`` (counted back from the last one): ``train_stride=1`` gives
    one sliding window per target; ``train_stride=max_history`` gives the SASRec-style *sequence
    windows* of the next-item head (``answer_mode=item``): windows of up to ``max_history + 1``
    items that share one item, so every prefix position ``>= 1`` is predicted exactly once by some
    position of some window. ``max_train_examples > 0`` keeps the most recent windows: examples
    are ranked by their distance from the end of their user's training prefix (0 = the last
    window), ties by user order, and the ``n`` smallest kept, in the original order. ``last_only``
    keeps each user's last training window only (before the ``max_train_examples`` cap).
    """
    if max_history < 1:
        raise ValueError(f"max_history must be >= 1, got {max_history}")
    if train_stride < 1:
        raise ValueError(f"train_stride must be >= 1, got {train_stride}")
    flat = np.asarray(flat, dtype=np.int64)
    starts = offsets[:-1].astype(np.int64)
    lengths = np.diff(offsets).astype(np.int64)
    if lengths.shape[0] and lengths.min() < 3:
        bad = int(np.argmin(lengths))
        raise ValueError(f"leave-one-out needs >= 3 events per user; user index {bad} has {int(lengths[bad])}")
    n_users = lengths.shape[0]
    uid = np.arange(n_users, dtype=np.int64)
    ends = offsets[1:].astype(np.int64)
    test = gather_windows(flat, uid, starts, ends - 1, max_history)
    valid = gather_windows(flat, uid, starts, ends - 2, max_history)

    n_tr = np.maximum(lengths - 3, 0)  # targets at prefix positions 1..L-3
    n_win = -(-n_tr // train_stride)  # windows per user (ceil)
    tu = np.repeat(uid, n_win)
    j = np.arange(tu.shape[0], dtype=np.int64) - seq_offsets(n_win)[tu]  # window index, oldest first
    from_end = n_win[tu] - 1 - j  # 0 = the user's last window
    t_ends = starts[tu] + 1 + (n_tr[tu] - 1 - from_end * train_stride)
    if last_only:
        keep = from_end == 0
        tu, t_ends, from_end = tu[keep], t_ends[keep], from_end[keep]
    if 0 < max_train_examples < tu.shape[0]:
        order = np.lexsort((tu, from_end))  # by distance from end, then user
        sel = np.sort(order[:max_train_examples])
        tu, t_ends = tu[sel], t_ends[sel]
    train = gather_windows(flat, tu, starts[tu], t_ends, max_history)
    return train, valid, test
