"""How the ranks of a group agree on a decision, so that none acts alone.

A rank that decides alone to stop (bad data, a failed save, a signal, a bad batch, a missing
file) leaves its peers waiting in their next collective until the group times out. So every
such decision is a vote: each rank states its own view, ONE collective tells every rank what
all the ranks said, and then every rank acts on the same outcome, typically by raising
together: the rank at fault with its own error, the others with an error about their peers.

Two carriers, chosen by what the decision needs:

- :class:`Ballot`: named numbers (flags and counts) in one float64 tensor, summed over the
  group (:meth:`Ballot.tally`) or gathered a row per rank (:meth:`Ballot.read_rows`). The
  tensor can ride in a collective the caller runs anyway (:meth:`Ballot.cast`, then
  :meth:`Ballot.read`): the trainer's votes travel in its gradient-norm all-reduce and the
  head's in its input all-gather, so there they cost no collective of their own.
- objects (:func:`gather_objects`): when the decision must carry text to every rank (which
  checkpoint, what failed and where): :func:`first_problem`, :func:`raise_on_any_rank`,
  :func:`run_agreed`. Pickled, so give them a gloo group when the training group is NCCL's.

Every function takes its group explicitly; None is one process, where a vote is the
process's own view and nothing is communicated.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


class Ballot:
    """The names of the numbers each rank votes with, in the order they travel."""

    def __init__(self, *names: str) -> None:
        if len(set(names)) != len(names) or not names:
            raise ValueError(f"a ballot needs distinct names, got {names}")
        self.names = names

    def __len__(self) -> int:
        return len(self.names)

    def cast(self, device: torch.device, **votes: float | bool | torch.Tensor) -> torch.Tensor:
        """This rank's votes as a float64 ``[len(self)]`` tensor on ``device``; a vote may be a
        0-d device tensor (it stays on the device: no host sync before the collective)."""
        if votes.keys() != set(self.names):
            raise ValueError(f"votes {sorted(votes)} do not match the ballot {list(self.names)}")
        return torch.stack(
            [
                torch.as_tensor(votes[name], dtype=torch.float64, device=device)
                for name in self.names
            ]
        )

    def read(self, values: torch.Tensor | Sequence[float]) -> dict[str, float]:
        """A summed ballot (or its part of a larger collective), by name, on the host."""
        values = values.tolist() if isinstance(values, torch.Tensor) else list(values)
        if len(values) != len(self.names):
            raise ValueError(f"{len(values)} values for the ballot {list(self.names)}")
        return dict(zip(self.names, values, strict=True))

    def read_rows(self, rows: torch.Tensor) -> list[dict[str, float]]:
        """A gathered ballot ``[world, len(self)]``: every rank's votes, in rank order."""
        return [self.read(row) for row in rows.tolist()]

    def tally(
        self, device: torch.device, group: dist.ProcessGroup | None, **votes: float | bool
    ) -> dict[str, float]:
        """The votes summed over ``group``, by name: one all-reduce, one host sync."""
        cast = self.cast(device, **votes)
        if group is not None:
            dist.all_reduce(cast, op=dist.ReduceOp.SUM, group=group)
        return self.read(cast)


def gather_objects(value: Any, group: dist.ProcessGroup | None) -> list[Any]:
    """Every rank's ``value`` over ``group``, in rank order (``[value]`` without one)."""
    if group is None:
        return [value]
    gathered: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, value, group=group)
    return gathered


def first_problem(problem: str | None, group: dist.ProcessGroup | None) -> str | None:
    """The lowest rank's problem over ``group`` (None: no rank had one), the same on every
    rank."""
    return next((p for p in gather_objects(problem, group) if p is not None), None)


def raise_on_any_rank(error: BaseException | None, group: dist.ProcessGroup | None) -> None:
    """Raise on every rank if any rank passes an error: a rank its own, the others a
    ValueError quoting the lowest failing rank's."""
    text = None if error is None else f"{type(error).__name__}: {error}"
    for rank, message in enumerate(gather_objects(text, group)):
        if message is None:
            continue
        if error is not None:
            raise error
        raise ValueError(f"rank {rank} failed: {message}")


def run_agreed(fn: Callable[[], T], group: dist.ProcessGroup | None) -> T:
    """Run a rank-local step; an exception on any rank is raised on every rank
    (:func:`raise_on_any_rank`)."""
    result, error = None, None
    try:
        result = fn()
    except Exception as exc:  # noqa: BLE001 - whatever it is, the other ranks must hear of it
        error = exc
    raise_on_any_rank(error, group)
    return result  # type: ignore[return-value]
