"""The classifier's collectives: explicit group, optional timing, uneven-batch all-gather.

All collectives go through :class:`Comm`, so a head built without a process group (single
process) runs the same code with every collective a no-op, and ``time_collectives`` can time
exactly the head's communication.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from dist_cosface.distributed import GroupMember


class Comm:
    """A process group (or None) plus a seconds counter for the head's collectives."""

    def __init__(self, group: dist.ProcessGroup | None) -> None:
        self.member = GroupMember.of(group)  # this rank's place in the head's group
        self.timed = False
        self.seconds = 0.0

    @property
    def group(self) -> dist.ProcessGroup | None:
        return self.member.group

    @property
    def rank(self) -> int:
        return self.member.rank

    @property
    def world_size(self) -> int:
        return self.member.world_size

    def _run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        """Call the collective ``fn`` on this group, timed when ``timed``."""
        if not self.timed:
            fn(*args, group=self.group, **kwargs)
            return
        device = args[0].device
        _sync(device)
        start = time.perf_counter()
        fn(*args, group=self.group, **kwargs)
        _sync(device)
        self.seconds += time.perf_counter() - start

    def all_gather(self, local: torch.Tensor) -> torch.Tensor:
        """[n, ...] (same n on every rank) -> [world * n, ...], rank-major."""
        if self.group is None:
            return local
        out = local.new_empty((self.world_size * local.shape[0], *local.shape[1:]))
        self._run(dist.all_gather_into_tensor, out, local.contiguous())
        return out

    def reduce_scatter(self, full: torch.Tensor) -> torch.Tensor:
        """[world * n, ...] summed over ranks, this rank's [n, ...] block."""
        if self.group is None:
            return full
        out = full.new_empty((full.shape[0] // self.world_size, *full.shape[1:]))
        self._run(dist.reduce_scatter_tensor, out, full.contiguous(), op=dist.ReduceOp.SUM)
        return out

    def all_reduce_(self, tensor: torch.Tensor, op: dist.ReduceOp = dist.ReduceOp.SUM) -> None:
        if self.group is not None:
            self._run(dist.all_reduce, tensor, op=op)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def pad_rows(local: torch.Tensor, rows: int) -> torch.Tensor:
    if local.shape[0] == rows:
        return local
    pad = local.new_zeros((rows - local.shape[0], *local.shape[1:]))
    return torch.cat([local, pad])


def unpad_rows(gathered: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """Drop each rank's padding from a rank-major gather of ``max(sizes)`` rows per rank."""
    width = max(sizes)
    if all(n == width for n in sizes):
        return gathered
    return torch.cat([gathered[r * width : r * width + n] for r, n in enumerate(sizes)])


def repad_rows(full: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """Inverse of :func:`unpad_rows`: rank-major blocks of ``max(sizes)`` rows, zero padded."""
    width = max(sizes)
    if all(n == width for n in sizes):
        return full
    blocks, start = [], 0
    for n in sizes:
        blocks.append(pad_rows(full[start : start + n], width))
        start += n
    return torch.cat(blocks)


class GatherBatch(torch.autograd.Function):
    """All-gather the local batch over the group, with uneven local sizes.

    Shapes: ``local [B_r, D]`` -> ``[sum_r B_r, D]`` (rank-major). Forward: one all-gather of
    ``[max_r B_r, D]`` padded blocks. Backward: one reduce-scatter (sum) of the gradient,
    multiplied by ``world_size``; see "Gradient convention" in ``head.py``.
    """

    @staticmethod
    def forward(ctx: Any, local: torch.Tensor, sizes: list[int], comm: Comm) -> torch.Tensor:
        ctx.sizes, ctx.comm = sizes, comm
        gathered = comm.all_gather(pad_rows(local, max(sizes)))
        return unpad_rows(gathered, sizes)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None]:
        comm: Comm = ctx.comm
        block = comm.reduce_scatter(repad_rows(grad, ctx.sizes))
        return block[: ctx.sizes[comm.rank]] * comm.world_size, None, None


def gather_labels(local: torch.Tensor, sizes: list[int], comm: Comm) -> torch.Tensor:
    return unpad_rows(comm.all_gather(pad_rows(local, max(sizes))), sizes)
