"""Rank 0's progress line and ``metrics.jsonl`` (one JSON object per log line)."""

from __future__ import annotations

import datetime
import json
import time
from pathlib import Path


class ProgressLog:
    """Accumulates step timings between log lines; only the main rank prints and writes."""

    def __init__(self, path: Path, enabled: bool, total_steps: int) -> None:
        self.path, self.enabled, self.total = path, enabled, total_steps
        self._seconds = 0.0
        self._samples = 0
        self._all_seconds = 0.0
        self._steps = 0

    def add(self, step_seconds: float, samples: int) -> None:
        self._seconds += step_seconds
        self._samples += samples
        self._all_seconds += step_seconds
        self._steps += 1

    def log(
        self,
        *,
        step: int,
        loss: float,
        lr: float,
        grad_norm: float | None,
        extra: dict[str, float] | None = None,
    ) -> float:
        """Print and record one line; returns samples/s since the previous line.

        ``extra``: more fields for the record (the classifier's margin health)."""
        rate = self._samples / self._seconds if self._seconds > 0 else 0.0
        self._seconds, self._samples = 0.0, 0
        if not self.enabled:
            return rate
        per_step = self._all_seconds / max(self._steps, 1)
        eta = datetime.timedelta(seconds=round(per_step * (self.total - step)))
        norm = f"{grad_norm:.3f}" if grad_norm is not None else "n/a"
        print(
            f"step {step}/{self.total} | {rate:.1f} samples/s | loss {loss:.4f} | "
            f"lr {lr:.5g} | grad_norm {norm}{_health_text(extra or {})} | eta {eta}",
            flush=True,
        )
        record = {
            "step": step,
            "time": time.time(),
            "samples_per_s": rate,
            "loss": loss,
            "lr": lr,
            "grad_norm": grad_norm,
            **(extra or {}),
        }
        with self.path.open("a") as fh:
            fh.write(json.dumps(record) + "\n")
        return rate


def _health_text(health: dict[str, float]) -> str:
    if "target_cos_mean" not in health:
        return ""
    return (
        f" | cos y {health['target_cos_mean']:.3f} neg {health['hardest_neg_cos_mean']:.3f}"
        f" | viol {health['margin_violation_rate']:.2f}"
    )
