"""Multi-process (torchrun) helpers: environment, process group, collectives, sharded sampling.

Everything here is a no-op for a single process, so the training loop calls the same functions with
or without ``torchrun``.

Data sharding for training (:class:`ShardedSampler`) follows one rule: **a distributed step sees
exactly the examples a single process with the global batch would see.** Each epoch the (seeded)
permutation is cut into global batches of ``world_size * batch_size`` examples; rank ``r`` takes
every ``world_size``-th example of each global batch starting at ``r``. Shards are disjoint and
cover the epoch. The last global batch may be short (``n % (world_size * batch_size)`` examples):

* ``drop_last=False`` (default): it is split as evenly as possible; a rank that gets *no* example
  still runs the step on one padding example whose mask is False (weight 0), so every rank does the
  same number of forward/backward passes (DDP's gradient all-reduce needs that) and no example is
  counted twice. The loop scales the loss by ``batch.loss_scale = world_size / n_global``::

      loss = (per_example_loss * mask).sum() * batch.loss_scale

  DDP averages gradients over ranks, so the update equals the single-process gradient of the mean
  over the ``n_global`` real examples of that global batch, also for the short last batch.
* ``drop_last=True``: the short last global batch is dropped (a different tail each epoch when
  shuffled); every batch is full.

With gradient accumulation use the sum of ``n_global`` over the accumulated micro-batches as the
denominator. When micro-batches are sized by tokens (``train.max_tokens_per_batch``) the epoch
plan (``speeder_fast.training.loop.plan_token_batches``) is cut from the same permutation and
lengths on every rank, so all ranks have the same number of steps by construction; a rank left
without an example in a global batch gets one zero-weight padding example, as above.

Evaluation uses :func:`shard_indices_for_eval` (contiguous shards, the first ``n % world`` ranks
get one more) and :func:`gather_tensor`, which returns the concatenation in rank order, i.e. the
original example order.
"""

from __future__ import annotations

import datetime
import gc
import math
import os
import sys
import weakref
from dataclasses import dataclass
from typing import Any, Iterator, Mapping

import numpy as np
import torch
import torch.distributed as dist

from .errors import DistributedError
from .utils import get_logger

__all__ = [
    "DistEnv", "ShardBatch", "ShardedSampler", "init_distributed", "cleanup", "is_main", "get_rank",
    "get_world_size", "barrier", "all_reduce_mean", "all_reduce_sum", "all_reduce_max", "gather_objects",
    "gather_tensor", "broadcast_object", "shard_indices_for_eval", "unwrap_model",
]

log = get_logger("speeder_fast.distributed")
_ENV: "DistEnv | None" = None


@dataclass(frozen=True)
class DistEnv:
    """The process's place in a (possibly single-process) job.

    Attributes:
        rank, world_size: global rank and number of processes (``RANK``, ``WORLD_SIZE``).
        local_rank, local_world_size: rank and process count on this machine (``LOCAL_RANK``,
            ``LOCAL_WORLD_SIZE``); ``local_rank`` selects the GPU.
        master_addr, master_port: rendezvous address from ``MASTER_ADDR``/``MASTER_PORT`` (torchrun).
        backend: ``"nccl"``/``"gloo"`` once :func:`init_distributed` set up a process group, else None.
        device: the device this rank should use (set by :func:`init_distributed`).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    master_addr: str | None = None
    master_port: int | None = None
    backend: str | None = None
    device: torch.device = torch.device("cpu")

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "DistEnv":
        """Read torchrun's variables; all absent = single process. Raises :class:`DistributedError`
        naming the variable when one is malformed or inconsistent."""
        env = os.environ if environ is None else environ

        def geti(name: str, default: int | None) -> int | None:
            raw = env.get(name)
            if raw is None or raw == "":
                return default
            try:
                return int(raw)
            except ValueError:
                raise DistributedError(f"environment variable {name}={raw!r} is not an integer") from None

        world = geti("WORLD_SIZE", 1)
        rank = geti("RANK", None)
        if world < 1:
            raise DistributedError(f"WORLD_SIZE={world} must be >= 1")
        if rank is None:
            if world > 1:
                raise DistributedError(f"WORLD_SIZE={world} but RANK is not set; launch with torchrun")
            rank = 0
        if not 0 <= rank < world:
            raise DistributedError(f"RANK={rank} is outside [0, WORLD_SIZE={world})")
        local_world = geti("LOCAL_WORLD_SIZE", None)
        local_rank = geti("LOCAL_RANK", None)
        if local_rank is None:
            if world > 1:
                raise DistributedError("LOCAL_RANK is not set (RANK/WORLD_SIZE are); launch with torchrun")
            local_rank = 0
        if local_world is None:
            local_world = world if world > 1 else 1
        if not 0 <= local_rank < max(local_world, 1):
            raise DistributedError(f"LOCAL_RANK={local_rank} is outside [0, LOCAL_WORLD_SIZE={local_world})")
        port = geti("MASTER_PORT", None)
        if world > 1 and (not env.get("MASTER_ADDR") or port is None):
            raise DistributedError("MASTER_ADDR and MASTER_PORT must be set for WORLD_SIZE > 1; launch with torchrun")
        return cls(rank=rank, world_size=world, local_rank=local_rank, local_world_size=local_world,
                   master_addr=env.get("MASTER_ADDR") or None, master_port=port)


def _requested_device(device: str | torch.device) -> str:
    name = device.type if isinstance(device, torch.device) else str(device).split(":")[0]
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name not in ("cpu", "cuda"):
        raise DistributedError(f"device {device!r}: distributed training supports cpu (gloo) and cuda (nccl)")
    return name


def init_distributed(device: str | torch.device = "auto", timeout_s: float = 1800.0,
                     environ: Mapping[str, str] | None = None) -> DistEnv:
    """Set up the process group from torchrun's variables and return this rank's :class:`DistEnv`.

    World size 1: nothing is initialised; the returned env has ``backend=None`` and the resolved
    device. Otherwise: NCCL on CUDA (``cuda:LOCAL_RANK`` becomes the current device) or gloo on CPU.
    Idempotent: a second call returns the same env.
    """
    global _ENV
    if _ENV is not None and (_ENV.backend is None or dist.is_initialized()):
        return _ENV
    env = DistEnv.from_env(environ)
    kind = _requested_device(device)
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise DistributedError("device=cuda requested but no CUDA device is available")
        n = torch.cuda.device_count()
        if env.local_rank >= n:
            raise DistributedError(f"LOCAL_RANK={env.local_rank} but only {n} CUDA device(s) are visible; "
                                   "use --nproc_per_node <= number of GPUs")
        dev = torch.device("cuda", env.local_rank)
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    if not env.is_distributed:
        _ENV = DistEnv(**{**env.__dict__, "device": dev})
        return _ENV
    backend = "nccl" if kind == "cuda" else "gloo"
    if not dist.is_initialized():
        _import_group_defaults()
        kwargs: dict[str, Any] = {}
        if backend == "nccl":
            kwargs["device_id"] = dev  # binds the communicator eagerly (torch >= 2.3)
        dist.init_process_group(backend=backend, init_method="env://", rank=env.rank, world_size=env.world_size,
                                timeout=datetime.timedelta(seconds=timeout_s), **kwargs)
    _ENV = DistEnv(**{**env.__dict__, "backend": backend, "device": dev})
    if env.is_main:
        log.info("process group up: backend=%s world_size=%d", backend, env.world_size)
    return _ENV


def _import_group_defaults() -> None:
    """Import ``torch.distributed.nn`` while no process group exists.

    Its functions take ``group=group.WORLD`` as a default argument, evaluated when the module is first
    imported. DistributedDataParallel imports it lazily (DDP -> fsdp -> _shard -> reshard) on its first
    construction, i.e. after ``init_process_group``, so without this the defaults hold the live default
    group forever and :func:`cleanup` cannot free it (see there). Imported first, they hold None.
    """
    try:
        import torch.distributed.nn  # noqa: F401
    except ImportError:  # pragma: no cover - optional parts of torch.distributed missing
        pass


def cleanup() -> None:
    """Tear the process group down (if any); safe to call always, e.g. in a ``finally``.

    The group must really be freed here, not just deregistered: freeing it runs the backend's destructor,
    which joins gloo's worker threads (with the GIL released). A worker thread releases a finished
    collective, and with it the collective's tensors, only *after* the caller has been woken. When Python
    has already dropped such a tensor, torch keeps its Python object alive from C++, so that release takes
    the GIL. If it comes while the interpreter is finalizing (process exit), CPython ends the thread with
    ``pthread_exit``; the forced unwind runs into a noexcept destructor and the process aborts with
    "terminate called without an active exception" (SIGABRT), rarely, and more often on a loaded machine.
    Joining the worker threads before returning closes that window. A group that is still referenced
    after ``destroy_process_group`` (e.g. by a live DistributedDataParallel wrapper) is not freed; that is
    logged.
    """
    global _ENV
    if dist.is_available() and dist.is_initialized():
        group = weakref.ref(dist.group.WORLD)
        dist.destroy_process_group()
        if group() is not None:
            gc.collect()  # wrappers (DDP) that are only kept alive by reference cycles
        if group() is not None:
            exiting_on_error = sys.exc_info()[0] is not None
            (log.debug if exiting_on_error else log.warning)(
                "the default process group is still referenced after destroy_process_group() (e.g. by a live "
                "DistributedDataParallel wrapper), so its backend threads outlive cleanup(); drop those "
                "references before cleanup() to avoid an abort at interpreter exit")
    _ENV = None


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main() -> bool:
    """True on rank 0 (and in a single process): logs, checkpoints and metrics files are its job."""
    return get_rank() == 0


def barrier() -> None:
    """Wait for all ranks (no-op for one process)."""
    if _active():
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


def _comm_device() -> torch.device:
    if _active() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _reduce(x: torch.Tensor | float, op: Any, mean: bool) -> torch.Tensor | float:
    if not _active():
        return x
    is_tensor = isinstance(x, torch.Tensor)
    t = x.detach().clone() if is_tensor else torch.tensor(float(x), dtype=torch.float64)
    orig = t.device
    dev = _comm_device()
    if t.device != dev:
        t = t.to(dev)
    dist.all_reduce(t, op=op)
    if mean:
        t = t / dist.get_world_size()
    if t.device != orig:
        t = t.to(orig)
    return t if is_tensor else float(t.item())


def all_reduce_mean(x: torch.Tensor | float) -> torch.Tensor | float:
    """Mean over ranks. A tensor stays a tensor (no host sync; same device); a float returns a float.
    Returns the input unchanged for one process."""
    return _reduce(x, dist.ReduceOp.SUM if dist.is_available() else None, mean=True)


def all_reduce_sum(x: torch.Tensor | float) -> torch.Tensor | float:
    """Sum over ranks (tensor -> tensor, float -> float)."""
    return _reduce(x, dist.ReduceOp.SUM if dist.is_available() else None, mean=False)


def all_reduce_max(x: int | float | torch.Tensor) -> Any:
    """Max over ranks, e.g. to agree on the number of token-sized micro-batches. ints stay ints."""
    if not _active():
        return x
    if isinstance(x, torch.Tensor):
        return _reduce(x, dist.ReduceOp.MAX, mean=False)
    out = _reduce(float(x), dist.ReduceOp.MAX, mean=False)
    return int(out) if isinstance(x, int) else out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (small picklable metadata only, e.g. the run directory
    name: with a timestamped default name every rank must use rank 0's)."""
    if not _active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, device=_comm_device())
    return box[0]


def gather_objects(items: list) -> list:
    """Concatenate every rank's ``items`` list in rank order, on every rank (a collective: all ranks
    call it). Uses ``all_gather_object`` (pickle over the wire), so keep it to small metadata such as
    RNG states or ids; gather result arrays with :func:`gather_tensor`."""
    if not _active():
        return list(items)
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, list(items))
    return [x for part in out for x in part]


def gather_tensor(t: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's tensor along dim 0 in rank order, on every rank (lengths may differ;
    trailing dims and dtype must match). With :func:`shard_indices_for_eval` shards the result is in
    the original example order. Returned on the input's device."""
    if not _active():
        return t
    world = dist.get_world_size()
    dev = _comm_device()
    local = t.detach().to(dev).contiguous()
    n = torch.tensor([local.shape[0]], dtype=torch.long, device=dev)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    lens = [int(s.item()) for s in sizes]
    m = max(lens)
    if local.shape[0] < m:
        pad = torch.zeros((m - local.shape[0],) + tuple(local.shape[1:]), dtype=local.dtype, device=dev)
        local = torch.cat([local, pad])
    parts = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(parts, local)
    return torch.cat([p[:k] for p, k in zip(parts, lens)]).to(t.device)


def shard_indices_for_eval(n: int, world_size: int, rank: int) -> range:
    """Contiguous shard of ``range(n)`` for ``rank``: sizes differ by at most one (the first
    ``n % world_size`` ranks get one more); concatenating the shards in rank order gives ``range(n)``,
    so :func:`gather_tensor` of per-shard results is in the original order. No example is duplicated
    (a rank may get an empty shard when ``n < world_size``)."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise DistributedError(f"rank {rank} is outside [0, world_size={world_size})")
    base, rem = divmod(int(n), world_size)
    start = rank * base + min(rank, rem)
    return range(start, start + base + (1 if rank < rem else 0))


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside DDP / ``torch.compile`` wrappers (for saving, eval and attribute access)."""
    while isinstance(getattr(model, "module", None), torch.nn.Module):
        model = model.module
    return getattr(model, "_orig_mod", model)


# --------------------------------------------------------------------------------------------------
# Training sampler


@dataclass(frozen=True)
class ShardBatch:
    """One rank's part of one global batch.

    Attributes:
        step_in_epoch: index of the global batch in the epoch (same on every rank).
        indices: dataset indices to run (at least one; a padding example when ``n_real == 0``).
        mask: per index, True for a real example, False for padding (weight 0 in the loss).
        n_real: real examples on this rank.
        n_global: real examples in this global batch over all ranks (the loss denominator).
        world_size: number of ranks.
    """

    step_in_epoch: int
    indices: list[int]
    mask: list[bool]
    n_real: int
    n_global: int
    world_size: int

    @property
    def loss_scale(self) -> float:
        """``world_size / n_global``: multiply the *sum* of masked per-example losses by it; after
        DDP's gradient averaging the update is that of the global-batch mean."""
        return self.world_size / self.n_global


class ShardedSampler:
    """Disjoint per-rank shards of a seeded epoch permutation, aligned to global batches.

    Args:
        n: dataset size.
        world_size, rank: from :class:`DistEnv`.
        shuffle: permute each epoch with ``numpy.random.default_rng([seed, epoch])`` (same on all ranks).
        seed, epoch: permutation seed; call :meth:`set_epoch` every epoch.
        drop_last: drop the short last global batch instead of splitting it (see the module doc).
        batch_size: per-rank micro-batch size; the global batch is ``world_size * batch_size``.

    ``__iter__``/``__len__`` give this rank's real indices in order (what a ``DataLoader(sampler=...)``
    needs); :meth:`batches` gives :class:`ShardBatch` objects with padding masks and loss scales,
    identical step counts on every rank, and a ``start_step`` to resume mid-epoch.
    """

    def __init__(self, n: int, world_size: int = 1, rank: int = 0, shuffle: bool = True, seed: int = 0,
                 epoch: int = 0, drop_last: bool = False, batch_size: int = 1) -> None:
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise DistributedError(f"rank {rank} is outside [0, world_size={world_size})")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.n, self.world_size, self.rank = int(n), int(world_size), int(rank)
        self.shuffle, self.seed, self.epoch = bool(shuffle), int(seed), int(epoch)
        self.drop_last, self.batch_size = bool(drop_last), int(batch_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    @property
    def global_batch(self) -> int:
        return self.world_size * self.batch_size

    def permutation(self) -> np.ndarray:
        """The epoch's global example order (identical on all ranks)."""
        if self.shuffle:
            return np.random.default_rng([self.seed, self.epoch]).permutation(self.n)
        return np.arange(self.n)

    @property
    def num_steps(self) -> int:
        """Global batches per epoch (the same on every rank)."""
        if self.drop_last:
            return self.n // self.global_batch
        return math.ceil(self.n / self.global_batch)

    def batches(self, start_step: int = 0) -> Iterator[ShardBatch]:
        """This rank's batches from global batch ``start_step`` on (resume mid-epoch)."""
        perm = self.permutation()
        gb = self.global_batch
        for s in range(max(0, int(start_step)), self.num_steps):
            glob = perm[s * gb:(s + 1) * gb]
            mine = glob[self.rank::self.world_size].tolist()
            if mine:
                yield ShardBatch(s, mine, [True] * len(mine), len(mine), len(glob), self.world_size)
            else:  # short last batch: this rank pads with one zero-weight example to keep DDP in step
                yield ShardBatch(s, [int(glob[0])], [False], 0, len(glob), self.world_size)

    def __iter__(self) -> Iterator[int]:
        for b in self.batches():
            yield from (i for i, m in zip(b.indices, b.mask) if m)

    def __len__(self) -> int:
        gb = self.global_batch
        full, rem = divmod(self.n, gb)
        n = full * self.batch_size
        if not self.drop_last and rem:
            n += len(range(self.rank, rem, self.world_size))
        return n
