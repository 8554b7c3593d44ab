"""Helpers shared by the backbone tests."""

from __future__ import annotations

import torch
from torch import nn


def calibrate_batchnorm(model: nn.Module, x: torch.Tensor) -> None:
    """Give every BN running statistics of real activations, so eval-mode outputs are O(1)."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # cumulative average: one batch sets the stats exactly
    model.train()
    with torch.no_grad():
        model(x)
    model.eval()
