"""Optimizers, the learning-rate schedule and the sharding-aware gradient norm.

The schedule is a pure function of the optimizer step, so resuming only needs the step
number; it is applied to the backbone's and the classifier's optimizers alike.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from dist_cosface.distributed import DistContext
from dist_cosface.engine.config import OptimConfig
from dist_cosface.sharding import is_sharded


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


def build_backbone_optimizer(
    params: Iterable[torch.nn.Parameter], cfg: OptimConfig
) -> torch.optim.Optimizer:
    params = list(params)
    if cfg.name == "sgd":
        return torch.optim.SGD(
            params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )
    return torch.optim.AdamW(
        params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay
    )


def local_grads(params: list[torch.Tensor]) -> list[torch.Tensor]:
    """The gradients this rank holds: a DTensor's (FSDP) local piece, else the gradient."""
    grads = [p.grad for p in params if p.grad is not None]
    return [g.to_local() if isinstance(g, DTensor) else g for g in grads]


def _sq_norm(params: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    grads = [g.detach() for g in local_grads(params)]
    if not grads:
        return torch.zeros((), dtype=torch.float64, device=device)
    # one fused kernel for all per-tensor norms; the sum of squares in float64
    return torch.stack(torch._foreach_norm(grads)).double().pow(2).sum()


def global_grad_norm_and_flags(
    params: list[torch.nn.Parameter], ctx: DistContext, flags: list[float]
) -> tuple[float, list[float]]:
    """Global L2 gradient norm plus summed per-rank flags, in ONE tiny all-reduce.

    Sharded parameters (the classifier's rows, FSDP's DTensor pieces: ``mark_sharded``)
    contribute their local squared norm from every rank (each shard once);
    replicated parameters (identical after data-parallel averaging) contribute from rank 0
    only, so every rank ends with the same, bit-identical total. ``flags`` (e.g. "SIGTERM
    received") ride along in the same tensor and come back summed over the group. This is the
    loop's one host synchronisation per step.
    """
    sharded = [p for p in params if is_sharded(p)]
    replicated = [p for p in params if not is_sharded(p)]
    total = _sq_norm(sharded, ctx.device)
    if ctx.rank == 0:
        total = total + _sq_norm(replicated, ctx.device)
    packed = torch.stack(
        [total] + [torch.tensor(float(f), dtype=torch.float64, device=ctx.device) for f in flags]
    )
    if ctx.is_distributed:
        dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=ctx.group)
    values = packed.tolist()
    return math.sqrt(values[0]) if math.isfinite(values[0]) else math.inf, values[1:]


def clip_grads_(params: list[torch.nn.Parameter], norm: float, max_norm: float) -> None:
    """Scale gradients in place so that the global norm ``norm`` becomes at most ``max_norm``."""
    coef = max_norm / (norm + 1e-6)
    if coef < 1.0:
        torch._foreach_mul_(local_grads(params), coef)  # in place: a DTensor's piece too
