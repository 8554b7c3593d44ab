"""SIGTERM (preemption) turns into a flag that the loop agrees on across ranks.

The handler only records the request; the loop finishes the current step, all-reduces the
flag with the step's gradient norm (no extra collective), writes a checkpoint on every rank
at the same step and returns normally, so the process exits 0.
"""

from __future__ import annotations

import signal
import threading


class StopRequest:
    """Context manager installing a SIGTERM handler (main thread only) that sets a flag."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = None

    def _handle(self, signum, frame) -> None:  # noqa: ARG002 - signal handler signature
        self.requested = True

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None
