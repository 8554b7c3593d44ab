"""The learning-rate schedule: a pure function of the optimizer step.

Resuming therefore only needs the step number; the schedule is applied to the backbone's and
the classifier's optimizers alike.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from dist_cosface.engine.config import OptimConfig


def lr_at(cfg: OptimConfig, step: int, total_steps: int) -> float:
    """Learning rate for optimizer step ``step`` (0-based): linear warmup, then decay."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    decay_steps = max(total_steps - cfg.warmup_steps, 1)
    progress = min(max(step - cfg.warmup_steps, 0) / decay_steps, 1.0)
    if cfg.schedule == "cosine":
        factor = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        factor = (1.0 - progress) ** cfg.poly_power
    return cfg.min_lr + (cfg.lr - cfg.min_lr) * factor


def set_lr(optimizers: Iterable[torch.optim.Optimizer], lr: float) -> None:
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            group["lr"] = lr
