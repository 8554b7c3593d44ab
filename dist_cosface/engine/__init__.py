"""Training engine: the loop, schedules and gradient norm, checkpoints, DeepSpeed glue.

``train`` (the run) and ``load_backbone`` (a trained backbone from a checkpoint) are its
entry points. Optional dependencies (DeepSpeed) are imported inside the functions that use
them.
"""

from __future__ import annotations

from dist_cosface.engine.checkpoint.reader import load_backbone
from dist_cosface.engine.trainer import RunSummary, train

__all__ = ["RunSummary", "load_backbone", "train"]
