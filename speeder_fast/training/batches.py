"""Training micro-batches: the token-budget plan and the per-rank stream the loop reads.

* :func:`plan_token_batches` cuts an epoch permutation into global batches by prompt tokens
  (``train.max_tokens_per_batch``);
* :class:`MicroBatches` is the endless, seeded, resumable stream of this rank's micro-batches
  (:class:`MicroBatch`: the prompt batch, its loss weight, the real examples of its global batch);
  :func:`speeder_fast.training.step.train_step` consumes ``grad_accum`` of them per optimizer step.

Everything here runs on the host (numpy); nothing reads from the device.
"""

from __future__ import annotations

import math
from typing import Any, Iterator, NamedTuple

import numpy as np

from speeder_fast.distributed import ShardedSampler
from speeder_fast.utils import get_logger

log = get_logger("speeder_fast.training")

__all__ = ["FoldBlockedSampler", "MicroBatch", "MicroBatches", "plan_token_batches"]


class FoldBlockedSampler(ShardedSampler):
    """A :class:`ShardedSampler` whose every global batch holds examples of one group (cross-fitting:
    the collab fold of the example's user, ``features.sasrec_crossfit``).

    Each epoch, each group's examples are shuffled and cut into global batches; a group whose size is
    not a multiple of the global batch fills its last batch by repeating its first examples of the
    epoch (at most ``global batch - 1`` repeats per group and epoch), and the batches of all groups
    are then shuffled together. Every batch is full, and the order is a function of
    ``(seed, epoch, groups, world_size, batch_size)``.

    Args:
        groups: int ``[n]``, each example's group (``>= 0``).
        the rest: as :class:`ShardedSampler` (``drop_last`` is not supported: no batch is short).

    Raises:
        ValueError: ``groups`` is not ``[n]`` non-negative ints.
    """

    def __init__(self, groups: np.ndarray, world_size: int = 1, rank: int = 0, shuffle: bool = True,
                 seed: int = 0, epoch: int = 0, batch_size: int = 1) -> None:
        groups = np.asarray(groups)
        if groups.ndim != 1 or (groups.size and (groups.min() < 0 or not np.issubdtype(groups.dtype, np.integer))):
            raise ValueError("FoldBlockedSampler: groups must be a 1-d array of non-negative ints")
        super().__init__(len(groups), world_size, rank, shuffle, seed, epoch, False, batch_size)
        self.groups = groups.astype(np.int64)
        self._sizes = np.bincount(self.groups) if groups.size else np.zeros(0, np.int64)

    @property
    def num_steps(self) -> int:
        gb = self.global_batch
        return int(sum(math.ceil(int(c) / gb) for c in self._sizes))

    def permutation(self) -> np.ndarray:
        gb = self.global_batch
        rng = np.random.default_rng([self.seed, self.epoch, 0xF01D])
        chunks = []
        for g in range(len(self._sizes)):
            rows = np.flatnonzero(self.groups == g)
            if rows.size == 0:
                continue
            if self.shuffle:
                rows = rows[rng.permutation(rows.size)]
            pad = -rows.size % gb
            rows = np.concatenate([rows, np.resize(rows, pad)]) if pad else rows
            chunks.extend(rows.reshape(-1, gb))
        if self.shuffle:
            chunks = [chunks[i] for i in rng.permutation(len(chunks))]
        return np.concatenate(chunks) if chunks else np.zeros(0, np.int64)

    def __len__(self) -> int:
        return self.num_steps * self.batch_size


class MicroBatch(NamedTuple):
    """One micro-batch of a training step.

    Attributes:
        batch: the :class:`~speeder_fast.model.prompts.PromptBatch` (host tensors; the step moves it).
        weight: factor for its mean loss, ``n_real * world_size / n_global`` (1 for one process and a
            full batch, 0 for a padding batch).
        n_global: real examples of its global batch over all ranks (what the step logs as examples).
    """

    batch: Any
    weight: float
    n_global: int


def plan_token_batches(order: np.ndarray, lengths: np.ndarray, max_tokens: int, world_size: int = 1,
                       padded: bool = False) -> tuple[list[np.ndarray], int]:
    """Cut ``order`` (an epoch permutation) greedily into consecutive global batches by tokens.

    A global batch is dealt to ranks as ``glob[r::world_size]``. It is closed before the next
    example when adding it would make some rank's micro-batch cost more than ``max_tokens`` or the
    global batch cost more than ``world_size * max_tokens``. Cost: ``sum(lengths)`` (``padded=False``,
    packed batches) or ``n * max(lengths)`` (``padded=True``, what a padded batch computes). An
    example longer than ``max_tokens`` gets a global batch of its own.

    Args:
        order: dataset indices in epoch order.
        lengths: token count of every dataset example (indexed by dataset index).
        max_tokens: per-process budget (> 0).
        world_size: number of processes.
        padded: padded cost instead of the packed one.

    Returns:
        ``(batches, n_oversize)``: the global batches (int64 arrays of dataset indices, in order,
        together exactly ``order``) and the number of examples longer than ``max_tokens``.
    """
    if max_tokens <= 0:
        raise ValueError(f"train.max_tokens_per_batch must be > 0 for a token plan, got {max_tokens}")
    order = np.asarray(order, dtype=np.int64)
    lens = np.asarray(lengths, dtype=np.int64)[order].tolist()
    world, budget = int(world_size), int(max_tokens)
    g_budget = world * budget
    cuts = [0]
    n_over = 0
    r_sum, r_n, r_max = [0] * world, [0] * world, [0] * world
    g_n = g_sum = g_max = 0
    for i, n in enumerate(lens):  # host-side, once per epoch
        if n > budget:
            n_over += 1
            if g_n:
                cuts.append(i)
            cuts.append(i + 1)  # alone
            r_sum, r_n, r_max = [0] * world, [0] * world, [0] * world
            g_n = g_sum = g_max = 0
            continue
        r = g_n % world
        if g_n:
            if padded:
                fits = ((r_n[r] + 1) * max(r_max[r], n) <= budget and (g_n + 1) * max(g_max, n) <= g_budget)
            else:
                fits = r_sum[r] + n <= budget and g_sum + n <= g_budget
            if not fits:
                cuts.append(i)
                r_sum, r_n, r_max = [0] * world, [0] * world, [0] * world
                g_n = g_sum = g_max = 0
                r = 0
        r_sum[r] += n
        r_n[r] += 1
        r_max[r] = max(r_max[r], n)
        g_n += 1
        g_sum += n
        g_max = max(g_max, n)
    if cuts[-1] != len(lens):
        cuts.append(len(lens))
    return [order[a:b] for a, b in zip(cuts[:-1], cuts[1:])], n_over


class MicroBatches:
    """Endless stream of this rank's training micro-batches.

    Each micro-batch is this rank's part of one global batch of a seeded epoch permutation, so N
    processes see exactly the examples one process with the global batch would. Global batches hold
    ``world_size * batch_size`` examples (:class:`ShardedSampler`), or, with ``max_tokens > 0``
    (``train.max_tokens_per_batch``), as many consecutive examples of the same permutation as fit the
    token budget (:func:`plan_token_batches`; prompt lengths from
    :meth:`~speeder_fast.model.prompts.PromptBuilder.prompt_lengths`, packed cost when the model
    packs, padded cost otherwise). Candidates are re-sampled every epoch, so a token plan is a
    function of ``(seed, epoch, candidates, world_size, budget)``. The curriculum's text-only draw is
    a function of ``(seed, epoch, global batch)`` over the global batch, so it does not depend on the
    number of processes either. :meth:`position`/:meth:`seek` save/restore where the stream is
    (checkpoints).

    Args:
        comp: the run's :class:`~speeder_fast.training.run.Components` (its ``cfg``, ``prepared``,
            ``builder`` and ``model.packing`` are read).
        batch_size: examples per rank and micro-batch (``train.batch_size``), without a token budget.
        seed: permutation seed (``cfg.seed``).
        world_size, rank: the processes.
        max_tokens: per-rank token budget (``train.max_tokens_per_batch``; 0 = example counts).
        curriculum: some stage mixes text-only prompts in (``hybrid_share < 1``); a token plan then
            costs every example at the longer of its soft-token and text-only prompt, so the budget
            holds whichever form the draw picks.

    With cross-fitted collab tables in the model's MoME (``features.sasrec_crossfit``: its
    ``user_folds``) the stream is a :class:`FoldBlockedSampler` over the rows' user folds, and every
    batch carries its ``fold``.

    Raises:
        ValueError: ``max_tokens < 0``; ``max_tokens > 0`` with cross-fitting.
    """

    def __init__(self, comp: Any, batch_size: int, seed: int, world_size: int = 1, rank: int = 0,
                 max_tokens: int = 0, curriculum: bool = False) -> None:
        if max_tokens < 0:
            raise ValueError(f"train.max_tokens_per_batch must be >= 0, got {max_tokens}")
        self.comp = comp
        self.seed = seed
        self.world_size, self.rank = world_size, rank
        self.max_tokens = int(max_tokens)
        self.curriculum = bool(curriculum)
        #: cross-fitting: each training row's collab fold (its user's); every batch then holds one fold
        from speeder_fast.features.crossfit import row_folds

        self.row_folds = row_folds(comp.model, comp.prepared.train.users)
        if self.row_folds is not None:
            if self.max_tokens > 0:
                raise ValueError("cross-fitted batches (features.sasrec_crossfit) are counted in examples: "
                                 "train.max_tokens_per_batch must be 0")
            self.sampler = FoldBlockedSampler(self.row_folds, world_size, rank, shuffle=True, seed=seed,
                                              batch_size=batch_size)
        else:
            self.sampler = ShardedSampler(len(comp.prepared.train), world_size, rank, shuffle=True, seed=seed,
                                          batch_size=batch_size)
        self.epoch = -1
        self.step_in_epoch = 0
        self.cands: np.ndarray | None = None
        self.last_n_global = 0  # real examples in the global batch of the last micro-batch
        self.last_indices = np.zeros(0, np.int64)  # training-set rows of the last micro-batch (padding included)
        self._it = None
        self._plans: dict[int, list[np.ndarray]] = {}
        self._warned_oversize = False
        self._warned_share = False

    @property
    def padded_cost(self) -> bool:
        """True when batches run padded (cost ``n * max_len``), False when the model packs them."""
        return not bool(getattr(self.comp.model, "packing", False))

    @property
    def steps_per_epoch(self) -> int:
        """Global batches in the current epoch (epoch 0 before the stream starts)."""
        if self.max_tokens <= 0:
            return self.sampler.num_steps
        return len(self.plan(max(self.epoch, 0)))

    def _candidates(self, epoch: int) -> np.ndarray | None:
        """This epoch's training candidates (None in item mode: its prompts list no candidates)."""
        from speeder_fast.data import sample_train_candidates

        if self.comp.builder.item_mode:
            return None
        return sample_train_candidates(self.comp.prepared, epoch, self.comp.cfg.data.n_candidates,
                                       self.comp.cfg.data.seed)

    def plan(self, epoch: int, cands: np.ndarray | None = None) -> list[np.ndarray]:
        """The token-budget global batches of ``epoch`` (cached; only with ``max_tokens > 0``)."""
        if self.max_tokens <= 0:
            raise RuntimeError("MicroBatches.plan: no token budget (max_tokens = 0)")
        if epoch in self._plans:
            return self._plans[epoch]
        if cands is None:
            cands = self.cands if (epoch == self.epoch and self.cands is not None) else self._candidates(epoch)
        tr, b = self.comp.prepared.train, self.comp.builder
        lengths = b.prompt_lengths(tr.histories, tr.lengths, cands, with_answer=True, targets=tr.targets)
        if self.curriculum and b.paradigm == "speeder":
            text = b.prompt_lengths(tr.histories, tr.lengths, cands, with_answer=True, targets=tr.targets,
                                    text_only=np.ones(len(tr), dtype=bool))
            lengths = np.maximum(lengths, text)
        sampler = ShardedSampler(len(tr), self.world_size, self.rank, shuffle=True, seed=self.seed, epoch=epoch)
        batches, n_over = plan_token_batches(sampler.permutation(), lengths, self.max_tokens, self.world_size,
                                             padded=self.padded_cost)
        if n_over and not self._warned_oversize:
            self._warned_oversize = True
            log.warning("train.max_tokens_per_batch=%d: %d example(s) of epoch %d are longer (up to %d tokens); "
                        "each runs in a batch of its own", self.max_tokens, n_over, epoch, int(lengths.max()))
        for e in [e for e in self._plans if e < self.epoch]:  # keep the cache small (past epochs)
            del self._plans[e]
        self._plans[epoch] = batches
        return batches

    def micro_batches_ahead(self, epochs: float) -> int:
        """Micro-batches in the next ``epochs`` epochs of the stream from its current position
        (a fraction of an epoch counts that fraction of the epoch's global batches, rounded up)."""
        e, s = self.epoch, self.step_in_epoch
        if e < 0 or s >= self.steps_per_epoch:
            e, s = e + 1, 0
        left, count = float(epochs), 0
        while left > 1e-12:
            n = len(self.plan(e)) if self.max_tokens > 0 else self.sampler.num_steps
            avail = (n - s) / n
            if left <= avail + 1e-12:
                count += min(n - s, math.ceil(left * n - 1e-9))
                break
            count += n - s
            left -= avail
            e, s = e + 1, 0
        return count

    def position(self) -> dict[str, int]:
        return {"epoch": self.epoch, "step_in_epoch": self.step_in_epoch}

    def seek(self, epoch: int, step_in_epoch: int) -> None:
        """Continue from global batch ``step_in_epoch`` of ``epoch`` (as saved by :meth:`position`)."""
        self.epoch, self.step_in_epoch, self._it = int(epoch), int(step_in_epoch), None
        if self.epoch >= 0:
            self._load_epoch(self.epoch)

    def _load_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.sampler.set_epoch(epoch)
        self.cands = self._candidates(epoch)
        if self.max_tokens > 0:
            self.plan(epoch, self.cands)

    def _token_batches(self, start_step: int):
        """This rank's :class:`ShardBatch` parts of the epoch's token plan from ``start_step`` on."""
        from speeder_fast.distributed import ShardBatch

        for s, glob in enumerate(self.plan(self.epoch)[start_step:], start=start_step):
            mine = glob[self.rank::self.world_size].tolist()
            if mine:
                yield ShardBatch(s, mine, [True] * len(mine), len(mine), len(glob), self.world_size)
            else:  # fewer examples than ranks: a zero-weight padding example keeps DDP in step
                yield ShardBatch(s, [int(glob[0])], [False], 0, len(glob), self.world_size)

    def next(self, hybrid_share: float = 1.0):
        """``(batch, weight)``: the prompt batch and the factor for its mean loss (``n_real *
        world_size / n_global``; 1 for one process and full batches, 0 for a padding batch)."""
        if self.epoch < 0 or self.step_in_epoch >= self.steps_per_epoch:
            self._load_epoch(self.epoch + 1)
            self.step_in_epoch = 0
            self._it = None
        if self._it is None:
            self._it = (self._token_batches(self.step_in_epoch) if self.max_tokens > 0
                        else self.sampler.batches(self.step_in_epoch))
        sb = next(self._it)
        self.step_in_epoch = sb.step_in_epoch + 1
        self.last_n_global = sb.n_global
        rows = np.asarray(sb.indices, dtype=np.int64)
        self.last_indices = rows
        tr = self.comp.prepared.train
        text_only = None
        if hybrid_share < 1.0:
            if self.max_tokens > 0 and not self.curriculum and not self._warned_share:
                self._warned_share = True
                log.warning("hybrid_share < 1 but the token plan was made without text-only lengths "
                            "(curriculum=False): batches may exceed train.max_tokens_per_batch")
            draw = np.random.default_rng([self.seed, 1, self.epoch, sb.step_in_epoch]).random(sb.n_global)
            mine = draw[self.rank::self.world_size][: len(rows)]
            if len(mine) < len(rows):  # padding example
                mine = np.ones(len(rows))
            text_only = mine >= hybrid_share
        cands = None if self.cands is None else self.cands[rows]
        batch = self.comp.builder.build(tr.histories[rows], tr.lengths[rows], cands, tr.targets[rows],
                                        with_answer=True, text_only=text_only)
        if self.row_folds is not None:  # one fold per global batch (FoldBlockedSampler)
            batch.fold = int(self.row_folds[rows[0]])
        return batch, sb.n_real * sb.loss_scale

    def micro_batches(self, n: int, hybrid_share: float = 1.0) -> Iterator[MicroBatch]:
        """The next ``n`` micro-batches as :class:`MicroBatch` (built one at a time, as they are consumed)."""
        for _ in range(n):
            batch, weight = self.next(hybrid_share)
            yield MicroBatch(batch, weight, self.last_n_global)
