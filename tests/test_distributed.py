"""Distributed helpers: env parsing, sampler sharding, eval gather order, and a real 2-process gloo job
whose DDP loss trajectory matches a single process with the same global batch (the loop's pattern)."""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from speeder_fast import distributed as D
from speeder_fast.checkpoint import CheckpointManager, TrainState, capture_rng, restore_rng
from speeder_fast.errors import DistributedError

N_TRAIN, GLOBAL_BATCH, EPOCHS, SAVE_AT = 33, 8, 2, 4  # 33 = 4 full global batches + 1 single example


# ---------------------------------------------------------------------------------------------- unit


def test_env_single_process_defaults():
    env = D.DistEnv.from_env({})
    assert (env.rank, env.world_size, env.local_rank, env.is_main, env.is_distributed) == (0, 1, 0, True, False)
    env = D.DistEnv.from_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
                              "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500"})
    assert (env.rank, env.world_size, env.local_rank, env.master_port, env.is_main) == (3, 4, 1, 29500, False)


def test_init_distributed_world_one_is_noop():
    env = D.init_distributed("cpu", environ={})
    try:
        assert env.backend is None and env.device == torch.device("cpu") and not torch.distributed.is_initialized()
        assert D.is_main() and D.get_world_size() == 1
        assert D.all_reduce_mean(2.5) == 2.5 and D.gather_objects([1, 2]) == [1, 2] and D.all_reduce_max(3) == 3
        t = torch.arange(3)
        assert D.gather_tensor(t) is t and D.broadcast_object("x") == "x"
        D.barrier()
    finally:
        D.cleanup()


@pytest.mark.parametrize("n,world,bs,drop_last", [(33, 2, 4, False), (33, 2, 4, True), (10, 3, 2, False),
                                                  (2, 4, 1, False), (0, 2, 3, False), (64, 4, 4, False)])
def test_sampler_disjoint_cover_equal_steps(n, world, bs, drop_last):
    samplers = [D.ShardedSampler(n, world, r, shuffle=True, seed=5, epoch=1, drop_last=drop_last, batch_size=bs)
                for r in range(world)]
    plans = [list(s.batches()) for s in samplers]
    assert len({len(p) for p in plans}) == 1 and len(plans[0]) == samplers[0].num_steps  # same steps per rank
    real = [[i for b in p for i, m in zip(b.indices, b.mask) if m] for p in plans]
    flat = [i for r in real for i in r]
    assert len(flat) == len(set(flat))  # disjoint, no duplicate real examples
    expected = n - (n % (world * bs) if drop_last else 0)
    assert len(flat) == expected and set(flat) <= set(range(n))
    for r in range(world):
        assert list(samplers[r]) == real[r] and len(samplers[r]) == len(real[r])
    perm = samplers[0].permutation()
    for step in range(samplers[0].num_steps):  # each global batch = the single-process batch, same n_global
        glob = perm[step * world * bs:(step + 1) * world * bs]
        got = sorted(i for p in plans for i, m in zip(p[step].indices, p[step].mask) if m)
        assert got == sorted(glob.tolist())
        assert all(p[step].n_global == len(glob) and len(p[step].indices) >= 1 for p in plans)


def test_sampler_epochs_and_resume():
    s = D.ShardedSampler(20, 2, 1, shuffle=True, seed=0, batch_size=3)
    e0 = list(s)
    s.set_epoch(1)
    assert list(s) != e0 and sorted(list(s)) != [] and set(list(s)).isdisjoint(
        set(D.ShardedSampler(20, 2, 0, shuffle=True, seed=0, epoch=1, batch_size=3)))
    full = list(s.batches())
    assert list(s.batches(start_step=2)) == full[2:]
    assert list(D.ShardedSampler(5, 1, 0, shuffle=False)) == [0, 1, 2, 3, 4]


def test_eval_shards_contiguous_in_order():
    for n, world in [(10, 3), (2, 4), (0, 2), (7, 1), (100, 8)]:
        shards = [D.shard_indices_for_eval(n, world, r) for r in range(world)]
        assert [i for s in shards for i in s] == list(range(n))
        assert max(map(len, shards)) - min(map(len, shards)) <= 1
    with pytest.raises(DistributedError, match="rank 2 is outside"):
        D.shard_indices_for_eval(5, 2, 2)


# ---------------------------------------------------------------------------------- 2-process job


def _data():
    g = torch.Generator().manual_seed(123)
    x = torch.randn(N_TRAIN, 5, generator=g)
    y = x @ torch.randn(5, 1, generator=g) + 0.1 * torch.randn(N_TRAIN, 1, generator=g)
    return x, y


def _fit(world: int, rank: int, mgr: CheckpointManager | None = None, save_at: int = 0, resume: bool = False):
    """The training pattern the loop follows: ShardedSampler + masked loss * loss_scale + DDP."""
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 1)
    net = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    torch.manual_seed(100 + rank)  # per-rank RNG streams (e.g. dropout) must be saved per rank
    opt = torch.optim.AdamW(net.parameters(), lr=0.05, weight_decay=0.01)
    x, y = _data()
    sampler = D.ShardedSampler(N_TRAIN, world, rank, shuffle=True, seed=3, batch_size=GLOBAL_BATCH // world)
    start_epoch = start_step = gstep = 0
    probe = None
    if resume:
        st = mgr.load_latest_valid()
        model.load_state_dict(st.weights)
        opt.load_state_dict(st.optimizer)
        restore_rng(st.rng[rank])
        probe = torch.rand(3).tolist()  # must equal what this rank drew right after capture
        start_epoch, start_step, gstep = st.data["epoch"], st.data["step_in_epoch"], st.data["global_step"]
    losses = []
    for epoch in range(start_epoch, EPOCHS):
        sampler.set_epoch(epoch)
        for b in sampler.batches(start_step if epoch == start_epoch else 0):
            idx = torch.tensor(b.indices)
            mask = torch.tensor(b.mask, dtype=torch.float32)
            per_example = ((net(x[idx]) - y[idx]) ** 2).squeeze(1)
            loss = (per_example * mask).sum() * b.loss_scale
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(D.all_reduce_mean(loss.detach())))  # == mean over the global batch
            gstep += 1
            if gstep == save_at:
                rng = D.gather_objects([capture_rng()])  # collective: every rank
                if D.is_main():
                    mgr.save(gstep, TrainState(step=gstep, weights=dict(model.state_dict()), optimizer=opt.state_dict(),
                                               data={"epoch": epoch, "step_in_epoch": b.step_in_epoch + 1,
                                                     "global_step": gstep}, rng=rng), world_size=world)
                probe = torch.rand(3).tolist()
                D.barrier()
    return losses, [p.detach().clone() for p in model.parameters()], probe


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                       "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    env = D.init_distributed("cpu", timeout_s=60)
    try:
        assert env.backend == "gloo" and env.world_size == world and D.get_rank() == rank
        mgr = CheckpointManager(Path(out_dir) / "run", keep_last=2, clean_stale=D.is_main())
        losses, params, probe_saved = _fit(world, rank, mgr, save_at=SAVE_AT)
        torch.manual_seed(999)  # a restarted process would have a different RNG
        res_losses, res_params, probe_loaded = _fit(world, rank, mgr, resume=True)
        # Sharded evaluation: contiguous shards gather back in the original order (one shard empty).
        gathered = {}
        for n in (11, 1):
            shard = D.shard_indices_for_eval(n, world, rank)
            local = torch.tensor([[i, i * i] for i in shard], dtype=torch.float32).reshape(-1, 2)
            gathered[n] = D.gather_tensor(local).tolist()
        result = {
            "losses": losses, "params": [p.flatten().tolist() for p in params],
            "resumed_losses": res_losses, "resumed_params": [p.flatten().tolist() for p in res_params],
            "probe_saved": probe_saved, "probe_loaded": probe_loaded, "gathered": gathered,
            "objects": D.gather_objects([f"r{rank}"]), "mean": D.all_reduce_mean(float(rank)),
            "max": D.all_reduce_max(rank), "bcast": D.broadcast_object(f"run-{rank}"),
            "tensor_mean": D.all_reduce_mean(torch.tensor([float(rank), 2.0])).tolist(),
        }
        (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        D.cleanup()
    (Path(out_dir) / f"rank{rank}.threads.json").write_text(json.dumps(_backend_threads()))


def _backend_threads() -> list[str] | None:
    """Names of this process's gloo threads (worker ``pt_gloo_runloop``, I/O ``gloo_tcp_loop``) that are
    alive; None where /proc cannot tell."""
    task = Path(f"/proc/{os.getpid()}/task")
    if not task.is_dir():
        return None
    names = []
    for t in task.iterdir():
        try:
            names.append((t / "comm").read_text().strip())
        except OSError:  # the thread ended meanwhile
            continue
    return sorted(n for n in names if "gloo" in n)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_processes_match_single_process(tmp_path):
    world = 2
    ctx = torch.multiprocessing.start_processes(_worker, args=(world, _free_port(), str(tmp_path)), nprocs=world,
                                                join=False, start_method="spawn")
    deadline = time.time() + 120
    while not ctx.join(timeout=1):
        if time.time() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("2-process gloo job did not finish in 120 s")
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world)]
    for r in range(world):
        # cleanup() freed the group: gloo's worker threads were joined before the process exits (a worker
        # still releasing a collective's tensors at interpreter exit aborts the process with SIGABRT)
        threads = json.loads((tmp_path / f"rank{r}.threads.json").read_text())
        assert threads in (None, []), f"rank {r}: gloo threads alive after cleanup(): {threads}"

    ref_losses, ref_params, _ = _fit(1, 0)  # one process, global batch 8, same data order
    steps = EPOCHS * -(-N_TRAIN // GLOBAL_BATCH)
    assert len(ref_losses) == steps == len(results[0]["losses"]) == len(results[1]["losses"])
    for r in results:  # identical loss trajectory (the logged value is the global-batch mean)
        np.testing.assert_allclose(r["losses"], ref_losses, rtol=0, atol=1e-5)
        for got, want in zip(r["params"], ref_params):
            np.testing.assert_allclose(got, want.flatten().numpy(), rtol=0, atol=1e-5)
    assert ref_losses[0] != pytest.approx(ref_losses[-1])  # it actually trained

    # Distributed resume from the step-4 checkpoint continues the trajectory exactly.
    for r in results:
        assert r["resumed_losses"] == r["losses"][SAVE_AT:]
        assert r["resumed_params"] == r["params"]
        assert r["probe_loaded"] == r["probe_saved"]  # each rank got its own RNG state back
    assert results[0]["probe_saved"] != results[1]["probe_saved"]
    ck = tmp_path / "run" / "checkpoints" / f"step-{SAVE_AT:08d}"
    assert (ck / "rng" / "rank0.json").read_text() != (ck / "rng" / "rank1.json").read_text()
    assert json.loads((ck / "trainer_state.json").read_text())["world_size"] == 2

    for r in results:  # eval gather order (n=1 leaves rank 1 with an empty shard), small collectives
        assert r["gathered"]["11"] == [[i, i * i] for i in range(11)] and r["gathered"]["1"] == [[0, 0]]
        assert r["objects"] == ["r0", "r1"] and r["mean"] == 0.5 and r["max"] == 1 and r["bcast"] == "run-0"
        assert r["tensor_mean"] == [0.5, 2.0]
