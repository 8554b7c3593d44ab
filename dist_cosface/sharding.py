"""Marks for parameters that are sharded across ranks (the classifier's weight rows).

Data-parallel wrappers must not average a sharded parameter's gradient (each rank owns
different rows), and a global gradient norm must count each shard exactly once: sum the
squared norms of sharded parameters over the group, but take replicated parameters from one
rank's view only.
"""

from __future__ import annotations

import torch

_SHARDED_ATTR = "_dist_cosface_sharded"


def mark_sharded(param: torch.nn.Parameter) -> torch.nn.Parameter:
    """Declare ``param`` split over the model-parallel group (each rank holds its own rows)."""
    setattr(param, _SHARDED_ATTR, True)
    return param


def is_sharded(param: torch.Tensor) -> bool:
    return getattr(param, _SHARDED_ATTR, False)
