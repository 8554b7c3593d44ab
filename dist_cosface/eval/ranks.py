"""A rank's share of the distributed evaluation and its collectives: which slice of a list it
embeds, and gathering per-rank rows.

Every evaluation phase that can fail on one rank only (a missing image in its slice) runs
through :func:`dist_cosface.agreement.run_agreed`, so the failure stops every rank with the
same message instead of leaving the others waiting in the next collective until the
process-group timeout.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from dist_cosface.distributed import GroupMember


def shard_range(num_items: int, rank: int, world_size: int) -> tuple[int, int]:
    """Contiguous ``[start, stop)`` of ``num_items`` owned by ``rank`` (sizes differ by <= 1)."""
    base, extra = divmod(num_items, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def rank_slice(
    num_items: int, group: dist.ProcessGroup | None, batch_size: int = 1
) -> tuple[int, int]:
    """This rank's contiguous ``[start, stop)`` of a list, made of whole batches.

    Cutting only between batches of ``batch_size`` keeps every image in the same batch
    whatever the number of ranks: convolution kernels may round differently for other batch
    shapes, and near-equal scores would then order differently.
    """
    member = GroupMember.of(group)
    num_batches = -(-num_items // batch_size)
    first, last = shard_range(num_batches, member.rank, member.world_size)
    return min(first * batch_size, num_items), min(last * batch_size, num_items)


def comm_device(group: dist.ProcessGroup, fallback: torch.device) -> torch.device:
    """Where the group's tensors must live: NCCL only moves CUDA tensors."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return fallback


def all_gather_tensor(tensor: torch.Tensor, group: dist.ProcessGroup) -> list[torch.Tensor]:
    """Every rank's same-shape ``tensor``, on the caller's device (NCCL-safe for CPU data)."""
    here = tensor.device
    sent = tensor.contiguous().to(comm_device(group, here))
    parts = [torch.empty_like(sent) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, sent, group=group)
    return [p.to(here) for p in parts]


def gather_rows(local: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Concatenate every rank's ``[n_r, ...]`` rows in rank order (``n_r`` may differ)."""
    if group is None:
        return local
    count = torch.tensor([local.shape[0]], dtype=torch.int64, device=local.device)
    sizes = [int(c.item()) for c in all_gather_tensor(count, group)]
    padded = local.new_zeros((max(sizes), *local.shape[1:]))
    padded[: local.shape[0]] = local
    parts = all_gather_tensor(padded, group)
    return torch.cat([p[:n] for p, n in zip(parts, sizes, strict=True)])
