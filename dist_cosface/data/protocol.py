"""``TrainLoader``: what the trainer needs from a training data loader.

The DALI, webdataset and synthetic loaders (all :class:`~dist_cosface.data.base.BaseLoader`)
conform, and so must a loader passed to ``train(..., loader=...)``: the trainer reads these
members directly, never guessing with ``getattr``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class TrainLoader(Protocol):
    """Iterable of ``(images [B, 3, S, S], labels [B] int64)`` batches with exact-resume state.

    ``len()`` (batches per epoch) must be equal on every rank. ``epoch`` is the loader's own
    current epoch: after an exhausted epoch the trainer moves to ``epoch + 1``.
    """

    num_classes: int
    epoch: int
    # counters for the metrics: "skipped_samples" and, for file loaders, "bad_shards"
    stats: dict[str, int]

    @property
    def failure(self) -> str | None:
        """This rank's reason to stop the run (bad input data), voted on every step; or None."""
        ...

    def __len__(self) -> int: ...

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch``; keeps a restored in-epoch position when the epoch matches."""
        ...

    def state_dict(self) -> dict[str, int]: ...

    def load_state_dict(self, state: dict[str, int]) -> None: ...


TRAIN_LOADER_MEMBERS = (
    "num_classes",
    "epoch",
    "stats",
    "failure",
    "__len__",
    "__iter__",
    "set_epoch",
    "state_dict",
    "load_state_dict",
)


def check_train_loader(loader: object) -> None:
    """Raise TypeError naming the members ``loader`` lacks to be a :class:`TrainLoader`.

    Looks members up with ``hasattr`` (not ``isinstance``), so a wrapper that forwards
    attributes with ``__getattr__`` conforms as it does at run time.
    """
    missing = [name for name in TRAIN_LOADER_MEMBERS if not hasattr(loader, name)]
    if missing:
        raise TypeError(
            f"the training loader {type(loader).__name__} lacks {missing} "
            "(see dist_cosface.data.TrainLoader)"
        )
