"""What the DDP and FSDP strategies share (``engine/strategy.py``, ``engine/fsdp.py``): the
backbone's own torch optimizer, autocast, and gradients normed and clipped by the trainer."""

from __future__ import annotations

import contextlib

import torch

from dist_cosface.engine.amp import ShardedLossScaler, autocast


class TorchOptimizerStrategy:
    """What DDP and FSDP share: the backbone's own torch optimizer, autocast for bf16 / fp16,
    the loss divided by the accumulation steps (and scaled for fp16) before backward, and
    every gradient normed and clipped by the trainer.

    A subclass sets ``backbone``, ``model``, ``_optimizer``, ``_device``, ``precision``,
    ``accum_steps`` and ``scaler``, and gives ``checkpoint_state``, ``micro_batch`` and
    ``evaluation``.
    """

    backbone: torch.nn.Module
    _optimizer: torch.optim.Optimizer
    _device: torch.device
    precision: str
    accum_steps: int
    scaler: ShardedLossScaler

    def native_checkpoint(self) -> None:
        """Nothing is saved outside DCP."""
        return None

    def cast_inputs(self, images: torch.Tensor) -> torch.Tensor:
        return images  # autocast handles bf16/fp16

    def autocast(self) -> contextlib.AbstractContextManager:
        return autocast(self.precision, self._device)

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        del last  # the gradient sync is chosen by micro_batch
        self.scaler.scale_loss(loss / self.accum_steps).backward()

    def clip_params(self, head_params: list[torch.nn.Parameter]) -> list[torch.nn.Parameter]:
        """The gradients the trainer norms and clips: backbone and classifier together."""
        return list(self.backbone.parameters()) + head_params

    def optimizers(self) -> list[torch.optim.Optimizer]:
        """The backbone's optimizers (the LR schedule sets them with the classifier's)."""
        return [self._optimizer]

    def step(self) -> None:
        self._optimizer.step()
        self._optimizer.zero_grad(set_to_none=True)

    def zero_grad(self) -> None:
        self._optimizer.zero_grad(set_to_none=True)

    def backbone_grad_norm(self) -> float | None:
        """A backbone norm the trainer did not compute itself: none here."""
        return None
