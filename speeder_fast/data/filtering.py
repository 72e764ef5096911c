"""Filtering on flat event arrays: duplicate dropping, iterative k-core, min-length, user subset.

All operations work on a "flat" view of a :class:`RecDataset`: ``users`` / ``items`` int64
arrays of one entry per event, grouped by user and chronological within a user. Every step is
vectorised (``np.bincount`` / boolean masks); the order of the surviving events never changes,
so ties in time keep their file order.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from speeder_fast.data.dataset import RecDataset
from speeder_fast.errors import DataError
from speeder_fast.utils import get_logger

log = get_logger("speeder_fast.data")


def flatten(ds: RecDataset) -> tuple[np.ndarray, np.ndarray]:
    """``(users, items)`` int64 arrays, one entry per event, grouped by user, chronological."""
    lengths = np.fromiter((len(s) for s in ds.sequences), np.int64, ds.n_users)
    users = np.repeat(np.arange(ds.n_users, dtype=np.int64), lengths)
    items = np.concatenate(ds.sequences).astype(np.int64, copy=False) if ds.sequences else np.zeros(0, np.int64)
    return users, items


def drop_consecutive_duplicates(users: np.ndarray, items: np.ndarray) -> np.ndarray:
    """Mask keeping every event except one whose item equals the same user's previous item."""
    keep = np.ones(users.shape[0], dtype=bool)
    if users.shape[0] > 1:
        keep[1:] = ~((users[1:] == users[:-1]) & (items[1:] == items[:-1]))
    return keep


def kcore(users: np.ndarray, items: np.ndarray, user_k: int, item_k: int,
          n_users: int, n_items: int, keep: np.ndarray | None = None) -> tuple[np.ndarray, int]:
    """Iterative k-core: drop users with < ``user_k`` events and items with < ``item_k`` events
    (counting interactions, not distinct partners) until nothing changes. 0 disables a side.

    Returns the event mask and the number of iterations.
    """
    keep = np.ones(users.shape[0], dtype=bool) if keep is None else keep.copy()
    rounds = 0
    if user_k <= 0 and item_k <= 0:
        return keep, rounds
    while True:
        rounds += 1
        ok = keep.copy()
        if user_k > 0:
            uc = np.bincount(users[keep], minlength=n_users)
            ok &= uc[users] >= user_k
        if item_k > 0:
            ic = np.bincount(items[keep], minlength=n_items)
            ok &= ic[items] >= item_k
        if np.array_equal(ok, keep):
            return keep, rounds
        keep = ok


@dataclass
class FilterReport:
    """What each step removed (stored in the manifest, logged)."""

    raw_users: int = 0
    raw_items: int = 0
    raw_interactions: int = 0
    exact_duplicates_dropped: int = 0  # same user, item and timestamp (data.drop_duplicates; by the reader)
    duplicates_dropped: int = 0  # consecutive repeats of the same item (data.drop_consecutive_duplicates)
    kcore_rounds: int = 0
    kcore_users_dropped: int = 0
    kcore_items_dropped: int = 0
    kcore_interactions_dropped: int = 0
    short_users_dropped: int = 0
    max_users_dropped: int = 0
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items()}


def filter_dataset(ds: RecDataset, *, user_kcore: int = 0, item_kcore: int = 0,
                   drop_duplicates: bool = False, min_user_events: int = 3,
                   max_users: int = 0) -> tuple[RecDataset, FilterReport]:
    """Apply, in order: consecutive-duplicate dropping, iterative user/item k-core, dropping of
    users with fewer than ``min_user_events`` events (then k-core again, so the item side still
    holds), the ``max_users`` subset, and dense re-indexing.

    ``max_users`` keeps the first N surviving users in order of first appearance in the input
    (the reader's user order); items no longer used by any kept user are dropped, so the k-core
    property need not hold on such a subset. Re-indexing keeps the relative order of users and
    items (first appearance); raw ids are kept in ``user_ids`` / ``item_ids``.
    """
    rep = FilterReport(raw_users=ds.n_users, raw_items=ds.n_items, raw_interactions=ds.n_interactions)
    users, items = flatten(ds)
    keep = np.ones(users.shape[0], dtype=bool)
    if drop_duplicates:
        keep = drop_consecutive_duplicates(users, items)
        rep.duplicates_dropped = int((~keep).sum())
        if rep.duplicates_dropped:
            log.info("%s: dropped %d consecutive duplicate events", ds.name, rep.duplicates_dropped)
    before = keep
    keep, rep.kcore_rounds = kcore(users, items, user_kcore, item_kcore, ds.n_users, ds.n_items, keep)

    def n_alive(idx: np.ndarray, mask: np.ndarray, n: int) -> int:
        return int(np.count_nonzero(np.bincount(idx[mask], minlength=n)))

    rep.kcore_users_dropped = n_alive(users, before, ds.n_users) - n_alive(users, keep, ds.n_users)
    rep.kcore_items_dropped = n_alive(items, before, ds.n_items) - n_alive(items, keep, ds.n_items)
    rep.kcore_interactions_dropped = int(before.sum() - keep.sum())
    if user_kcore or item_kcore:
        log.info("%s: k-core (user %d, item %d) in %d rounds dropped %d users, %d items, %d events",
                 ds.name, user_kcore, item_kcore, rep.kcore_rounds, rep.kcore_users_dropped,
                 rep.kcore_items_dropped, rep.kcore_interactions_dropped)

    if min_user_events > 0:
        uc = np.bincount(users[keep], minlength=ds.n_users)
        short = (uc > 0) & (uc < min_user_events)
        rep.short_users_dropped = int(short.sum())
        if rep.short_users_dropped:
            log.warning("%s: dropped %d users with fewer than %d events", ds.name, rep.short_users_dropped,
                        min_user_events)
            keep, r = kcore(users, items, max(user_kcore, min_user_events), item_kcore, ds.n_users, ds.n_items, keep)
            rep.kcore_rounds += r

    if max_users > 0:
        alive = np.flatnonzero(np.bincount(users[keep], minlength=ds.n_users) > 0)
        if alive.shape[0] > max_users:
            rep.max_users_dropped = int(alive.shape[0] - max_users)
            allowed = np.zeros(ds.n_users, dtype=bool)
            allowed[alive[:max_users]] = True
            keep &= allowed[users]
            log.info("%s: max_users=%d keeps the first %d users in input order (%d dropped)", ds.name,
                     max_users, max_users, rep.max_users_dropped)

    out = reindex(ds, users[keep], items[keep])
    if out.n_users == 0:
        raise DataError(f"{ds.name}: no users left after filtering (data.user_kcore={user_kcore}, "
                        f"data.item_kcore={item_kcore}, data.min_user_events={min_user_events}); lower them")
    return out, rep


def reindex(ds: RecDataset, users: np.ndarray, items: np.ndarray) -> RecDataset:
    """A new dataset over the given (grouped, chronological) events with dense ids; the relative
    order of the surviving users and items is preserved; item text follows the items."""
    uk = np.unique(users)  # sorted old ids = preserved order
    ik = np.unique(items)
    umap = np.full(ds.n_users, -1, np.int64)
    umap[uk] = np.arange(uk.shape[0])
    imap = np.full(ds.n_items, -1, np.int64)
    imap[ik] = np.arange(ik.shape[0])
    new_u = umap[users]
    new_i = imap[items]
    counts = np.bincount(new_u, minlength=uk.shape[0])
    seqs = np.split(new_i, np.cumsum(counts)[:-1]) if uk.shape[0] else []
    text = {f: [col[j] for j in ik.tolist()] for f, col in ds.item_text.items()}
    return RecDataset(name=ds.name, user_ids=[ds.user_ids[j] for j in uk.tolist()],
                      item_ids=[ds.item_ids[j] for j in ik.tolist()], sequences=seqs, item_text=text,
                      source=ds.source, given_split=ds.given_split, read_report=dict(ds.read_report))
