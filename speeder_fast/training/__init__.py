"""Training: MPO stages, the loop, the one training step, micro-batches, run folders and checkpoints."""

from .batches import MicroBatch, MicroBatches, plan_token_batches
from .loop import TrainProgress, TrainResult, resolve_stages, train
from .run import Components, build_components, load_run
from .step import StepContext, StepStats, lr_at, prepare_stage, train_step, uses_label_loss

__all__ = ["Components", "MicroBatch", "MicroBatches", "StepContext", "StepStats", "TrainProgress", "TrainResult",
           "build_components", "load_run", "lr_at", "plan_token_batches", "prepare_stage", "resolve_stages", "train",
           "train_step", "uses_label_loss"]
