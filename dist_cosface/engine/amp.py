"""Autocast and a loss scaler for fp16 that works with sharded parameters.

torch's GradScaler decides "found inf" per rank; with a sharded classifier one rank can
overflow while the others do not, and ranks that disagree about skipping a step diverge.
Here the overflow decision is taken from the global gradient norm, which is all-reduced over
the group (see ``grad_norm.global_grad_norm_and_votes``), so every rank skips together.
"""

from __future__ import annotations

import contextlib

import torch

from dist_cosface.engine.grad_norm import local_grads


def autocast(precision: str, device: torch.device):
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


class ShardedLossScaler:
    """Dynamic loss scale: halve on overflow, double after ``growth_interval`` good steps."""

    def __init__(
        self, enabled: bool, init_scale: float = 2.0**16, growth_interval: int = 2000
    ) -> None:
        self.enabled = enabled
        self.scale = init_scale if enabled else 1.0
        self.growth_interval = growth_interval
        self.good_steps = 0

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * self.scale if self.enabled else loss

    def unscale_(self, params: list[torch.nn.Parameter]) -> None:
        if self.enabled:
            torch._foreach_mul_(local_grads(params), 1.0 / self.scale)

    def update(self, found_inf: bool) -> None:
        """Call once per optimizer step with the group-wide overflow decision."""
        if not self.enabled:
            return
        if found_inf:
            self.scale = max(self.scale / 2.0, 1.0)
            self.good_steps = 0
            return
        self.good_steps += 1
        if self.good_steps >= self.growth_interval:
            self.scale *= 2.0
            self.good_steps = 0

    def state_dict(self) -> dict:
        return {"scale": self.scale, "good_steps": self.good_steps}

    def load_state_dict(self, state: dict) -> None:
        self.scale = float(state["scale"])
        self.good_steps = int(state["good_steps"])
