"""Row-sparse optimizers for the classifier's weight shard (Partial FC safe).

Only rows that the head marked as touched since the last ``step()`` are updated: their
momentum / Adam moments advance, weight decay applies, and everything else (parameter and
state) stays bit-identical. With ``sample_rate == 1`` every row is touched and the update
equals ``torch.optim.SGD`` (dampening 0, no Nesterov) / ``torch.optim.AdamW``.

Every state tensor has leading dimension ``num_local_classes`` so checkpoints can be
resharded by rows; AdamW keeps per-row step counts in ``state["row_step"]`` ``[K]``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch

from dist_cosface.classifier.head import ShardedClassifier


class _RowOptimizer(torch.optim.Optimizer):
    def __init__(self, head: ShardedClassifier, defaults: dict[str, Any]) -> None:
        if not isinstance(head, ShardedClassifier):
            raise TypeError(f"expected a ShardedClassifier, got {type(head).__name__}")
        super().__init__([head.weight], defaults)
        self._head = head
        self._init_state(head.weight, self.state[head.weight])

    def _init_state(self, weight: torch.Tensor, state: dict[str, torch.Tensor]) -> None:
        raise NotImplementedError

    def _update(self, w: torch.Tensor, g: torch.Tensor, state: dict, rows: Any, group: dict):
        raise NotImplementedError

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        weight = self._head.weight
        rows = self._head.take_touched_rows()
        if weight.grad is not None and rows is not None:
            self._update(weight, weight.grad, self.state[weight], rows, self.param_groups[0])
        return loss

    def row_state(self) -> dict[str, torch.Tensor]:
        """The per-row state tensors (live, not copies), each with leading dim ``K`` rows."""
        return dict(self.state[self._head.weight])

    @torch.no_grad()
    def load_row_state(self, state: dict[str, torch.Tensor]) -> None:
        """Copy per-row state saved by :meth:`row_state` (same keys, same shapes)."""
        mine = self.state[self._head.weight]
        if set(state) != set(mine):
            raise ValueError(
                f"{type(self).__name__}: row state has keys {sorted(state)}, "
                f"expected {sorted(mine)} (was it saved with another optimizer?)"
            )
        for key, value in state.items():
            if value.shape != mine[key].shape:
                raise ValueError(
                    f"{type(self).__name__}: row state {key!r} has shape {list(value.shape)}, "
                    f"expected {list(mine[key].shape)}"
                )
            mine[key].copy_(value)


class RowSGD(_RowOptimizer):
    """SGD with momentum and L2 weight decay on touched rows only."""

    def __init__(
        self, head: ShardedClassifier, lr: float, momentum: float = 0.9, weight_decay: float = 0.0
    ) -> None:
        super().__init__(head, {"lr": lr, "momentum": momentum, "weight_decay": weight_decay})

    def _init_state(self, weight: torch.Tensor, state: dict[str, torch.Tensor]) -> None:
        state["momentum_buffer"] = torch.zeros_like(weight, memory_format=torch.preserve_format)

    def _update(self, w, g, state, rows, group) -> None:
        grad = g[rows] + group["weight_decay"] * w[rows]
        buf = state["momentum_buffer"]
        if group["momentum"] != 0:
            # a never-touched row has buf = 0, so its first update is buf = grad (as torch)
            grad = buf[rows] * group["momentum"] + grad
            buf[rows] = grad
        w[rows] = w[rows] - group["lr"] * grad


class RowAdamW(_RowOptimizer):
    """AdamW (decoupled weight decay) with per-row step counts, on touched rows only."""

    def __init__(
        self,
        head: ShardedClassifier,
        lr: float,
        betas: Sequence[float] = (0.9, 0.999),
        weight_decay: float = 0.01,
        eps: float = 1e-8,
    ) -> None:
        super().__init__(
            head, {"lr": lr, "betas": tuple(betas), "weight_decay": weight_decay, "eps": eps}
        )

    def _init_state(self, weight: torch.Tensor, state: dict[str, torch.Tensor]) -> None:
        state["exp_avg"] = torch.zeros_like(weight)
        state["exp_avg_sq"] = torch.zeros_like(weight)
        # not named "step": torch.optim special-cases that key when loading state dicts
        state["row_step"] = torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device)

    def _update(self, w, g, state, rows, group) -> None:
        beta1, beta2 = group["betas"]
        lr = group["lr"]
        step = state["row_step"][rows] + 1
        state["row_step"][rows] = step
        grad = g[rows]
        exp_avg = state["exp_avg"][rows].lerp(grad, 1 - beta1)
        exp_avg_sq = state["exp_avg_sq"][rows] * beta2 + (1 - beta2) * grad * grad
        state["exp_avg"][rows], state["exp_avg_sq"][rows] = exp_avg, exp_avg_sq
        bias1 = 1 - beta1 ** step[:, None]
        bias2_sqrt = (1 - beta2 ** step[:, None]).sqrt()
        denom = exp_avg_sq.sqrt() / bias2_sqrt + group["eps"]
        w[rows] = w[rows] * (1 - lr * group["weight_decay"]) - (lr / bias1) * exp_avg / denom


def build_classifier_optimizer(
    head: ShardedClassifier,
    name: Literal["sgd", "adamw"],
    lr: float,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    betas: Sequence[float] = (0.9, 0.999),
) -> torch.optim.Optimizer:
    """The optimizer for ``head.weight`` (give the backbone its own optimizer)."""
    if name == "sgd":
        return RowSGD(head, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adamw":
        if len(betas) != 2:
            raise ValueError(f"betas must have two values, got {list(betas)}")
        return RowAdamW(head, lr=lr, betas=betas, weight_decay=weight_decay)
    raise ValueError(f"optimizer name must be 'sgd' or 'adamw', got {name!r}")
