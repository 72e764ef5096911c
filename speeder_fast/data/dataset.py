"""The in-memory dataset every reader produces and every other module consumes.

Indexing: users are ``0..n_users-1`` and items ``0..n_items-1`` (no padding index here; models
that need one shift by +1 themselves). Sequences are chronological; ties in time are broken by
file order (stable sort).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

TEXT_FIELDS = ("title", "description", "brand", "categories")


@dataclass
class RecDataset:
    """Integer-indexed interactions + item text table."""

    name: str
    user_ids: list[str]  # index -> raw user token
    item_ids: list[str]  # index -> raw item token
    sequences: list[np.ndarray]  # per user: int64 item indices, oldest -> newest
    item_text: dict[str, list[str]] = field(default_factory=dict)  # column -> per-item string ("" if missing)
    source: str = ""  # path or asset name it came from
    # True when the source fixed the split (RecBole benchmark files NAME.{train,valid,test}.inter): each
    # sequence is the user's train events, then their one valid event, then their one test event
    given_split: bool = False
    # what the reader removed or noticed, e.g. {"exact_duplicates_dropped": 3} (into the filter report)
    read_report: dict = field(default_factory=dict)

    @property
    def n_users(self) -> int:
        return len(self.user_ids)

    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    @property
    def n_interactions(self) -> int:
        return int(sum(len(s) for s in self.sequences))

    def title(self, item: int) -> str:
        return self.item_text.get("title", [""] * self.n_items)[item]

    def text_fields(self) -> list[str]:
        return list(self.item_text.keys())

    def lengths(self) -> np.ndarray:
        """int64 [n_users]: events per user."""
        return np.fromiter((len(s) for s in self.sequences), np.int64, len(self.sequences))

    def flat(self) -> tuple[np.ndarray, np.ndarray]:
        """``(items, offsets)``: all sequences concatenated (int64) and ``[n_users+1]`` start offsets,
        so user ``u``'s sequence is ``items[offsets[u]:offsets[u+1]]``."""
        lengths = self.lengths()
        offsets = np.zeros(lengths.shape[0] + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        items = np.concatenate(self.sequences).astype(np.int64) if self.sequences else np.zeros(0, np.int64)
        return items, offsets


@dataclass
class SplitArrays:
    """A set of next-item examples as dense arrays (vectorised batching, no per-sample objects).

    ``histories[i, :lengths[i]]`` are the history items oldest -> newest, left-aligned; the rest
    is ``-1``. ``targets[i]`` is the next item. ``users[i]`` the user index.
    """

    users: np.ndarray  # int64 [n]
    histories: np.ndarray  # int64 [n, H], -1 padded on the right
    lengths: np.ndarray  # int64 [n]
    targets: np.ndarray  # int64 [n]

    def __len__(self) -> int:
        return int(self.users.shape[0])

    def subset(self, idx: np.ndarray) -> "SplitArrays":
        return SplitArrays(self.users[idx], self.histories[idx], self.lengths[idx], self.targets[idx])


@dataclass
class PreparedData:
    """What ``speeder_fast.data.prepare`` returns: dataset, leave-one-out splits, persisted candidates."""

    dataset: RecDataset
    train: SplitArrays  # sliding windows over each user's training prefix
    valid: SplitArrays  # history -> second-to-last item
    test: SplitArrays  # history -> last item
    valid_candidates: np.ndarray  # int64 [n_valid, N]; contains the target exactly once, shuffled
    test_candidates: np.ndarray  # int64 [n_test, N]
    cache_dir: str = ""  # where the processed files and persisted candidates live
    manifest: dict = field(default_factory=dict)

    def candidates(self, split: str) -> np.ndarray:
        return {"valid": self.valid_candidates, "test": self.test_candidates}[split]

    def split(self, name: str) -> SplitArrays:
        return {"train": self.train, "valid": self.valid, "test": self.test}[name]

    def with_sequence_windows(self, max_history: int, max_train_examples: int = 0,
                              last_only: bool = False) -> "PreparedData":
        """This data with ``train`` rebuilt as SASRec-style sequence windows (``answer_mode=item``).

        Each user's training prefix (``sequences[u][:-2]``) is cut, from its end, into windows of up
        to ``max_history`` history items + one target that overlap by one item, so that with
        all-position training every prefix position ``>= 1`` is a target exactly once (see
        :func:`speeder_fast.data.splits.leave_one_out`, ``train_stride=max_history``).
        ``max_train_examples > 0`` keeps the most recent windows; ``last_only`` keeps each user's
        last window only (``data.last_window_only``). Valid/test rows and candidates are unchanged.
        """
        import dataclasses

        from speeder_fast.data.splits import leave_one_out

        flat, offsets = self.dataset.flat()
        train, _, _ = leave_one_out(flat, offsets, max_history, max_train_examples, train_stride=max_history,
                                    last_only=last_only)
        return dataclasses.replace(self, train=train)

    def without_last(self, n: int) -> "PreparedData":
        """This data with the last ``n`` items of every sequence removed (users with fewer than
        ``n + 3`` items keep their first 3), re-split leave-one-out: its training prefixes are
        ``sequences[u][:-2-n]`` and its validation / test targets the ``n + 2``-th / ``n + 1``-th
        item from the end. For a collaborative encoder that must not have trained on the
        transitions into the last ``n`` training items (``features.sasrec_holdout``). The candidate
        sets are each row's target alone (``[n_rows, 1]``): ranking against them means nothing.
        """
        import dataclasses

        from speeder_fast.data.splits import leave_one_out

        if n < 0:
            raise ValueError(f"without_last: n must be >= 0, got {n}")
        ds = self.dataset
        seqs = [np.asarray(s[:max(3, len(s) - n)], dtype=np.int64) for s in ds.sequences]
        short = dataclasses.replace(ds, sequences=seqs, given_split=False)
        flat, offsets = short.flat()
        train, valid, test = leave_one_out(flat, offsets, self.train.histories.shape[1])
        return dataclasses.replace(self, dataset=short, train=train, valid=valid, test=test,
                                   valid_candidates=valid.targets[:, None].copy(),
                                   test_candidates=test.targets[:, None].copy())

    def without_users(self, drop: np.ndarray) -> "PreparedData":
        """This data without the users where ``drop`` (bool ``[n_users]``) is True: same item catalogue
        (ids unchanged), fewer users, re-split leave-one-out (their training prefixes are
        ``sequences[u][:-2]``, as here). For a collaborative encoder that must not have trained on any
        of those users' transitions (one fold of ``features.sasrec_crossfit``). Candidate sets are each
        row's target alone (``[n_rows, 1]``), as in :meth:`without_last`.

        Raises:
            ValueError: ``drop`` is not ``[n_users]``, or it drops every user.
        """
        import dataclasses

        from speeder_fast.data.splits import leave_one_out

        ds = self.dataset
        drop = np.asarray(drop, dtype=bool)
        if drop.shape != (ds.n_users,):
            raise ValueError(f"without_users: drop must be bool [{ds.n_users}], got shape {drop.shape}")
        keep = np.flatnonzero(~drop)
        if keep.size == 0:
            raise ValueError("without_users: every user is dropped")
        kept = dataclasses.replace(ds, user_ids=[ds.user_ids[u] for u in keep],
                                   sequences=[ds.sequences[u] for u in keep])
        flat, offsets = kept.flat()
        train, valid, test = leave_one_out(flat, offsets, self.train.histories.shape[1])
        return dataclasses.replace(self, dataset=kept, train=train, valid=valid, test=test,
                                   valid_candidates=valid.targets[:, None].copy(),
                                   test_candidates=test.targets[:, None].copy())

    def stats(self) -> dict:
        """Users, items, interactions, density, sequence lengths, split sizes, text coverage
        (see :func:`speeder_fast.data.stats.compute_stats`; ``format_stats`` prints it)."""
        from speeder_fast.data.stats import compute_stats

        return compute_stats(self)
