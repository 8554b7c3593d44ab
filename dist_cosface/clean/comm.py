"""The collectives of ``dist-cosface clean`` that the eval helpers do not already offer.

All of them take the group explicitly and move CPU tensors to the group's device (NCCL only
moves CUDA tensors), returning results on the caller's device.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from dist_cosface.eval.ranks import comm_device


def exchange_rows(
    rows: torch.Tensor, send_counts: list[int], group: dist.ProcessGroup | None
) -> torch.Tensor:
    """All-to-all of row blocks: rows ``[sum(send_counts), ...]`` grouped by destination rank;
    returns the rows every rank sent here, in source-rank order."""
    if group is None:
        return rows
    here = rows.device
    device = comm_device(group, here)
    counts = torch.tensor(send_counts, dtype=torch.int64, device=device)
    recv_counts = torch.empty_like(counts)
    dist.all_to_all_single(recv_counts, counts, group=group)
    recv = recv_counts.tolist()
    out = torch.empty((sum(recv), *rows.shape[1:]), dtype=rows.dtype, device=device)
    dist.all_to_all_single(out, rows.contiguous().to(device), recv, send_counts, group=group)
    return out.to(here)


def pass_along_ring(
    held: torch.Tensor, incoming_rows: int, group: dist.ProcessGroup
) -> torch.Tensor:
    """Send ``held`` to the next rank, receive the previous rank's block (``incoming_rows``)."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    here = held.device
    device = comm_device(group, here)
    incoming = torch.empty((incoming_rows, *held.shape[1:]), dtype=held.dtype, device=device)
    nxt = dist.get_global_rank(group, (rank + 1) % world)
    prev = dist.get_global_rank(group, (rank - 1) % world)
    ops = [dist.P2POp(dist.isend, held.contiguous().to(device), nxt, group)]
    ops.append(dist.P2POp(dist.irecv, incoming, prev, group))
    for request in dist.batch_isend_irecv(ops):
        request.wait()
    return incoming.to(here)


def all_reduce_(tensor: torch.Tensor, group: dist.ProcessGroup | None, op=None) -> torch.Tensor:
    """In-place all-reduce (SUM by default) of a tensor on any device; returns it."""
    if group is None:
        return tensor
    device = comm_device(group, tensor.device)
    moved = tensor.to(device)
    dist.all_reduce(moved, op=op or dist.ReduceOp.SUM, group=group)
    tensor.copy_(moved)
    return tensor


def any_rank(flag: bool, group: dist.ProcessGroup | None) -> bool:
    """Whether ``flag`` holds on any rank (collective)."""
    value = torch.tensor([1 if flag else 0], dtype=torch.int64)
    return bool(all_reduce_(value, group, dist.ReduceOp.MAX).item())
