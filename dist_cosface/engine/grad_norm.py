"""The sharding-aware global gradient norm (with the step's votes riding along) and clipping."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from dist_cosface.distributed import DistContext
from dist_cosface.sharding import is_sharded


def _sq_norm(params: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    grads = [p.grad.detach() for p in params if p.grad is not None]
    if not grads:
        return torch.zeros((), dtype=torch.float64, device=device)
    # one fused kernel for all per-tensor norms; the sum of squares in float64
    return torch.stack(torch._foreach_norm(grads)).double().pow(2).sum()


def global_grad_norm_and_flags(
    params: list[torch.nn.Parameter], ctx: DistContext, flags: list[float]
) -> tuple[float, list[float]]:
    """Global L2 gradient norm plus summed per-rank flags, in ONE tiny all-reduce.

    Sharded parameters contribute their squared norm from every rank (each shard once);
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
        grads = [p.grad for p in params if p.grad is not None]
        torch._foreach_mul_(grads, coef)
