"""Training engine: the loop, optimizers and schedules, checkpoints, DeepSpeed glue.

Import-light: heavy or optional parts (DeepSpeed, the classifier, data, models) are imported
inside the functions that use them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dist_cosface.config import RunConfig
    from dist_cosface.distributed import DistContext


def train(cfg: RunConfig, ctx: DistContext, **kwargs: Any) -> dict:
    """See :func:`dist_cosface.engine.trainer.train`."""
    from dist_cosface.engine.trainer import train as _train

    return _train(cfg, ctx, **kwargs)


def load_backbone(checkpoint_or_run_dir):
    """See :func:`dist_cosface.engine.checkpoint.reader.load_backbone`."""
    from dist_cosface.engine.checkpoint.reader import load_backbone as _load

    return _load(checkpoint_or_run_dir)


__all__ = ["load_backbone", "train"]
