"""The multi-process test helpers: ``run_ranks`` on real gloo ranks, ``free_port``, and
``on_subgroups`` to check several world sizes in one spawn.

``run_ranks`` and ``free_port`` live in ``tools/spawn.py`` (a non-test module), which the
benchmarks share; a failing, dying or hung rank fails the test with that rank's traceback or
exit status.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch.distributed as dist

from tools.spawn import RanksFailed, free_port, run_ranks

__all__ = ["RanksFailed", "free_port", "on_subgroups", "run_ranks"]

T = TypeVar("T")


def on_subgroups(
    rank: int, world_size: int, run: Callable[[dist.ProcessGroup | None], T]
) -> dict[int, T]:
    """``{size: run(group)}`` for each size 1..world_size, on the first ``size`` ranks.

    Size 1 passes ``group=None`` (the single-process path). Every rank takes part in building
    each sub-group (a collective), then only its members run.
    """
    out = {}
    for size in range(1, world_size + 1):
        group = dist.new_group(list(range(size)))
        if rank < size:
            out[size] = run(group if size > 1 else None)
    return out
