"""The training loop, read top to bottom (:func:`train`)::

    run = start_run(cfg, ...)                  processes, run folder, components, data stream
    progress = resume_point(run)               TrainProgress: fresh, or from the newest valid checkpoint
    for each MPO stage:
        ctx = setup_stage(run, progress, ...)  active modalities, trainable set, AdamW, schedule, loss
        for each optimizer step:
            train_step(ctx, step, grad_accum micro-batches)       (speeder_fast.training.step)
            log; every train.eval_every steps evaluate_and_checkpoint, every checkpoint_every a checkpoint
        evaluate_and_checkpoint(..., "stage<i>")                 validation + checkpoint stage<i> (+ best)
    checkpoint "final"

MPO (Modality-aware Progressive Optimization): ``train.stages`` lists the stages; when it is
empty there is one stage per modality in ``features.modalities`` order, cumulative (``[text]``,
then ``[text, collab]``). A stage trains its modality experts (earlier experts too, unless
``freeze_previous_experts``), the gate and output norm, the SPAE tables, and LoRA when
``train_lora``. The ``verbose`` and ``titles`` paradigms have one stage and train LoRA only.
Micro-batches come from :class:`~speeder_fast.training.batches.MicroBatches` (fresh candidates every
epoch, optional curriculum: the share of soft-token prompts ramps from 0 to 100% over
``curriculum_ramp`` of a stage, optional token budget).

State: :class:`TrainProgress` holds the counters (step, stage, step in stage, best metric, timings,
micro-batches done); :func:`checkpoint_state` writes it with the weights, AdamW state, per-rank RNG and
the stream position, :func:`restore_progress` reads it back: the one place a checkpoint is made or read.

Production features (docs/production.md): under ``torchrun`` the model is wrapped in DDP per stage
(frozen base weights ignored, so a 4-bit base is never broadcast), each rank trains its shard of
every global batch (:class:`~speeder_fast.distributed.ShardedSampler`), losses are reduced over
ranks, and only rank 0 writes files. Checkpoints (:class:`~speeder_fast.checkpoint.CheckpointManager`)
hold weights, AdamW state, per-rank RNG, the data position and the stage, so ``train(...,
resume=True)`` continues exactly. A NaN/Inf loss stops the run (``NonFiniteLossError`` naming the
step) before it can reach a checkpoint. ``best`` and ``final`` checkpoints also hold the LoRA adapter
in peft's own format (``adapter/``); ``train.report_to=tensorboard`` adds TensorBoard event files.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from speeder_fast.checkpoint import CheckpointManager, TrainState, capture_rng, mark_finished, restore_rng
from speeder_fast.config import Config, StageConfig, to_toml
from speeder_fast.distributed import (all_reduce_mean, all_reduce_sum, barrier, broadcast_object, gather_objects,
                                      init_distributed)
from speeder_fast.errors import CheckpointError, DataError, NonFiniteLossError, NonFiniteMonitor
from speeder_fast.utils import get_logger, seed_everything

from .batches import MicroBatches
from .run import (COLLAB_FOLDS_FILE, FEATURES_FILE, METRICS_FILE, Components, added_embedding_rows, build_components,
                  check_resumable, cut_metrics_log, export_adapter, load_collab_folds, load_features, make_run_dir,
                  uses_mome, write_run_files)
from .step import StepContext, StepStats, lr_at, prepare_stage, train_step

log = get_logger("speeder_fast.training")

__all__ = ["MetricsLog", "Run", "TrainProgress", "TrainResult", "evaluate_and_checkpoint", "key_metric", "lr_at",
           "resolve_stages", "resume_point", "setup_stage", "start_run", "train"]

#: TensorBoard event files of a run (``train.report_to=tensorboard``)
TENSORBOARD_DIR = "tensorboard"
_TB_UNSAFE = re.compile(r"[^-/.\w]")  # characters TensorBoard tags do not take (NDCG@10 -> NDCG_10)


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


def key_metric(res: dict) -> float:
    """The validation metric that picks ``checkpoints/best``: full-ranking NDCG@10 (item mode), else
    candidate NDCG@10, else VHR@1 (generate mode)."""
    return res.get("full_NDCG@10", res.get("NDCG@10", res.get("VHR@1", 0.0)))


def hybrid_share(cfg: Config, stage: StageConfig, step: int, total: int) -> float:
    """Curriculum: the share of soft-token (hybrid) prompts at ``step`` of ``total``, ramping from 0 to 1
    over ``stage.curriculum_ramp`` of the stage (speeder paradigm; 1 otherwise)."""
    if stage.curriculum_ramp > 0 and cfg.prompt.paradigm == "speeder":
        return min(1.0, step / max(1.0, stage.curriculum_ramp * total))
    return 1.0


@dataclass
class TrainResult:
    """What :func:`train` returns: the run folder, the trained components (model in eval mode, the last
    stage's modalities active), the last validation, and timings."""

    run_dir: Path
    components: Components
    valid: dict | None  # last validation result
    seconds: float  # wall time of train(): setup, training steps, validation and checkpoints
    epoch_seconds: float  # training-step time per epoch over the training set (validation excluded)
    steps: int
    epochs: float = 0.0  # epochs of the training set the steps covered


@dataclass
class TrainProgress:
    """Where a run is: the counters a checkpoint stores next to the weights, the optimizer state, the
    per-rank RNG and the stream position (:func:`checkpoint_state` / :func:`restore_progress`).

    Attributes:
        global_step: optimizer steps done over all stages.
        stage: 0-based index of the current MPO stage.
        step_in_stage: optimizer steps done in the current stage.
        stage_done: the current stage is complete (its end-of-stage checkpoint).
        stage_total: optimizer steps of the current stage (0 = unknown; token plans make it depend on
            where the stream is, so a stage resumed mid-way reuses the saved count).
        best: best validation :func:`key_metric` so far (-1 before any validation).
        last_valid: the last validation's metrics, or None.
        train_seconds: wall time inside optimizer steps (validation and checkpoints excluded).
        micro_done: micro-batches trained.
    """

    global_step: int = 0
    stage: int = 0
    step_in_stage: int = 0
    stage_done: bool = False
    stage_total: int = 0
    best: float = -1.0
    last_valid: dict | None = None
    train_seconds: float = 0.0
    micro_done: int = 0


class MetricsLog:
    """The run's training curves: ``RUN/metrics.jsonl`` (one JSON object per line) and, with
    ``train.report_to=tensorboard``, the same numbers as TensorBoard scalars in ``RUN/tensorboard/``
    (``train/loss``, ``eval/NDCG_10``, ... at the global step). Rank 0 only (``enabled``).

    Without the ``tensorboard`` package one log line says so and the run goes on with the JSONL only.
    ``purge_step`` (a resumed run's checkpoint step) makes TensorBoard drop the interrupted run's
    events after it, as ``metrics.jsonl`` is cut back.
    """

    def __init__(self, run_dir: Path, enabled: bool, report_to: str = "none", purge_step: int | None = None) -> None:
        self.file = open(run_dir / METRICS_FILE, "a") if enabled else None
        self.tb = None
        if enabled and report_to == "tensorboard":
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                log.warning("train.report_to=tensorboard: the tensorboard package is not installed (pip install "
                            "tensorboard); training curves go to %s only", run_dir / METRICS_FILE)
            else:
                self.tb = SummaryWriter(log_dir=str(run_dir / TENSORBOARD_DIR), purge_step=purge_step)

    def write(self, rec: dict) -> None:
        """Append one record (``type`` train | eval, ``global_step``, numbers)."""
        if self.file is not None:
            self.file.write(json.dumps(rec, default=float) + "\n")
            self.file.flush()
        if self.tb is not None:
            for k, v in rec.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("global_step", "step", "stage"):
                    self.tb.add_scalar(rec["type"] + "/" + _TB_UNSAFE.sub("_", k), v, rec["global_step"])
            self.tb.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.tb is not None:
            self.tb.close()


@dataclass
class Run:
    """One training run in progress (made by :func:`start_run`)."""

    cfg: Config
    comp: Components
    run_dir: Path
    world: int
    rank: int
    stages: list[StageConfig]
    stream: MicroBatches
    micro_per_epoch: int  # micro-batches of epoch 0 (token plans vary per epoch with the candidates)
    ckpt: CheckpointManager
    monitor: NonFiniteMonitor
    show_progress: bool
    config_text: str
    metrics: MetricsLog | None = None
    resumed: TrainState | None = None  # the checkpoint resumed from, until its stage is set up
    resumed_from: Path | None = None  # that checkpoint's folder (kept for the summary)

    @property
    def main(self) -> bool:
        return self.rank == 0


def start_run(cfg: Config, run_dir: Path | None, progress: bool, prepared: Any, resume: bool) -> Run:
    """Processes (torchrun), the run folder (checked: never a checkpoint), components, run files, the
    MPO stages and the micro-batch stream."""
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
    features = collab_folds = None
    if resume and uses_mome(cfg) and (run_dir / FEATURES_FILE).is_file():
        features = load_features(run_dir / FEATURES_FILE)  # the exact features the run started with
        if cfg.features.sasrec_crossfit >= 2:  # and the cross-fitted tables it trained with
            collab_folds = load_collab_folds(run_dir / COLLAB_FOLDS_FILE)
    comp = build_components(cfg, run_dir=run_dir if main else None, progress=progress, prepared=prepared,
                            device=device_override, features=features, collab_folds=collab_folds)
    if main:
        write_run_files(run_dir, comp)
    tc = cfg.train
    n_train = len(comp.prepared.train)
    if n_train == 0:
        raise DataError("no training examples (check data.max_users / data.max_train_examples)")
    stages = resolve_stages(cfg, comp.modalities)
    if main:
        log.info("run %s: %d training examples, %d process(es), %d stage(s): %s", run_dir, n_train, world, len(stages),
                 [s.modalities or [cfg.prompt.paradigm] for s in stages])
    curriculum = cfg.prompt.paradigm == "speeder" and any(st.curriculum_ramp > 0 for st in stages)
    stream = MicroBatches(comp, tc.batch_size, cfg.seed, world, rank, max_tokens=tc.max_tokens_per_batch,
                          curriculum=curriculum)
    micro_per_epoch = stream.steps_per_epoch
    if main and tc.max_tokens_per_batch > 0:
        log.info("token-budget micro-batches: <= %d prompt tokens per process (%s cost), epoch 0: %d global batches "
                 "(%.1f examples each on average)", tc.max_tokens_per_batch,
                 "padded" if stream.padded_cost else "packed", micro_per_epoch, n_train / max(1, micro_per_epoch))
    return Run(cfg, comp, run_dir, world, rank, stages, stream, micro_per_epoch,
               CheckpointManager(run_dir, keep_last=tc.keep_checkpoints, clean_stale=main,
                                 export=lambda d: export_adapter(comp.model, d)),
               NonFiniteMonitor(comp.device), progress, to_toml(cfg))


# ------------------------------------------------------------------ the one place checkpoints are made and read
def checkpoint_state(run: Run, state: TrainProgress, stage: StageConfig,
                     optimizer: torch.optim.Optimizer | None) -> TrainState:
    """This moment as a :class:`TrainState`: trainable weights (+ added-token embedding rows), AdamW
    state (None at a stage end), every rank's RNG (a collective: call it on every rank), the stream
    position, the config and the :class:`TrainProgress` counters."""
    rng = gather_objects([capture_rng()])
    weights = {**run.comp.model.trainable_state_dict(), **added_embedding_rows(run.comp)}
    lv = state.last_valid
    extra = {"step_in_stage": state.step_in_stage, "stage_done": state.stage_done, "stage_total": state.stage_total,
             "best": state.best, "train_seconds": state.train_seconds, "micro_done": state.micro_done,
             "active_modalities": list(stage.modalities), "world_size": run.world,
             "last_valid": None if lv is None else {k: v for k, v in lv.items() if not isinstance(v, (dict, list))}}
    return TrainState(step=state.global_step, stage=state.stage, weights=weights,
                      optimizer=None if (state.stage_done or optimizer is None) else optimizer.state_dict(),
                      data={**run.stream.position(), "global_step": state.global_step}, rng=rng,
                      config_text=run.config_text, extra=extra)


def restore_progress(run: Run, rs: TrainState) -> TrainProgress:
    """Load checkpoint ``rs`` into the run: trainable weights, the stream position; returns the
    :class:`TrainProgress` to continue from (the next stage's start when ``rs`` ended a stage). The
    optimizer state and RNG are restored by :func:`setup_stage` once the stage's optimizer exists.

    Raises:
        CheckpointError: the weights do not fit the model built from the config.
    """
    weights = dict(rs.weights)
    weights.pop("added_embeddings", None)  # deterministic from the seed; rebuilt identically
    try:
        run.comp.model.load_trainable_state_dict(weights)
    except KeyError as e:
        raise CheckpointError(f"{rs.path}: weights do not fit the model built from the config: {e}") from e
    ex = rs.extra
    state = TrainProgress(global_step=rs.step, stage=rs.stage, step_in_stage=int(ex.get("step_in_stage", 0)),
                          stage_total=int(ex.get("stage_total") or 0), best=float(ex.get("best", -1.0)),
                          last_valid=ex.get("last_valid"), train_seconds=float(ex.get("train_seconds", 0.0)),
                          micro_done=int(ex.get("micro_done", 0)))
    if ex.get("stage_done"):
        state.stage, state.step_in_stage, state.stage_total = state.stage + 1, 0, 0
    run.stream.seek(int(rs.data.get("epoch", -1)), int(rs.data.get("step_in_epoch", 0)))
    return state


def resume_point(run: Run) -> TrainProgress:
    """Continue from the run folder's newest valid checkpoint (corrupt ones quarantined by rank 0;
    ``metrics.jsonl`` cut back to its step), or from scratch when it has none yet."""
    rs = run.ckpt.load_latest_valid(quarantine=True) if run.main else None
    barrier()
    if not run.main:
        rs = run.ckpt.load_latest_valid()
    if rs is None:
        if run.main:  # check_resumable let it through: a run folder that had not saved a checkpoint yet
            log.info("resume: no checkpoint in run folder %s yet, starting it from scratch", run.run_dir)
            cut_metrics_log(run.run_dir, 0)
        return TrainProgress()
    state = restore_progress(run, rs)
    run.resumed, run.resumed_from = rs, rs.path
    if run.main:
        log.info("resuming %s from %s: global step %d, stage %d, step %d of the stage", run.run_dir, rs.path.name,
                 state.global_step, state.stage + 1, state.step_in_stage)
        cut_metrics_log(run.run_dir, state.global_step)  # the steps after the checkpoint are trained again
    return state


def save_checkpoint(run: Run, state: TrainProgress, stage: StageConfig, optimizer: torch.optim.Optimizer | None,
                    metric: float | None = None, aliases: tuple[str, ...] = (), is_best: bool | None = None) -> None:
    """Write ``checkpoints/step-<global step>`` (+ aliases; + ``best`` by ``metric``); rank 0 writes, every
    rank contributes its RNG. Never a checkpoint of a diverged model (NaN/Inf raises first)."""
    run.monitor.check()
    ts = checkpoint_state(run, state, stage, optimizer)
    if run.main:
        run.ckpt.save(state.global_step, ts, metric=metric, aliases=aliases, is_best=is_best, world_size=run.world)
    barrier()


# ------------------------------------------------------------------ stages, steps, validation
def setup_stage(run: Run, state: TrainProgress, index: int, stage: StageConfig, seen: set[str]) -> StepContext:
    """Set stage ``index`` up: its length, active modalities, trainable set, AdamW and schedule
    (:func:`~speeder_fast.training.step.prepare_stage`); in the stage a resumed run continues, the saved
    optimizer state and RNG; under torchrun a DDP wrapper. ``state`` moves to the stage's start (or
    keeps the resume point) and gets the stage's step count."""
    tc, stream, comp = run.cfg.train, run.stream, run.comp
    rs, run.resumed = run.resumed, None
    if rs is None:
        state.stage, state.step_in_stage, state.stage_done, state.stage_total = index, 0, False, 0
    per_epoch = math.ceil(stream.steps_per_epoch / tc.grad_accum)
    if tc.max_tokens_per_batch > 0:
        # token plans differ per epoch: count the real micro-batches of the stage's epochs from where the
        # stream is at the stage start (a stage resumed mid-way reuses the saved count)
        if rs is not None and state.step_in_stage > 0 and state.stage_total > 0:
            total = state.stage_total
        else:
            total = max(1, math.ceil(stream.micro_batches_ahead(stage.epochs) / tc.grad_accum))
    else:
        total = max(1, math.ceil(stage.epochs * per_epoch))
    if stage.max_steps > 0:
        total = min(total, stage.max_steps)
    state.stage_total = total
    ctx = prepare_stage(comp, stage, total, seen)
    seen.update(stage.modalities)
    if rs is not None:  # the stage the run resumes in: optimizer state and RNG as saved
        if rs.optimizer is not None and state.step_in_stage > 0:
            try:
                ctx.optimizer.load_state_dict(rs.optimizer)
            except (ValueError, KeyError) as e:
                raise CheckpointError(f"{rs.path}: optimizer state does not fit stage {index + 1}: {e}") from e
        if run.rank < len(rs.rng):
            restore_rng(rs.rng[run.rank])
        else:
            seed_everything(run.cfg.seed + run.rank)
    if run.world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = comp.model
        ignore = [n for n, p in model.named_parameters() if not p.requires_grad]
        ignore += [n for n, _ in model.named_buffers()]
        DDP._set_params_and_buffers_to_ignore_for_model(model, ignore)
        # find_unused_parameters: curriculum text-only batches leave MoME/SPAE without gradient
        ctx.net = DDP(model, device_ids=None, find_unused_parameters=True, broadcast_buffers=False)
    if run.main:
        log.info("stage %d/%d %s: %d steps (%d per epoch), lr %.2g, %d trainable parameters", index + 1,
                 len(run.stages), stage.modalities or run.cfg.prompt.paradigm, total, per_epoch, stage.lr,
                 sum(p.numel() for p in ctx.params))
    comp.model.train()
    return ctx


def log_step(run: Run, state: TrainProgress, stats: StepStats, loss: torch.Tensor, seconds: float, share: float,
             bar: Any) -> None:
    """One ``train`` record (a host sync: read at ``train.log_every``): loss, lr, tokens, grad norm."""
    run.monitor.check()
    # every rank's own token count (ranks differ in tokens; collective on every rank alike)
    tokens = int(all_reduce_sum(float(stats.tokens))) if run.world > 1 else stats.tokens
    s = run.stream
    rec = {"type": "train", "stage": state.stage + 1, "step": state.step_in_stage, "global_step": state.global_step,
           "epoch": s.epoch + s.step_in_epoch / max(1, s.steps_per_epoch), "loss": float(loss), "lr": stats.lr,
           "tokens": tokens, "examples": stats.examples, "tokens_per_s": tokens / seconds, "hybrid_share": share,
           "grad_norm": None if stats.grad_norm is None else float(stats.grad_norm)}
    run.metrics.write(rec)
    bar.set_postfix(loss=f"{rec['loss']:.4f}", tok_s=f"{rec['tokens_per_s']:.0f}", lr=f"{stats.lr:.1e}")


def evaluate_and_checkpoint(run: Run, state: TrainProgress, stage: StageConfig, optimizer: torch.optim.Optimizer,
                            tag: str, aliases: tuple[str, ...] = ()) -> dict:
    """Validation (``train.eval_max_examples``), its record and log line, the best metric, a checkpoint
    (``best`` when the metric is the best so far; ``aliases``), and the model back in train mode.
    Returns the validation result."""
    from speeder_fast.evaluate import evaluate_split

    cfg, comp = run.cfg, run.comp
    run.monitor.check()
    res = evaluate_split(comp.model, comp.builder, comp.prepared, "valid", cfg.prompt.answer_mode,
                         cfg.train.eval_max_examples, cfg.eval.batch_size, cfg.eval.generate_max_tokens, comp.device,
                         seed=cfg.seed, progress=run.show_progress, constrained=cfg.eval.constrained)
    run.metrics.write({"type": "eval", "tag": tag, "global_step": state.global_step,
                       **{k: v for k, v in res.items() if not isinstance(v, (dict, list))}})
    if run.main:
        log.info("valid @ %s: VHR@1 %.4f  ValidRatio %.3f  NDCG@10 %s%s", tag, res.get("VHR@1", 0.0),
                 res.get("ValidRatio", 0.0), f"{res['NDCG@10']:.4f}" if "NDCG@10" in res else "n/a",
                 f"  full HR@10 {res['full_HR@10']:.4f} NDCG@10 {res['full_NDCG@10']:.4f}"
                 if "full_NDCG@10" in res else "")
    state.last_valid = res
    metric = key_metric(res)
    state.best = max(state.best, metric)
    save_checkpoint(run, state, stage, optimizer, metric=metric, aliases=aliases)
    comp.model.train()
    return res


# ------------------------------------------------------------------ the loop
def train(cfg: Config, run_dir: Path | None = None, progress: bool = True, prepared: Any = None,
          resume: bool = False, on_step: Callable[[TrainProgress], None] | None = None) -> TrainResult:
    """Train per ``cfg``; returns the run folder and the trained components.

    Args:
        cfg: the resolved configuration.
        run_dir: the run folder (default: ``output_dir/run_name``, created).
        progress: progress bars (rank 0).
        prepared: a :class:`PreparedData` to use instead of ``prepare(cfg.data)``.
        resume: continue the run in ``run_dir`` from its newest valid checkpoint (same stage, step,
            data order, optimizer state and RNG; ``metrics.jsonl`` is cut back to that checkpoint's
            step); a run folder without any checkpoint yet starts from scratch in that folder.
        on_step: called on every rank after each optimizer step (after its log record, validation and
            checkpoint) with the :class:`TrainProgress`; tests use it to interrupt a run at a chosen step.

    Under ``torchrun`` (``WORLD_SIZE > 1``) it trains data-parallel; only rank 0 writes files.

    Raises:
        CheckpointError: ``run_dir`` is a checkpoint (a run never writes into one); with ``resume``, a
            folder that is neither a run folder nor holds a checkpoint, or only corrupt checkpoints.
        NonFiniteLossError: the loss became NaN/Inf (names the step and the last good checkpoint).
    """
    from tqdm.auto import tqdm

    t_start = time.perf_counter()
    run = start_run(cfg, run_dir, progress, prepared, resume)
    state = resume_point(run) if resume else TrainProgress()
    tc, model, stages = cfg.train, run.comp.model, run.stages
    run.metrics = MetricsLog(run.run_dir, run.main, tc.report_to, purge_step=state.global_step if resume else None)
    seen: set[str] = set()
    try:
        for si, stage in enumerate(stages):
            if si < state.stage:  # finished before the resume point
                seen.update(stage.modalities)
                continue
            ctx = setup_stage(run, state, si, stage, seen)
            total = state.stage_total
            bar = tqdm(range(state.step_in_stage, total), desc=f"stage {si + 1}/{len(stages)}", unit="step",
                       disable=not run.show_progress, dynamic_ncols=True, initial=state.step_in_stage, total=total)
            t_stage = time.perf_counter()
            for step in bar:
                share = hybrid_share(cfg, stage, step, total)
                t0 = time.perf_counter()
                stats = train_step(ctx, step, run.stream.micro_batches(tc.grad_accum, share))
                state.global_step, state.step_in_stage = state.global_step + 1, step + 1
                state.micro_done += stats.micro_batches
                loss = all_reduce_mean(stats.loss)  # the global-batch mean loss
                run.monitor.update(loss, state.global_step)
                dt = time.perf_counter() - t0
                state.train_seconds += dt
                last = step == total - 1
                if state.global_step % max(1, tc.log_every) == 0 or last:
                    log_step(run, state, stats, loss, dt, share, bar)
                if tc.eval_every > 0 and state.global_step % tc.eval_every == 0 and not last:
                    evaluate_and_checkpoint(run, state, stage, ctx.optimizer, f"step{state.global_step}")
                elif tc.checkpoint_every > 0 and state.global_step % tc.checkpoint_every == 0:
                    save_checkpoint(run, state, stage, ctx.optimizer, is_best=False)
                if on_step is not None:
                    on_step(state)
            bar.close()
            if run.main:
                log.info("stage %d done in %.1f s", si + 1, time.perf_counter() - t_stage)
            state.stage_done = True  # stage end: validation + checkpoint step-N, alias stage<i> (+ best)
            evaluate_and_checkpoint(run, state, stage, ctx.optimizer, f"stage{si + 1}", aliases=(f"stage{si + 1}",))
            del ctx  # the DDP wrapper of the stage
        state.stage, state.step_in_stage, state.stage_done = len(stages) - 1, 0, True
        save_checkpoint(run, state, stages[-1], None, aliases=("final",), is_best=False)
    except NonFiniteLossError as e:
        last_ck = run.ckpt.latest()
        raise NonFiniteLossError(e.step, e.value, hint=(
            f"the last good checkpoint is {last_ck} (nothing was saved after the bad step); lower the stage lr or "
            f"set train.grad_clip > 0 and continue with --resume {run.run_dir}" if last_ck is not None else
            "no checkpoint was written before it; lower the stage lr or set train.grad_clip > 0")) from None
    finally:
        run.metrics.close()
    model.set_stage(stages[-1].modalities)
    model.eval()
    return finish(run, state, time.perf_counter() - t_start)


def finish(run: Run, state: TrainProgress, seconds: float) -> TrainResult:
    """``train_summary.json`` + ``FINISHED.json`` (rank 0) and the :class:`TrainResult`."""
    s, comp = run.stream, run.comp
    if run.cfg.train.max_tokens_per_batch > 0:  # the stream's position in epochs (token plans differ per epoch)
        epochs_done = max(0.0, s.epoch + s.step_in_epoch / max(1, s.steps_per_epoch))
    else:
        epochs_done = state.micro_done / run.micro_per_epoch
    epoch_seconds = state.train_seconds / epochs_done if epochs_done else 0.0
    summary = {"train_seconds": state.train_seconds, "total_seconds": seconds, "epochs": epochs_done,
               "epoch_seconds": epoch_seconds, "steps": state.global_step, "n_train": len(comp.prepared.train),
               "device": str(comp.device), "world_size": run.world, "torch_threads": torch.get_num_threads(),
               "valid": state.last_valid, "features": comp.feature_info, "resumed": run.resumed_from is not None}
    if run.main:
        from speeder_fast.utils import atomic_write_json

        atomic_write_json(run.run_dir / "train_summary.json", summary)
        mark_finished(run.run_dir, {k: v for k, v in summary.items() if k != "features"})
    barrier()
    return TrainResult(run.run_dir, comp, state.last_valid, seconds, epoch_seconds, state.global_step, epochs_done)
