"""The training loop, readable top to bottom.

    cfg -> components (data, prompts, LLM + LoRA, MoME, SPAE) -> for each MPO stage:
        set active modalities and trainable parameters
        AdamW, linear warmup + cosine decay (per stage)
        for each optimizer step: grad_accum micro-batches (fresh candidates every epoch),
            optional curriculum (share of soft-token prompts ramps 0 -> 100%), clip, step, log
            periodic validation / checkpoints
        stage-end validation + checkpoint ``stage<i>``
    -> checkpoint ``final`` (+ ``best`` by validation)

MPO (Modality-aware Progressive Optimization): ``train.stages`` lists the stages; when it is
empty there is one stage per modality in ``features.modalities`` order, cumulative (``[text]``,
then ``[text, collab]``). A stage trains its modality experts (earlier experts too, unless
``freeze_previous_experts``), the gate and output norm, the SPAE tables, and LoRA when
``train_lora``. The ``verbose`` and ``titles`` paradigms have one stage and train LoRA only.

Production features (docs/production.md): under ``torchrun`` the model is wrapped in DDP per stage
(frozen base weights ignored, so a 4-bit base is never broadcast), each rank trains its shard of
every global batch (:class:`~speeder_fast.distributed.ShardedSampler`), losses are reduced over
ranks, and only rank 0 writes files. Checkpoints (:class:`~speeder_fast.checkpoint.CheckpointManager`)
hold weights, AdamW state, per-rank RNG, the data position and the stage, so ``train(...,
resume=True)`` continues exactly. A NaN/Inf loss stops the run (``NonFiniteLossError`` naming the
step) before it can reach a checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from speeder_fast.checkpoint import CheckpointManager, TrainState, capture_rng, mark_finished, restore_rng
from speeder_fast.config import Config, StageConfig, to_toml
from speeder_fast.distributed import (ShardedSampler, all_reduce_mean, all_reduce_sum, barrier, broadcast_object,
                                      gather_objects, init_distributed)
from speeder_fast.errors import CheckpointError, ConfigError, DataError, NonFiniteLossError, NonFiniteMonitor
from speeder_fast.utils import get_logger, seed_everything

from .run import (FEATURES_FILE, METRICS_FILE, Components, added_embedding_rows, build_components, check_resumable,
                  cut_metrics_log, load_features, make_run_dir, uses_mome, write_run_files)

log = get_logger("speeder_fast.training")


def resolve_stages(cfg: Config, available: list[str]) -> list[StageConfig]:
    """The MPO stages to run, restricted to ``available`` modalities (empty ones dropped, logged)."""
    if cfg.prompt.paradigm != "speeder":
        st = cfg.train.stages[0] if cfg.train.stages else StageConfig()
        # item mode: the next-item head's text-only MoME trains with LoRA
        mods = ["text"] if cfg.prompt.answer_mode == "item" and "text" in available else []
        return [dataclasses.replace(st, modalities=mods, curriculum_ramp=0.0)]
    stages = list(cfg.train.stages)
    if not stages:
        order = [m for m in cfg.features.modalities if m in available]
        stages = [StageConfig(modalities=order[: i + 1]) for i in range(len(order))]
    out = []
    for i, st in enumerate(stages):
        mods = [m for m in st.modalities if m in available]
        dropped = [m for m in st.modalities if m not in available]
        if dropped:
            log.info("stage %d: modalities %s absent from the data, skipped", i + 1, dropped)
        if not mods:
            log.info("stage %d: no modality left, stage skipped", i + 1)
            continue
        out.append(dataclasses.replace(st, modalities=mods))
    return out


def lora_parameters(comp: Components) -> list[torch.nn.Parameter]:
    """The LLM's LoRA parameters (the only trainable part of the LLM)."""
    return [p for n, p in comp.model.llm.named_parameters() if "lora_" in n]


def set_trainable(comp: Components, stage: StageConfig, seen: set[str]) -> list[torch.nn.Parameter]:
    """Set ``requires_grad`` for this stage and return the parameters to optimize."""
    model = comp.model
    for p in model.parameters():
        p.requires_grad_(False)
    params: list[torch.nn.Parameter] = []
    if stage.train_lora:
        params += lora_parameters(comp)
    if model.mome is not None:
        new = [m for m in stage.modalities if m not in seen]
        old = [m for m in stage.modalities if m in seen]
        params += model.mome.parameters_of(new)
        if not stage.freeze_previous_experts:
            params += model.mome.parameters_of(old)
        params += model.mome.shared_parameters()
    if model.positions is not None:
        params += list(model.positions.parameters())
    if model.item_head is not None:
        params += list(model.item_head.parameters())
    for p in params:
        p.requires_grad_(True)
    if not params:
        raise ConfigError("a training stage has nothing to train: LoRA is off (model.lora_r=0 or the stage's "
                          "train_lora=false) and there is no MoME/SPAE (paradigm verbose/titles)")
    return params


def param_groups(comp: Components, params: list[torch.nn.Parameter], adapter_lr_scale: float) -> list[dict]:
    """AdamW parameter groups: one group (as before) when ``adapter_lr_scale == 1``; otherwise LoRA
    parameters at the stage lr and the MoME/SPAE parameters at ``adapter_lr_scale`` x the stage lr
    (each group carries its ``lr_scale``; the schedule multiplies by it). Empty groups are dropped."""
    if adapter_lr_scale == 1.0:
        return [{"params": params, "lr_scale": 1.0}]
    lora = {id(p) for p in lora_parameters(comp)}
    groups = [{"params": [p for p in params if id(p) in lora], "lr_scale": 1.0},
              {"params": [p for p in params if id(p) not in lora], "lr_scale": float(adapter_lr_scale)}]
    return [g for g in groups if g["params"]]


def lr_at(step: int, total: int, peak: float, warmup_ratio: float, min_ratio: float = 0.1) -> float:
    """Linear warmup to ``peak`` then cosine decay to ``min_ratio * peak`` (step is 0-based)."""
    warm = max(1, int(round(warmup_ratio * total)))
    if step < warm:
        return peak * (step + 1) / warm
    t = (step - warm) / max(1, total - warm)
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


@dataclass
class TrainResult:
    run_dir: Path
    components: Components
    valid: dict | None  # last validation result
    seconds: float
    epoch_seconds: float  # mean wall time of one epoch over the training set (all stages)
    steps: int


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

    ``curriculum``: some stage mixes text-only prompts in (``hybrid_share < 1``); a token plan then
    costs every example at the longer of its soft-token and text-only prompt, so the budget holds
    whichever form the draw picks.
    """

    def __init__(self, comp: Components, batch_size: int, seed: int, world_size: int = 1, rank: int = 0,
                 max_tokens: int = 0, curriculum: bool = False) -> None:
        if max_tokens < 0:
            raise ValueError(f"train.max_tokens_per_batch must be >= 0, got {max_tokens}")
        self.comp = comp
        self.seed = seed
        self.world_size, self.rank = world_size, rank
        self.max_tokens = int(max_tokens)
        self.curriculum = bool(curriculum)
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
        return batch, sb.n_real * sb.loss_scale


def train(cfg: Config, run_dir: Path | None = None, progress: bool = True, prepared: Any = None,
          resume: bool = False) -> TrainResult:
    """Train per ``cfg``; returns the run folder and the trained components.

    ``prepared``: a :class:`PreparedData` to use instead of ``prepare(cfg.data)``. ``resume``:
    continue the run in ``run_dir`` from its newest valid checkpoint (same stage, step, data order,
    optimizer state and RNG; ``metrics.jsonl`` is cut back to that checkpoint's step); a run folder
    without any checkpoint yet starts from scratch in that folder. Under ``torchrun``
    (``WORLD_SIZE > 1``) it trains data-parallel; only rank 0 writes files.

    Raises:
        CheckpointError: ``run_dir`` is a checkpoint (a run never writes into one); with ``resume``, a
            folder that is neither a run folder nor holds a checkpoint, or only corrupt checkpoints.
    """
    from tqdm.auto import tqdm

    from speeder_fast.evaluate import evaluate_split

    t_start = time.perf_counter()
    world, rank, device_override = 1, 0, None
    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        env = init_distributed(cfg.device)
        world, rank, device_override = env.world_size, env.rank, env.device
    main = rank == 0
    progress = progress and main
    seed_everything(cfg.seed)
    if run_dir is None and main:
        run_dir = make_run_dir(cfg)
    run_dir = Path(broadcast_object(None if run_dir is None else str(run_dir)))
    if resume:
        check_resumable(run_dir)  # before anything is written: a checkpoint or a stray folder is refused
    else:
        from speeder_fast.checkpoint import refuse_checkpoint_dir

        refuse_checkpoint_dir(run_dir, "run folder")
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
    features = None
    if resume and uses_mome(cfg) and (run_dir / FEATURES_FILE).is_file():
        features = load_features(run_dir / FEATURES_FILE)  # the exact features the run started with
    comp = build_components(cfg, run_dir=run_dir if main else None, progress=progress, prepared=prepared,
                            device=device_override, features=features)
    if main:
        write_run_files(run_dir, comp)
    model, device, tc = comp.model, comp.device, cfg.train
    n_train = len(comp.prepared.train)
    if n_train == 0:
        raise DataError("no training examples (check data.max_users / data.max_train_examples)")
    metrics_f = None  # opened after the resume point is known (the log is cut back to it first)

    def log_json(rec: dict) -> None:
        if metrics_f is not None:
            metrics_f.write(json.dumps(rec, default=float) + "\n")
            metrics_f.flush()

    def validate(tag: str) -> dict:
        res = evaluate_split(model, comp.builder, comp.prepared, "valid", cfg.prompt.answer_mode, tc.eval_max_examples,
                             cfg.eval.batch_size, cfg.eval.generate_max_tokens, device, seed=cfg.seed, progress=progress,
                             constrained=cfg.eval.constrained)
        log_json({"type": "eval", "tag": tag, "global_step": global_step,
                  **{k: v for k, v in res.items() if not isinstance(v, (dict, list))}})
        if main:
            log.info("valid @ %s: VHR@1 %.4f  ValidRatio %.3f  NDCG@10 %s%s", tag, res.get("VHR@1", 0.0),
                     res.get("ValidRatio", 0.0), f"{res['NDCG@10']:.4f}" if "NDCG@10" in res else "n/a",
                     f"  full HR@10 {res['full_HR@10']:.4f} NDCG@10 {res['full_NDCG@10']:.4f}"
                     if "full_NDCG@10" in res else "")
        return res

    def key_metric(res: dict) -> float:  # best checkpoint: full-ranking NDCG@10 (item), candidate NDCG@10, VHR@1
        return res.get("full_NDCG@10", res.get("NDCG@10", res.get("VHR@1", 0.0)))

    stages = resolve_stages(cfg, comp.modalities)
    if main:
        log.info("run %s: %d training examples, %d process(es), %d stage(s): %s", run_dir, n_train, world, len(stages),
                 [s.modalities or [cfg.prompt.paradigm] for s in stages])
    curriculum = cfg.prompt.paradigm == "speeder" and any(st.curriculum_ramp > 0 for st in stages)
    stream = MicroBatches(comp, tc.batch_size, cfg.seed, world, rank, max_tokens=tc.max_tokens_per_batch,
                          curriculum=curriculum)
    micro_per_epoch = stream.steps_per_epoch  # token budget: epoch 0's plan (plans vary with the candidates)
    steps_per_epoch = math.ceil(micro_per_epoch / tc.grad_accum)
    if main and tc.max_tokens_per_batch > 0:
        log.info("token-budget micro-batches: <= %d prompt tokens per process (%s cost), epoch 0: %d global batches "
                 "(%.1f examples each on average)", tc.max_tokens_per_batch,
                 "padded" if stream.padded_cost else "packed", micro_per_epoch, n_train / max(1, micro_per_epoch))
    seen: set[str] = set()
    label_loss = cfg.prompt.answer_mode == "score" and tc.score_loss == "labels"
    global_step = 0
    best = -1.0
    last_valid: dict | None = None
    train_seconds = 0.0
    micro_done = 0
    monitor = NonFiniteMonitor(device)
    step_sleep = float(os.environ.get("SPEEDER_DEBUG_STEP_SLEEP", "0") or 0)
    mgr = CheckpointManager(run_dir, keep_last=tc.keep_checkpoints, clean_stale=main)
    config_text = to_toml(cfg)

    # ---- resume: weights, stream position, counters (optimizer + RNG below, once the stage is set up)
    rs: TrainState | None = None
    start_stage, start_step = 0, 0
    if resume:
        if main:
            rs = mgr.load_latest_valid(quarantine=True)
        barrier()
        if not main:
            rs = mgr.load_latest_valid()
        if rs is None:
            if main:  # check_resumable let it through: a run folder that had not saved a checkpoint yet
                log.info("resume: no checkpoint in run folder %s yet, starting it from scratch", run_dir)
                cut_metrics_log(run_dir, 0)
        else:
            weights = dict(rs.weights)
            weights.pop("added_embeddings", None)  # deterministic from the seed; rebuilt identically
            try:
                model.load_trainable_state_dict(weights)
            except KeyError as e:
                raise CheckpointError(f"{rs.path}: weights do not fit the model built from the config: {e}") from e
            ex = rs.extra
            global_step = rs.step
            best, last_valid = float(ex.get("best", -1.0)), ex.get("last_valid")
            train_seconds, micro_done = float(ex.get("train_seconds", 0.0)), int(ex.get("micro_done", 0))
            start_stage, start_step = rs.stage, int(ex.get("step_in_stage", 0))
            if ex.get("stage_done"):
                start_stage, start_step = start_stage + 1, 0
            stream.seek(int(rs.data.get("epoch", -1)), int(rs.data.get("step_in_epoch", 0)))
            if main:
                log.info("resuming %s from %s: global step %d, stage %d, step %d of the stage", run_dir, rs.path.name,
                         global_step, start_stage + 1, start_step)
                cut_metrics_log(run_dir, global_step)  # the steps after the checkpoint are trained again
    metrics_f = open(run_dir / METRICS_FILE, "a") if main else None

    opt: torch.optim.Optimizer | None = None
    stage_total = 0  # optimizer steps of the current stage (saved: token plans make it position-dependent)

    def snapshot(si: int, step_in_stage: int, stage_done: bool, stage: StageConfig) -> TrainState:
        """This moment as a TrainState (collective: every rank contributes its RNG state)."""
        rng = gather_objects([capture_rng()])
        weights = {**model.trainable_state_dict(), **added_embedding_rows(comp)}
        extra = {"step_in_stage": step_in_stage, "stage_done": stage_done, "stage_total": stage_total,
                 "best": best, "train_seconds": train_seconds,
                 "micro_done": micro_done, "active_modalities": list(stage.modalities), "world_size": world,
                 "last_valid": None if last_valid is None else
                 {k: v for k, v in last_valid.items() if not isinstance(v, (dict, list))}}
        return TrainState(step=global_step, stage=si - 1, weights=weights,
                          optimizer=None if (stage_done or opt is None) else opt.state_dict(),
                          data={**stream.position(), "global_step": global_step}, rng=rng, config_text=config_text,
                          extra=extra)

    def save(state: TrainState, metric: float | None = None, aliases: tuple[str, ...] = (),
             is_best: bool | None = None) -> None:
        monitor.check()  # never write a checkpoint of a diverged model
        if main:
            mgr.save(global_step, state, metric=metric, aliases=aliases, is_best=is_best, world_size=world)
        barrier()

    try:
        for si, stage in enumerate(stages, start=1):
            if si - 1 < start_stage:  # finished before the resume point
                seen.update(stage.modalities)
                continue
            # ---- stage setup: active modalities, trainable set, optimizer, step budget
            model.set_stage(stage.modalities)
            params = set_trainable(comp, stage, seen)
            seen.update(stage.modalities)
            opt = torch.optim.AdamW(param_groups(comp, params, tc.adapter_lr_scale), lr=stage.lr,
                                    weight_decay=tc.weight_decay, betas=(0.9, 0.999))
            first = 0
            if rs is not None and si - 1 == start_stage:
                first = start_step
                if rs.optimizer is not None and start_step > 0:
                    try:
                        opt.load_state_dict(rs.optimizer)
                    except (ValueError, KeyError) as e:
                        raise CheckpointError(f"{rs.path}: optimizer state does not fit stage {si}: {e}") from e
                if rank < len(rs.rng):
                    restore_rng(rs.rng[rank])
                else:
                    seed_everything(cfg.seed + rank)
            net: torch.nn.Module = model
            if world > 1:
                from torch.nn.parallel import DistributedDataParallel as DDP

                ignore = [n for n, p in model.named_parameters() if not p.requires_grad]
                ignore += [n for n, _ in model.named_buffers()]
                DDP._set_params_and_buffers_to_ignore_for_model(model, ignore)
                # find_unused_parameters: curriculum text-only batches leave MoME/SPAE without gradient
                net = DDP(model, device_ids=None, find_unused_parameters=True, broadcast_buffers=False)
            if tc.max_tokens_per_batch > 0:
                # token plans differ per epoch: count the real micro-batches of the stage's epochs from
                # where the stream is at the stage start (a resumed stage reuses the saved count)
                saved = rs.extra.get("stage_total") if (rs is not None and si - 1 == start_stage) else None
                if saved is not None and first > 0:
                    total = int(saved)
                else:
                    total = max(1, math.ceil(stream.micro_batches_ahead(stage.epochs) / tc.grad_accum))
                steps_per_epoch = math.ceil(stream.steps_per_epoch / tc.grad_accum)
            else:
                total = max(1, math.ceil(stage.epochs * steps_per_epoch))
            if stage.max_steps > 0:
                total = min(total, stage.max_steps)
            stage_total = total
            n_params = sum(p.numel() for p in params)
            if main:
                log.info("stage %d/%d %s: %d steps (%d per epoch), lr %.2g, %d trainable parameters", si, len(stages),
                         stage.modalities or cfg.prompt.paradigm, total, steps_per_epoch, stage.lr, n_params)
            model.train()
            bar = tqdm(range(first, total), desc=f"stage {si}/{len(stages)}", unit="step", disable=not progress,
                       dynamic_ncols=True, initial=first, total=total)
            t_stage = time.perf_counter()
            for step in bar:
                # ---- curriculum: share of soft-token (hybrid) prompts ramps from 0 to 1
                share = 1.0
                if stage.curriculum_ramp > 0 and cfg.prompt.paradigm == "speeder":
                    share = min(1.0, step / max(1.0, stage.curriculum_ramp * total))
                lr = lr_at(step, total, stage.lr, tc.warmup_ratio)
                for g in opt.param_groups:
                    g["lr"] = lr * g.get("lr_scale", 1.0)
                t0 = time.perf_counter()
                tokens = 0
                examples = 0  # real examples of the step over all ranks (global batches vary with a token budget)
                loss_acc = torch.zeros((), device=device)
                for k in range(tc.grad_accum):
                    batch, weight = stream.next(share)
                    tokens += batch.n_tokens
                    examples += stream.last_n_global
                    sync = contextlib.nullcontext() if (world == 1 or k == tc.grad_accum - 1) else net.no_sync()
                    with sync:
                        loss = net(batch.to(device), label_loss=label_loss) * (weight / tc.grad_accum)
                        loss.backward()
                    loss_acc += loss.detach()
                    micro_done += 1
                gnorm = torch.nn.utils.clip_grad_norm_(params, tc.grad_clip) if tc.grad_clip > 0 else None
                opt.step()
                opt.zero_grad(set_to_none=True)
                global_step += 1
                if step_sleep > 0:  # debug/test hook: slow the run down to interrupt it at a chosen point
                    time.sleep(step_sleep)
                loss_g = all_reduce_mean(loss_acc)  # the global-batch mean loss
                monitor.update(loss_g, global_step)
                dt = time.perf_counter() - t0
                train_seconds += dt
                if global_step % max(1, tc.log_every) == 0 or step == total - 1:
                    monitor.check()
                    # every rank's own token count (ranks differ in tokens; collective on every rank alike)
                    tokens_g = int(all_reduce_sum(float(tokens))) if world > 1 else tokens
                    rec = {"type": "train", "stage": si, "step": step + 1, "global_step": global_step,
                           "epoch": stream.epoch + stream.step_in_epoch / max(1, stream.steps_per_epoch),
                           "loss": float(loss_g), "lr": lr, "tokens": tokens_g, "examples": examples,
                           "tokens_per_s": tokens_g / dt, "hybrid_share": share,
                           "grad_norm": None if gnorm is None else float(gnorm)}
                    log_json(rec)
                    bar.set_postfix(loss=f"{rec['loss']:.4f}", tok_s=f"{rec['tokens_per_s']:.0f}", lr=f"{lr:.1e}")
                metric = None
                if tc.eval_every > 0 and global_step % tc.eval_every == 0 and step != total - 1:
                    monitor.check()
                    last_valid = validate(f"step{global_step}")
                    metric = key_metric(last_valid)
                    best = max(best, metric)
                    model.train()
                if metric is not None or (tc.checkpoint_every > 0 and global_step % tc.checkpoint_every == 0):
                    save(snapshot(si, step + 1, False, stage), metric=metric, is_best=None if metric is not None else False)
            bar.close()
            if main:
                log.info("stage %d done in %.1f s", si, time.perf_counter() - t_stage)
            # ---- stage end: validation + checkpoint (step-N + alias stage<i>, + best by metric)
            monitor.check()
            last_valid = validate(f"stage{si}")
            metric = key_metric(last_valid)
            best = max(best, metric)
            save(snapshot(si, total, True, stage), metric=metric, aliases=(f"stage{si}",))
            model.train()
            del net
        save(snapshot(len(stages), 0, True, stages[-1]), metric=None, aliases=("final",), is_best=False)
    except NonFiniteLossError as e:
        last = mgr.latest()
        raise NonFiniteLossError(e.step, e.value, hint=(
            f"the last good checkpoint is {last} (nothing was saved after the bad step); lower the stage lr or set "
            f"train.grad_clip > 0 and continue with --resume {run_dir}" if last is not None else
            "no checkpoint was written before it; lower the stage lr or set train.grad_clip > 0")) from None
    finally:
        if metrics_f is not None:
            metrics_f.close()
    model.set_stage(stages[-1].modalities)
    model.eval()
    if tc.max_tokens_per_batch > 0:  # the stream's position in epochs (token plans differ in length per epoch)
        epochs_done = max(0.0, stream.epoch + stream.step_in_epoch / max(1, stream.steps_per_epoch))
    else:
        epochs_done = micro_done / micro_per_epoch
    epoch_seconds = train_seconds / epochs_done if epochs_done else 0.0
    seconds = time.perf_counter() - t_start
    summary = {"train_seconds": train_seconds, "total_seconds": seconds, "epochs": epochs_done,
               "epoch_seconds": epoch_seconds, "steps": global_step, "n_train": n_train, "device": str(device),
               "world_size": world, "torch_threads": torch.get_num_threads(), "valid": last_valid,
               "features": comp.feature_info, "resumed": rs is not None}
    if main:
        from speeder_fast.utils import atomic_write_json

        atomic_write_json(run_dir / "train_summary.json", summary)
        mark_finished(run_dir, {k: v for k, v in summary.items() if k != "features"})
    barrier()
    return TrainResult(run_dir, comp, last_valid, seconds, epoch_seconds, global_step)
