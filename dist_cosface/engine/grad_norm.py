"""The sharding-aware global gradient norm (with the step's votes riding along) and clipping."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from dist_cosface.distributed import DistContext
from dist_cosface.sharding import is_sharded


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


def global_grad_norm_and_votes(
    params: list[torch.nn.Parameter], ctx: DistContext, votes: torch.Tensor
) -> tuple[float, list[float]]:
    """Global L2 gradient norm plus the ranks' summed votes, in ONE tiny all-reduce.

    Sharded parameters (the classifier's rows, FSDP's DTensor pieces: ``mark_sharded``)
    contribute their local squared norm from every rank (each shard once);
    replicated parameters (identical after data-parallel averaging) contribute from rank 0
    only, so every rank ends with the same, bit-identical total. ``votes`` (a cast
    ``agreement.Ballot``: "SIGTERM received", ...) ride along in the same tensor and come back
    summed over the group, for the ballot to read. This is the loop's one host
    synchronisation per step.
    """
    sharded = [p for p in params if is_sharded(p)]
    replicated = [p for p in params if not is_sharded(p)]
    total = _sq_norm(sharded, ctx.device)
    if ctx.rank == 0:
        total = total + _sq_norm(replicated, ctx.device)
    packed = torch.cat([total.reshape(1), votes.to(ctx.device, torch.float64)])
    if ctx.is_distributed:
        dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=ctx.group)
    values = packed.tolist()
    return math.sqrt(values[0]) if math.isfinite(values[0]) else math.inf, values[1:]


def clip_grads_(params: list[torch.nn.Parameter], norm: float, max_norm: float) -> None:
    """Scale gradients in place so that the global norm ``norm`` becomes at most ``max_norm``."""
    coef = max_norm / (norm + 1e-6)
    if coef < 1.0:
        torch._foreach_mul_(local_grads(params), coef)  # in place: a DTensor's piece too
