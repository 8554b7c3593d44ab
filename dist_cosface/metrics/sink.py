"""The one interface between the training loop and whatever records its steps.

Each optimizer step the trainer builds one :class:`StepRecord` and hands the same record to
every :class:`MetricsSink` it holds: rank 0's progress line and ``metrics.jsonl``
(``engine.progress.ProgressLog``) and the Prometheus exporter (``metrics.RunMetrics``). The
record holds python numbers the engine has already copied to the host, so no sink can make
the device synchronise.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable


@dataclass(frozen=True)
class LogValues:
    """What a log step (``train.log_every``, and the last step) adds to its record."""

    loss: float  # mean over the step's micro-batches; NaN/inf as they came
    lr: float
    grad_norm: float | None  # global norm, each classifier shard once; None when not finite
    skipped_samples: int | None = None  # the loader's running total, when it counts them
    bad_shards: int | None = None  # shards the loader found bad so far, when it counts them
    health: dict[str, float] = field(default_factory=dict)  # MarginHealth.to_floats(), or {}


@dataclass(frozen=True)
class StepRecord:
    """One optimizer step as every sink sees it."""

    step: int  # optimizer steps done, this one included
    samples: int  # samples THIS rank consumed in the step (Prometheus sums the ranks)
    world_size: int  # ranks in the run: ``samples * world_size`` is the step's global count
    step_seconds: float  # wall time of the whole iteration, the wait for its batches included
    data_wait_seconds: float  # the part of ``step_seconds`` spent waiting for batches
    comm_seconds: float | None = None  # time in the classifier's collectives, when measured
    logged: LogValues | None = None  # set on log steps only


@runtime_checkable
class MetricsSink(Protocol):
    """Receives every step's record; ``close`` once when the run ends (success or error)."""

    def write(self, record: StepRecord) -> None: ...

    def close(self) -> None: ...
