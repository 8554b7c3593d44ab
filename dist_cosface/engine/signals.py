"""Stop requests the loop agrees on across ranks: SIGTERM (preemption) and a dead launcher.

The SIGTERM handler only records the request; the loop finishes the current step, all-reduces
the flags with the step's gradient norm (no extra collective), writes a checkpoint on every
rank at the same step and returns normally, so the process exits 0.

A worker whose launcher (the torchrun agent, DeepSpeed's launch.py) is killed with SIGKILL is
reparented and would otherwise train on unsupervised. :func:`watch_launcher` polls the parent
pid from a daemon thread; when it changes it sends this process SIGTERM (the same checkpoint-
and-stop path, flagged ``launcher_lost`` so the CLI exits non-zero) and, if the process is
still alive ``grace_s`` later (say, blocked in a collective with a peer that died), exits
hard. Polling rather than ``prctl(PR_SET_PDEATHSIG)``: the death signal follows the launcher
*thread* that started the worker, not the launcher process, and is Linux-only.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time

log = logging.getLogger(__name__)

EXIT_LAUNCHER_LOST = 3  # the hard exit when the graceful stop did not finish in time
_launcher_lost = threading.Event()


def launcher_lost() -> bool:
    """True once the launcher that started this process has died."""
    return _launcher_lost.is_set()


def _watch(parent: int, interval_s: float, grace_s: float) -> None:
    while os.getppid() == parent:
        time.sleep(interval_s)
    _launcher_lost.set()
    log.error("launcher (pid %d) is gone: checkpointing at the next step and stopping", parent)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(grace_s)
    log.error("still running %.0f s after the launcher died: exiting now", grace_s)
    logging.shutdown()
    os._exit(EXIT_LAUNCHER_LOST)


def watch_launcher(grace_s: float, interval_s: float = 1.0) -> bool:
    """Start the parent watch when a launcher started this process (LOCAL_RANK is set).

    A plain ``dist-cosface train`` (no launcher) is not watched: its parent is a shell, and a
    closed terminal under ``nohup`` must not stop training. Returns whether a watch started.
    """
    if not os.environ.get("LOCAL_RANK"):
        return False
    thread = threading.Thread(
        target=_watch,
        args=(os.getppid(), interval_s, grace_s),
        name="launcher-watch",
        daemon=True,
    )
    thread.start()
    return True


class StopRequest:
    """Context manager installing a SIGTERM handler (main thread only) that sets a flag."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = None

    @property
    def launcher_lost(self) -> bool:
        return launcher_lost()

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
