"""Marks for parameters that are sharded across ranks (the classifier's weight rows).

Data-parallel wrappers must not average a sharded parameter's gradient (each rank owns
different rows), and a global gradient norm must count each shard exactly once: sum the
squared norms of sharded parameters over the group, but take replicated parameters from one
rank's view only.
"""

from __future__ import annotations

import torch

_SHARDED_ATTR = "_dist_cosface_sharded"


def mark_sharded(param: torch.nn.Parameter, dim: int = 0) -> torch.nn.Parameter:
    """Declare ``param`` split over the model-parallel group along ``dim``."""
    setattr(param, _SHARDED_ATTR, dim)
    return param


def is_sharded(param: torch.Tensor) -> bool:
    return getattr(param, _SHARDED_ATTR, None) is not None


def shard_dim(param: torch.Tensor) -> int | None:
    return getattr(param, _SHARDED_ATTR, None)
