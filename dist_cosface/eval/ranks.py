"""Collectives of the distributed evaluation: agreeing on failures, gathering per-rank rows.

Every evaluation phase that can fail on one rank only (a missing image in its slice) ends with
:func:`raise_on_any_rank`, so the failure stops every rank with the same message instead of
leaving the others waiting in the next collective until the process-group timeout.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


def world(group: dist.ProcessGroup | None) -> tuple[int, int]:
    """(rank, world_size) in ``group``; (0, 1) without a group."""
    if group is None:
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def raise_on_any_rank(error: BaseException | None, group: dist.ProcessGroup | None) -> None:
    """Collective: raise on every rank if any rank passes an error (lowest rank's message)."""
    if group is None:
        if error is not None:
            raise error
        return
    messages: list = [None] * dist.get_world_size(group)
    text = None if error is None else f"{type(error).__name__}: {error}"
    dist.all_gather_object(messages, text, group=group)
    for rank, message in enumerate(messages):
        if message is None:
            continue
        if error is not None:
            raise error
        raise ValueError(f"rank {rank} failed: {message}")


def run_agreed(fn: Callable[[], T], group: dist.ProcessGroup | None) -> T:
    """Run a rank-local step; an exception on any rank is raised on every rank.

    The failing rank re-raises its own exception, the others a ValueError quoting it.
    """
    result, error = None, None
    try:
        result = fn()
    except Exception as exc:  # noqa: BLE001 - whatever it is, the other ranks must hear of it
        error = exc
    raise_on_any_rank(error, group)
    return result  # type: ignore[return-value]


def gather_rows(local: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Concatenate every rank's ``[n_r, ...]`` rows in rank order (``n_r`` may differ)."""
    if group is None:
        return local
    world_size = dist.get_world_size(group)
    count = torch.tensor([local.shape[0]], dtype=torch.int64, device=local.device)
    counts = [torch.zeros_like(count) for _ in range(world_size)]
    dist.all_gather(counts, count, group=group)
    sizes = [int(c.item()) for c in counts]
    padded = local.new_zeros((max(sizes), *local.shape[1:]))
    padded[: local.shape[0]] = local
    parts = [torch.empty_like(padded) for _ in range(world_size)]
    dist.all_gather(parts, padded.contiguous(), group=group)
    return torch.cat([p[:n] for p, n in zip(parts, sizes, strict=True)])
