"""What every training loader shares: epoch length, epoch/position state and counters.

A backend yields an endless, deterministic stream of batches for ``(epoch, start_batch)``;
this class takes exactly ``len(self)`` of them, so every rank runs the same number of steps
even when a rank's part is smaller or samples were skipped (a rank that ran dry while others
wait in a collective would hang the job). Losses go to a :class:`BadDataLog`; a rank whose
backend dies keeps handing out placeholder batches until the shared decision stops every rank
(see ``data/integrity.py``).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch

from dist_cosface.data.integrity import BadDataLog

if TYPE_CHECKING:
    from dist_cosface.data.config import DataConfig
    from dist_cosface.data.dataset import ShardSet
    from dist_cosface.distributed import DistContext

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class BaseLoader:
    """Iterable of ``(images [B, 3, S, S], labels [B] int64)`` with exact-resume state.

    Conforms to :class:`~dist_cosface.data.protocol.TrainLoader`.
    """

    def __init__(self, num_batches: int, num_classes: int):
        if num_batches < 1:
            raise ValueError("the data gives this rank no full batch; lower data.batch_size")
        self.num_batches = num_batches
        self.num_classes = num_classes
        self.epoch = 0
        self.position = 0  # batches of ``epoch`` already handed out
        self.stats: dict[str, int] = {"skipped_samples": 0}
        self.bad: BadDataLog | None = None  # set by loaders that read files (track_bad_data)
        self.group = None  # process group of the epoch-end reduction (None: one process)
        self.sync_device = torch.device("cpu")
        self.out_device = torch.device("cpu")

    def track_bad_data(self, cfg: DataConfig, ctx: DistContext, shards: ShardSet) -> None:
        """Count losses against the manifest's sample count; static ones are logged once."""
        self.bad = BadDataLog(
            cfg.on_bad_sample, cfg.max_skip_fraction, shards.manifest.num_samples, ctx.rank
        )
        self.bad.add_static(
            shards.skipped_samples, shards.bad_shards, shards.problems, announce=ctx.rank == 0
        )
        self.group, self.sync_device = ctx.group, ctx.device
        self._sync_stats()

    @property
    def failure(self) -> str | None:
        """This rank's reason to stop the run (voted on by the loop), or None."""
        return None if self.bad is None else self.bad.failure

    def _sync_stats(self) -> None:
        if self.bad is not None:
            self.stats["skipped_samples"] = self.bad.total_samples
            self.stats["bad_shards"] = self.bad.bad_shards

    def __len__(self) -> int:
        return self.num_batches

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch``; keeps a restored in-epoch position when the epoch matches."""
        if epoch != self.epoch:
            self.epoch, self.position = epoch, 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batches_consumed": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        position = int(state["batches_consumed"])
        if not 0 <= position <= self.num_batches:
            raise ValueError(
                f"loader state batches_consumed={position} outside [0, {self.num_batches}]"
            )
        self.epoch, self.position = int(state["epoch"]), position

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.position >= self.num_batches:  # finished epoch not followed by set_epoch
            self.epoch, self.position = self.epoch + 1, 0
        stream = self._batches(self.epoch, self.position)
        self._dead = False
        try:
            while self.position < self.num_batches:
                batch = self._next_batch(stream)
                self.position += 1
                self._sync_stats()
                if self.failure is not None and self.group is None:
                    raise ValueError(f"bad input data: {self.failure}")
                yield batch
        finally:
            close = getattr(stream, "close", None)
            if close is not None:
                close()
        if self.bad is not None:  # every rank gets here after the same number of batches
            self.bad.end_epoch(self.epoch, self.group, self.sync_device)

    def _next_batch(self, stream) -> tuple[torch.Tensor, torch.Tensor]:
        """The stream's next batch; in a group, a dead stream gives placeholders (see module)."""
        if not self._dead:
            try:
                return next(stream)
            except (ValueError, RuntimeError, OSError) as exc:
                if self.group is None or self.bad is None:
                    raise
                self.bad.fail(f"the {type(self).__name__} stopped: {exc}")
                self._dead = True
        # zeros, never trained on: the loop's vote stops every rank before the optimizer step
        cfg = self.cfg
        size, dtype = cfg.image_size, DTYPES[cfg.output_dtype]
        images = torch.zeros(cfg.batch_size, 3, size, size, dtype=dtype, device=self.out_device)
        return images, torch.zeros(cfg.batch_size, dtype=torch.int64, device=self.out_device)

    def _batches(self, epoch: int, start: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Endless stream of the epoch's batches starting at batch ``start``."""
        raise NotImplementedError


def repair_batch(
    images: torch.Tensor, labels: torch.Tensor, bad: torch.Tensor, where: str
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Overwrite bad samples with copies of good ones from the same batch.

    Keeps the batch shape and the batch boundaries fixed, so a resumed run sees exactly the
    same batches without decoding the skipped ones. Returns the number of replaced samples.
    """
    num_bad = int(bad.sum())
    if num_bad == 0:
        return images, labels, 0
    good = torch.nonzero(~bad).flatten()
    if good.numel() == 0:
        raise ValueError(f"{where}: every sample of a batch was bad")
    bad_idx = torch.nonzero(bad).flatten()
    source = good[torch.arange(num_bad) % good.numel()]
    images[bad_idx.to(images.device)] = images[source.to(images.device)]
    labels[bad_idx.to(labels.device)] = labels[source.to(labels.device)]
    return images, labels, num_bad
