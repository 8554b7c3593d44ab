"""An endless batch stream over epochs on top of a :class:`~dist_cosface.data.TrainLoader`."""

from __future__ import annotations

import torch

from dist_cosface.data.protocol import TrainLoader


class EpochStream:
    """Endless (images, labels) stream over epochs that knows its current epoch."""

    def __init__(self, loader: TrainLoader, epoch: int, position: dict | None) -> None:
        self.loader, self.epoch = loader, epoch
        loader.set_epoch(epoch)
        if position is not None:
            loader.load_state_dict(position)
        self._it = iter(loader)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        for _ in range(2):
            try:
                return next(self._it)
            except StopIteration:
                # the loader's own epoch is authoritative (it moves on after a finished epoch)
                self.epoch = self.loader.epoch + 1
                self.loader.set_epoch(self.epoch)
                self._it = iter(self.loader)
        raise ValueError("the data loader yields no batches (len(loader) == 0?)")
