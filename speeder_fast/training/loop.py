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
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from speeder_fast.config import Config, StageConfig
from speeder_fast.utils import get_logger, seed_everything

from .run import Components, build_components, make_run_dir, prune_checkpoints, save_checkpoint, write_run_files

log = get_logger("speeder_fast.training")


def resolve_stages(cfg: Config, available: list[str]) -> list[StageConfig]:
    """The MPO stages to run, restricted to ``available`` modalities (empty ones dropped, logged)."""
    if cfg.prompt.paradigm != "speeder":
        st = cfg.train.stages[0] if cfg.train.stages else StageConfig()
        return [dataclasses.replace(st, modalities=[], curriculum_ramp=0.0)]
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


def set_trainable(comp: Components, stage: StageConfig, seen: set[str]) -> list[torch.nn.Parameter]:
    """Set ``requires_grad`` for this stage and return the parameters to optimize."""
    model = comp.model
    for p in model.parameters():
        p.requires_grad_(False)
    params: list[torch.nn.Parameter] = []
    if stage.train_lora:
        params += [p for n, p in model.llm.named_parameters() if "lora_" in n]
    if model.mome is not None:
        new = [m for m in stage.modalities if m not in seen]
        old = [m for m in stage.modalities if m in seen]
        params += model.mome.parameters_of(new)
        if not stage.freeze_previous_experts:
            params += model.mome.parameters_of(old)
        params += model.mome.shared_parameters()
    if model.positions is not None:
        params += list(model.positions.parameters())
    for p in params:
        p.requires_grad_(True)
    if not params:
        raise ValueError("this stage has nothing to train (LoRA off and no MoME/SPAE)")
    return params


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


class MicroBatches:
    """Endless stream of training micro-batches; new shuffled order + candidates each epoch."""

    def __init__(self, comp: Components, batch_size: int, seed: int) -> None:
        self.comp = comp
        self.bs = batch_size
        self.seed = seed
        self.epoch = -1
        self.order = np.zeros(0, np.int64)
        self.pos = 0
        self.cands: np.ndarray | None = None
        self.rng = np.random.default_rng(seed)

    def _new_epoch(self) -> None:
        from speeder_fast.data import sample_train_candidates

        p = self.comp.prepared
        self.epoch += 1
        self.cands = sample_train_candidates(p, self.epoch, self.comp.cfg.data.n_candidates, self.comp.cfg.data.seed)
        self.order = np.random.default_rng([self.seed, self.epoch]).permutation(len(p.train))
        self.pos = 0

    def next(self, hybrid_share: float = 1.0):
        if self.pos >= len(self.order):
            self._new_epoch()
        rows = self.order[self.pos : self.pos + self.bs]
        self.pos += len(rows)
        tr = self.comp.prepared.train
        text_only = self.rng.random(len(rows)) >= hybrid_share if hybrid_share < 1.0 else None
        return self.comp.builder.build(tr.histories[rows], tr.lengths[rows], self.cands[rows], tr.targets[rows],
                                       with_answer=True, text_only=text_only)


def train(cfg: Config, run_dir: Path | None = None, progress: bool = True, prepared: Any = None) -> TrainResult:
    """Train per ``cfg``; returns the run folder and the trained components.

    ``prepared``: a :class:`PreparedData` to use instead of ``prepare(cfg.data)``.
    """
    from tqdm.auto import tqdm

    from speeder_fast.evaluate import evaluate_split

    t_start = time.perf_counter()
    seed_everything(cfg.seed)
    run_dir = Path(run_dir) if run_dir else make_run_dir(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    comp = build_components(cfg, run_dir=run_dir, progress=progress, prepared=prepared)
    write_run_files(run_dir, comp)
    model, device, tc = comp.model, comp.device, cfg.train
    n_train = len(comp.prepared.train)
    if n_train == 0:
        raise ValueError("no training examples (check data.max_users / data.max_train_examples)")
    metrics_f = open(run_dir / "metrics.jsonl", "a")

    def log_json(rec: dict) -> None:
        metrics_f.write(json.dumps(rec, default=float) + "\n")
        metrics_f.flush()

    def validate(tag: str) -> dict:
        res = evaluate_split(model, comp.builder, comp.prepared, "valid", cfg.prompt.answer_mode, tc.eval_max_examples,
                             cfg.eval.batch_size, cfg.eval.generate_max_tokens, device, seed=cfg.seed, progress=progress)
        log_json({"type": "eval", "tag": tag, "global_step": global_step,
                  **{k: v for k, v in res.items() if not isinstance(v, (dict, list))}})
        log.info("valid @ %s: VHR@1 %.4f  ValidRatio %.3f  NDCG@10 %s", tag, res.get("VHR@1", 0.0), res.get("ValidRatio", 0.0),
                 f"{res['NDCG@10']:.4f}" if "NDCG@10" in res else "n/a")
        return res

    def key_metric(res: dict) -> float:
        return res.get("NDCG@10", res.get("VHR@1", 0.0))

    stages = resolve_stages(cfg, comp.modalities)
    log.info("run %s: %d training examples, %d stage(s): %s", run_dir, n_train, len(stages),
             [s.modalities or [cfg.prompt.paradigm] for s in stages])
    stream = MicroBatches(comp, tc.batch_size, cfg.seed)
    micro_per_epoch = math.ceil(n_train / tc.batch_size)
    steps_per_epoch = math.ceil(micro_per_epoch / tc.grad_accum)
    seen: set[str] = set()
    label_loss = cfg.prompt.answer_mode == "score" and tc.score_loss == "labels"
    global_step = 0
    best = -1.0
    last_valid: dict | None = None
    train_seconds = 0.0
    micro_done = 0
    for si, stage in enumerate(stages, start=1):
        # ---- stage setup: active modalities, trainable set, optimizer, step budget
        model.set_stage(stage.modalities)
        params = set_trainable(comp, stage, seen)
        seen.update(stage.modalities)
        opt = torch.optim.AdamW(params, lr=stage.lr, weight_decay=tc.weight_decay, betas=(0.9, 0.999))
        total = max(1, math.ceil(stage.epochs * steps_per_epoch))
        if stage.max_steps > 0:
            total = min(total, stage.max_steps)
        n_params = sum(p.numel() for p in params)
        log.info("stage %d/%d %s: %d steps (%d per epoch), lr %.2g, %d trainable parameters", si, len(stages),
                 stage.modalities or cfg.prompt.paradigm, total, steps_per_epoch, stage.lr, n_params)
        model.train()
        bar = tqdm(range(total), desc=f"stage {si}/{len(stages)}", unit="step", disable=not progress, dynamic_ncols=True)
        t_stage = time.perf_counter()
        for step in bar:
            # ---- curriculum: share of soft-token (hybrid) prompts ramps from 0 to 1
            share = 1.0
            if stage.curriculum_ramp > 0 and cfg.prompt.paradigm == "speeder":
                share = min(1.0, step / max(1.0, stage.curriculum_ramp * total))
            lr = lr_at(step, total, stage.lr, tc.warmup_ratio)
            for g in opt.param_groups:
                g["lr"] = lr
            t0 = time.perf_counter()
            tokens = 0
            loss_acc = torch.zeros((), device=device)
            for _ in range(tc.grad_accum):
                batch = stream.next(share)
                tokens += batch.n_tokens
                loss = model(batch.to(device), label_loss=label_loss) / tc.grad_accum
                loss.backward()
                loss_acc += loss.detach()
                micro_done += 1
            gnorm = torch.nn.utils.clip_grad_norm_(params, tc.grad_clip) if tc.grad_clip > 0 else None
            opt.step()
            opt.zero_grad(set_to_none=True)
            global_step += 1
            dt = time.perf_counter() - t0
            train_seconds += dt
            if global_step % max(1, tc.log_every) == 0 or step == total - 1:
                rec = {"type": "train", "stage": si, "step": step + 1, "global_step": global_step,
                       "epoch": stream.epoch + stream.pos / max(1, len(stream.order)), "loss": float(loss_acc),
                       "lr": lr, "tokens_per_s": tokens / dt, "hybrid_share": share,
                       "grad_norm": None if gnorm is None else float(gnorm)}
                log_json(rec)
                bar.set_postfix(loss=f"{rec['loss']:.4f}", tok_s=f"{rec['tokens_per_s']:.0f}", lr=f"{lr:.1e}")
            if tc.eval_every > 0 and global_step % tc.eval_every == 0 and step != total - 1:
                last_valid = validate(f"step{global_step}")
                if key_metric(last_valid) > best:
                    best = key_metric(last_valid)
                    save_checkpoint(run_dir, "best", comp, _state(si, global_step, stage, last_valid))
                model.train()
            if tc.checkpoint_every > 0 and global_step % tc.checkpoint_every == 0:
                save_checkpoint(run_dir, f"step{global_step}", comp, _state(si, global_step, stage, None))
                prune_checkpoints(run_dir, tc.keep_checkpoints)
        bar.close()
        log.info("stage %d done in %.1f s", si, time.perf_counter() - t_stage)
        # ---- stage end: validation + checkpoint
        last_valid = validate(f"stage{si}")
        state = _state(si, global_step, stage, last_valid)
        save_checkpoint(run_dir, f"stage{si}", comp, state)
        if key_metric(last_valid) > best:
            best = key_metric(last_valid)
            save_checkpoint(run_dir, "best", comp, state)
        model.train()
    save_checkpoint(run_dir, "final", comp, _state(len(stages), global_step, stages[-1], last_valid))
    metrics_f.close()
    model.eval()
    epochs_done = micro_done / micro_per_epoch
    epoch_seconds = train_seconds / epochs_done if epochs_done else 0.0
    seconds = time.perf_counter() - t_start
    summary = {"train_seconds": train_seconds, "total_seconds": seconds, "epochs": epochs_done,
               "epoch_seconds": epoch_seconds, "steps": global_step, "n_train": n_train, "device": str(device),
               "torch_threads": torch.get_num_threads(), "valid": last_valid, "features": comp.feature_info}
    from speeder_fast.utils import atomic_write_json

    atomic_write_json(run_dir / "train_summary.json", summary)
    return TrainResult(run_dir, comp, last_valid, seconds, epoch_seconds, global_step)


def _state(stage_idx: int, global_step: int, stage: StageConfig, valid: dict | None) -> dict[str, Any]:
    return {"stage": stage_idx, "global_step": global_step, "active_modalities": list(stage.modalities),
            "valid": None if valid is None else {k: v for k, v in valid.items() if not isinstance(v, (dict, list))}}
