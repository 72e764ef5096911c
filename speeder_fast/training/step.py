"""One training step, the same everywhere: the loop, ``python -m speeder_fast.profile train`` and the
paradigm benchmarks all run :func:`train_step`, so a benchmark times exactly what training runs.

    ctx = prepare_stage(comp, stage, total)          # active modalities, trainable set, AdamW, schedule, loss
    for step in range(total):
        stats = train_step(ctx, step, stream.micro_batches(ctx.grad_accum))

:func:`prepare_stage` sets a stage up (:func:`set_trainable`, AdamW over :func:`param_groups` with
``train.weight_decay``, the warmup + cosine schedule :func:`lr_at`, the configured loss);
:func:`train_step` sets the step's learning rate, runs forward (the loss as configured, see
:func:`uses_label_loss`) and backward over ``grad_accum`` micro-batches (DDP gradient sync on the last
one only), clips the gradient norm and steps the optimizer.
"""

from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch

from speeder_fast.config import Config, StageConfig, TrainConfig
from speeder_fast.errors import ConfigError

__all__ = ["StepContext", "StepStats", "loss_name", "lora_parameters", "lr_at", "make_optimizer", "param_groups",
           "prepare_stage", "set_trainable", "train_step", "uses_label_loss"]


def lr_at(step: int, total: int, peak: float, warmup_ratio: float, min_ratio: float = 0.1) -> float:
    """Linear warmup to ``peak`` then cosine decay to ``min_ratio * peak`` (step is 0-based)."""
    warm = max(1, int(round(warmup_ratio * total)))
    if step < warm:
        return peak * (step + 1) / warm
    t = (step - warm) / max(1, total - warm)
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def uses_label_loss(cfg: Config) -> bool:
    """The loss ``cfg`` trains, as the ``label_loss`` argument of ``SpeederRecModel.forward``.

    Three cases: ``answer_mode=item`` trains the next-item loss (the model has an item head; the
    argument is ignored), score mode with ``train.score_loss=labels`` the cross-entropy over the
    candidate label logits (True), and generate mode or ``score_loss=vocab`` the full-vocabulary
    cross-entropy over the answer tokens (False).
    """
    return cfg.prompt.answer_mode == "score" and cfg.train.score_loss == "labels"


def loss_name(cfg: Config) -> str:
    """``next-item`` | ``label`` | ``vocab``: which of the three losses ``cfg`` trains (for logs and reports)."""
    if cfg.prompt.answer_mode == "item":
        return "next-item"
    return "label" if uses_label_loss(cfg) else "vocab"


def lora_parameters(comp: Any) -> list[torch.nn.Parameter]:
    """The LLM's LoRA parameters (the only trainable part of the LLM)."""
    return [p for n, p in comp.model.llm.named_parameters() if "lora_" in n]


def set_trainable(comp: Any, stage: StageConfig, seen: set[str] | frozenset[str] = frozenset()
                  ) -> list[torch.nn.Parameter]:
    """Set ``requires_grad`` for ``stage`` and return the parameters to optimize.

    LoRA when ``stage.train_lora``; the experts of the stage's modalities (those in ``seen``, trained in
    an earlier stage, only without ``freeze_previous_experts``), the gate and output norm; the SPAE
    tables; the next-item head; the user-state projection (``model.user_state``).

    Raises:
        ConfigError: the stage has nothing to train.
    """
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
    if getattr(model, "user_state", None) is not None:  # the projection only: SASRec stays frozen
        params += model.user_state.trainable_parameters()
    for p in params:
        p.requires_grad_(True)
    if not params:
        raise ConfigError("a training stage has nothing to train: LoRA is off (model.lora_r=0 or the stage's "
                          "train_lora=false) and there is no MoME/SPAE (paradigm verbose/titles)")
    return params


def param_groups(comp: Any, params: list[torch.nn.Parameter], adapter_lr_scale: float) -> list[dict]:
    """AdamW parameter groups: one group (as before) when ``adapter_lr_scale == 1``; otherwise LoRA
    parameters at the stage lr and the MoME/SPAE parameters at ``adapter_lr_scale`` x the stage lr
    (each group carries its ``lr_scale``; the schedule multiplies by it). Empty groups are dropped."""
    if adapter_lr_scale == 1.0:
        return [{"params": params, "lr_scale": 1.0}]
    lora = {id(p) for p in lora_parameters(comp)}
    groups = [{"params": [p for p in params if id(p) in lora], "lr_scale": 1.0},
              {"params": [p for p in params if id(p) not in lora], "lr_scale": float(adapter_lr_scale)}]
    return [g for g in groups if g["params"]]


def make_optimizer(comp: Any, params: list[torch.nn.Parameter], lr: float, tc: TrainConfig) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups` (``train.adapter_lr_scale``) with ``train.weight_decay``."""
    return torch.optim.AdamW(param_groups(comp, params, tc.adapter_lr_scale), lr=lr, weight_decay=tc.weight_decay,
                             betas=(0.9, 0.999))


@dataclass
class StepContext:
    """What one stage's optimizer steps share (made by :func:`prepare_stage`).

    Attributes:
        net: the module to call: the ``SpeederRecModel``, or its DDP wrapper (gradient sync).
        optimizer: AdamW over :attr:`params` (param groups carry ``lr_scale``).
        params: the trainable parameters (gradient clipping runs over them).
        schedule: 0-based step in the stage -> learning rate (before each group's ``lr_scale``).
        label_loss: :func:`uses_label_loss` of the config (the ``forward`` argument).
        grad_accum: micro-batches per optimizer step (the loss of each is divided by it).
        grad_clip: max gradient norm (0 = no clipping, no norm computed).
        device: where batches go.
    """

    net: torch.nn.Module
    optimizer: torch.optim.Optimizer
    params: list[torch.nn.Parameter]
    schedule: Callable[[int], float]
    label_loss: bool
    grad_accum: int = 1
    grad_clip: float = 0.0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))


@dataclass
class StepStats:
    """What :func:`train_step` reports.

    Attributes:
        loss: this rank's loss of the step, 0-dim fp32 on the device, detached: the sum over the
            micro-batches of ``mean loss x weight / grad_accum`` (``all_reduce_mean`` over ranks gives
            the global-batch mean). Reading it syncs the device: log it at intervals.
        grad_norm: total gradient norm before clipping (0-dim tensor), None without clipping.
        lr: the learning rate set for the step (before the groups' ``lr_scale``).
        tokens: real prompt tokens of this rank's micro-batches.
        examples: real examples of the global batches of the micro-batches (all ranks).
        micro_batches: micro-batches consumed.
    """

    loss: torch.Tensor
    grad_norm: torch.Tensor | None
    lr: float
    tokens: int
    examples: int
    micro_batches: int


def prepare_stage(comp: Any, stage: StageConfig, total: int, seen: set[str] | frozenset[str] = frozenset(),
                  net: torch.nn.Module | None = None) -> StepContext:
    """Set MPO stage ``stage`` up on ``comp.model`` and return its :class:`StepContext`.

    Activates the stage's modalities, sets the trainable parameters (:func:`set_trainable`), makes
    AdamW with the configured parameter groups and weight decay (:func:`make_optimizer`) and the
    warmup + cosine schedule over ``total`` steps at the stage's lr; the loss, ``grad_accum`` and
    ``grad_clip`` come from ``comp.cfg``. ``net`` (default: the model) is what the step calls; the loop
    swaps in a DDP wrapper after loading a checkpoint's optimizer state.

    Args:
        comp: :class:`~speeder_fast.training.run.Components` (its ``cfg``, ``model``, ``device``).
        stage: the stage (``resolve_stages``).
        total: optimizer steps of the stage (the schedule's length).
        seen: modalities trained in earlier stages.
        net: the module to call instead of ``comp.model``.

    Raises:
        ConfigError: the stage has nothing to train.
    """
    tc = comp.cfg.train
    comp.model.set_stage(stage.modalities)
    params = set_trainable(comp, stage, seen)
    opt = make_optimizer(comp, params, stage.lr, tc)
    schedule = functools.partial(lr_at, total=total, peak=stage.lr, warmup_ratio=tc.warmup_ratio)
    return StepContext(net if net is not None else comp.model, opt, params, schedule, uses_label_loss(comp.cfg),
                       tc.grad_accum, tc.grad_clip, comp.device)


def train_step(ctx: StepContext, step: int, micro_batches: Iterable[Any]) -> StepStats:
    """One optimizer step: learning rate from the schedule, forward + backward over the micro-batches,
    gradient clipping, ``optimizer.step()``, ``zero_grad``.

    Args:
        ctx: the stage's :class:`StepContext`.
        step: 0-based step in the stage (for the schedule).
        micro_batches: ``ctx.grad_accum`` items ``(batch, weight, n_global)``
            (:class:`~speeder_fast.training.batches.MicroBatch`), consumed one at a time; ``batch`` is a
            :class:`~speeder_fast.model.prompts.PromptBatch` on the host. Each micro-batch's mean loss
            is scaled by ``weight / grad_accum``; under DDP gradients are synchronised on the last one.

    Returns:
        :class:`StepStats` (the loss stays on the device: no host sync here, except the gradient norm
        kernels themselves).
    """
    lr = ctx.schedule(step)
    for g in ctx.optimizer.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)
    no_sync = getattr(ctx.net, "no_sync", None)  # DDP: all-reduce the gradients on the last micro-batch only
    loss_acc = torch.zeros((), device=ctx.device)
    tokens = examples = n = 0
    for k, (batch, weight, n_global) in enumerate(micro_batches):
        tokens += batch.n_tokens
        examples += n_global
        sync = no_sync() if (no_sync is not None and k < ctx.grad_accum - 1) else contextlib.nullcontext()
        with sync:
            with torch.profiler.record_function("forward"):
                loss = ctx.net(batch.to(ctx.device), label_loss=ctx.label_loss) * (weight / ctx.grad_accum)
            with torch.profiler.record_function("backward"):
                loss.backward()
        loss_acc += loss.detach()
        n += 1
    with torch.profiler.record_function("optimizer"):
        gnorm = torch.nn.utils.clip_grad_norm_(ctx.params, ctx.grad_clip) if ctx.grad_clip > 0 else None
        ctx.optimizer.step()
        ctx.optimizer.zero_grad(set_to_none=True)
    return StepStats(loss_acc, gnorm, lr, tokens, examples, n)

