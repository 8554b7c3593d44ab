"""What a loader lost: counted, logged (rate-limited), summarized per epoch, and turned into
one decision that every rank shares.

A rank only sees the bad samples of the shards it reads, so a rank that decides alone to stop
would leave the others waiting in their next collective. Instead a rank records a *failure*
(stop mode: the first bad sample or shard; skip mode: more than ``data.max_skip_fraction`` of
the epoch lost) and keeps handing out batches; the training loop votes on
``loader.failure`` in its one per-step all-reduce and every rank raises at the same step
(:func:`raise_data_failure`). The loader also reduces its counts at each epoch end, which gives
callers that do not vote (tools, tests) the same shared decision, at the latest then. Both
votes are ``dist_cosface.agreement`` ballots.
"""

from __future__ import annotations

import logging

import torch

from dist_cosface.agreement import Ballot

log = logging.getLogger(__name__)

LOG_PER_EPOCH = 10  # bad samples/shards logged in full per rank and epoch; the rest are counted
_EPOCH_VOTES = Ballot("lost", "failed")  # summed: samples lost, ranks that must stop


class BadDataLog:
    """Counters and decisions of one rank's loader about lost samples and bad shards."""

    def __init__(self, on_bad: str, max_fraction: float, epoch_samples: int, rank: int = 0):
        self.on_bad, self.max_fraction, self.rank = on_bad, max_fraction, rank
        self.epoch_samples = max(1, epoch_samples)  # what an epoch should deliver (manifest)
        self.static_lost = 0  # samples dropped before reading (same on every rank)
        self.total_samples = 0  # cumulative runtime + static, for metrics
        self.bad_shard_names: set[str] = set()
        self.static_bad_shards = 0
        self.failure: str | None = None
        self.start_epoch()

    @property
    def bad_shards(self) -> int:
        return self.static_bad_shards + len(self.bad_shard_names)

    def start_epoch(self) -> None:
        self.epoch_lost = 0
        self.epoch_events = 0
        # bad shards and samples (shard and key) met this epoch: an endless stream that
        # re-reads a shard within the epoch meets them again, and they count once
        self.epoch_seen: set[str] = set()

    def _too_many(self, lost: int) -> bool:
        return self.max_fraction < 1.0 and lost > self.max_fraction * self.epoch_samples

    def add_static(self, lost: int, bad_shards: int, problems: list[str], announce: bool) -> None:
        """Losses found before reading (the same on every rank; logged by one)."""
        self.static_lost, self.static_bad_shards = lost, bad_shards
        self.total_samples += lost
        if announce:
            for problem in problems[:LOG_PER_EPOCH]:
                log.warning("bad data, skipped before reading: %s", problem)
            if len(problems) > LOG_PER_EPOCH:
                log.warning("... %d more bad-shard problems", len(problems) - LOG_PER_EPOCH)
            if lost:
                log.warning(
                    "%d of %d samples unusable (%.2f%%), %d bad shards",
                    lost,
                    self.epoch_samples,
                    100 * lost / self.epoch_samples,
                    bad_shards,
                )

    def record(self, where: str, problem: str, lost: int = 1, shard: str = "") -> None:
        """One bad sample (``where`` names shard and key) or ``lost`` samples of the bad shard
        ``shard``, met while reading; counted and logged once per epoch."""
        seen = shard or where
        if seen in self.epoch_seen:
            return
        self.epoch_seen.add(seen)
        self.epoch_lost += lost
        self.total_samples += lost
        self.epoch_events += 1
        if shard:
            self.bad_shard_names.add(shard)
        message = f"{where}: {problem}"
        if self.epoch_events <= LOG_PER_EPOCH:
            log.warning("rank %d: bad data (%s mode): %s", self.rank, self.on_bad, message)
        elif self.epoch_events == LOG_PER_EPOCH + 1:
            log.warning("rank %d: more bad data this epoch, counted only", self.rank)
        if self.failure is None and self.on_bad == "stop":
            self.failure = f"{message} (data.on_bad_sample=stop)"
        lost_now = self.static_lost + self.epoch_lost
        if self.failure is None and self._too_many(lost_now):
            self.failure = (
                f"{message}; rank {self.rank} alone lost {lost_now} of the epoch's "
                f"{self.epoch_samples} samples, more than data.max_skip_fraction="
                f"{self.max_fraction:g}"
            )

    def fail(self, message: str) -> None:
        """A backend that cannot go on (its reader died); the shared decision stops the run."""
        if self.failure is None:
            self.failure = message
        log.error("rank %d: %s", self.rank, message)

    def end_epoch(self, epoch: int, group, device: torch.device) -> None:
        """Reduce this epoch's counts over ``group`` (every rank calls it), log, and decide."""
        # one all-reduce, one host sync per epoch
        votes = _EPOCH_VOTES.tally(
            device, group, lost=self.epoch_lost, failed=self.failure is not None
        )
        runtime_lost, failed = int(votes["lost"]), int(votes["failed"])
        lost = self.static_lost + runtime_lost
        fraction = lost / self.epoch_samples
        if lost and self.rank == 0:
            log.warning(
                "epoch %d: %d of %d samples lost (%.2f%%) on all ranks, %d bad shards on rank 0",
                epoch,
                lost,
                self.epoch_samples,
                100 * fraction,
                self.bad_shards,
            )
        if failed:
            raise_data_failure(self, failed)
        if self._too_many(lost):
            raise ValueError(
                f"epoch {epoch}: {lost} of {self.epoch_samples} samples lost ({fraction:.2%}), "
                f"more than data.max_skip_fraction={self.max_fraction:g}; see the bad data "
                "warnings in the ranks' logs"
            )
        self.start_epoch()


def raise_data_failure(loader, votes: int) -> None:
    """Raise on every rank once ``votes`` ranks reported a data failure (after the vote)."""
    own = loader.failure
    if own is not None:
        raise ValueError(f"bad input data: {own}")
    raise ValueError(
        f"bad input data on {votes} other rank(s): stopping with them (their logs name the shard)"
    )
