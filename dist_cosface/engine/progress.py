"""Rank 0's run output: the progress line, ``metrics.jsonl`` and the evaluation result lines.

The lines go to this module's logger at INFO (``dist-cosface train`` writes them bare on
stdout, cli.py); ``metrics.jsonl`` holds one JSON object per progress line.
"""

from __future__ import annotations

import datetime
import json
import logging
import time
from pathlib import Path

from dist_cosface.metrics.sink import LogValues, StepRecord

log = logging.getLogger(__name__)


class ProgressLog:
    """A :class:`~dist_cosface.metrics.sink.MetricsSink`: accumulates step timings between log
    steps; only the main rank (``enabled``) logs and writes."""

    def __init__(self, path: Path, enabled: bool, total_steps: int) -> None:
        self.path, self.enabled, self.total = path, enabled, total_steps
        self.rate: float | None = None  # global samples/s over the last log interval
        self._seconds = 0.0
        self._samples = 0
        self._all_seconds = 0.0
        self._steps = 0

    def write(self, record: StepRecord) -> None:
        """Count the step; on a log step, log the line and append it to ``metrics.jsonl``."""
        self._seconds += record.step_seconds
        self._samples += record.samples * record.world_size
        self._all_seconds += record.step_seconds
        self._steps += 1
        if record.logged is not None:
            self._log_line(record.step, record.logged)

    def close(self) -> None:
        """Nothing held open: each line is appended and closed as it is written."""

    def log_eval(self, target: str, result: dict) -> None:
        """The result line of one evaluation target (a failed one says so)."""
        if not self.enabled:
            return
        if "error" in result:
            log.info("eval %s: FAILED (%s); training results are kept", target, result["error"])
        else:
            log.info("eval %s: accuracy %.4f", target, result["accuracy"])

    def _log_line(self, step: int, values: LogValues) -> None:
        self.rate = self._samples / self._seconds if self._seconds > 0 else 0.0
        self._seconds, self._samples = 0.0, 0
        if not self.enabled:
            return
        per_step = self._all_seconds / max(self._steps, 1)
        eta = datetime.timedelta(seconds=round(per_step * (self.total - step)))
        norm = f"{values.grad_norm:.3f}" if values.grad_norm is not None else "n/a"
        log.info(
            "step %d/%d | %.1f samples/s | loss %.4f | lr %.5g | grad_norm %s%s | eta %s",
            step,
            self.total,
            self.rate,
            values.loss,
            values.lr,
            norm,
            _health_text(values.health),
            eta,
        )
        record = {
            "step": step,
            "time": time.time(),
            "samples_per_s": self.rate,
            "loss": values.loss,
            "lr": values.lr,
            "grad_norm": values.grad_norm,
            **values.health,
        }
        with self.path.open("a") as fh:
            fh.write(json.dumps(record) + "\n")


def _health_text(health: dict[str, float]) -> str:
    if "target_cos_mean" not in health:
        return ""
    return (
        f" | cos y {health['target_cos_mean']:.3f} neg {health['hardest_neg_cos_mean']:.3f}"
        f" | viol {health['margin_violation_rate']:.2f}"
    )
