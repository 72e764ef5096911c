"""Training: MPO stages, the loop, run folders and checkpoints."""

from .loop import TrainResult, lr_at, resolve_stages, train
from .run import Components, build_components, load_run

__all__ = ["Components", "TrainResult", "build_components", "load_run", "lr_at", "resolve_stages", "train"]
