"""An exclusive lock on a run folder, so that two jobs never write into the same one.

Global rank 0 takes ``flock(LOCK_EX | LOCK_NB)`` on ``<output_dir>/.lock`` and writes who holds
it (host, pid, start time, launcher job id) into the file; the decision reaches every rank by
one all-reduce, so a second job fails at once on all of its ranks with an error naming the
holder instead of hanging. The kernel drops the lock when the holder exits, crashes included.

One rank per job is enough: a job has exactly one rank 0, so two jobs on one folder always
meet on that file. Across nodes the exclusion is as good as the file system's locks: local
disks, NFSv4 (Linux maps flock to NFS byte-range locks), GPFS and Lustre mounted with ``-o
flock`` lock cluster-wide; Lustre with ``localflock`` only locks within one node. A file
system without lock support (ENOLCK / EOPNOTSUPP) gets a warning and no lock.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import logging
import os
import socket
from pathlib import Path

from dist_cosface.agreement import Ballot
from dist_cosface.distributed import DistContext

log = logging.getLogger(__name__)

LOCK_NAME = ".lock"
_NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS)
_FORKED_AWAY: set[int] = set()  # lock fds that forked children close (see _close_in_child)
_registered = False


_LOCK_VOTES = Ballot("held", "failed")  # rank 0's: the folder is another job's / unlockable


class RunFolderLocked(RuntimeError):
    """Another job holds the run folder's lock."""


def _close_in_child() -> None:
    # A forked child (a data-loader worker) shares the lock's open file description; closing
    # its copy keeps an orphaned child from holding the lock after the trainer died.
    for fd in list(_FORKED_AWAY):
        try:
            os.close(fd)
        except OSError:
            pass
    _FORKED_AWAY.clear()


def _holder_info() -> dict:
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "job": os.environ.get("SLURM_JOB_ID") or os.environ.get("TORCHELASTIC_RUN_ID"),
    }


def describe_holder(lock_file: Path) -> str:
    """The holder recorded in ``lock_file``, as one line."""
    try:
        info = json.loads(lock_file.read_text())
        job = f", job {info['job']}" if info.get("job") else ""
        return f"host {info['host']}, pid {info['pid']}, started {info['started']}{job}"
    except (OSError, ValueError, KeyError, TypeError):
        return "unknown holder (lock file unreadable)"


class RunLock:
    """Context manager: hold ``<output_dir>/.lock`` for the lifetime of a training run."""

    def __init__(self, output_dir: str | Path, ctx: DistContext) -> None:
        self.path = Path(output_dir) / LOCK_NAME
        self.ctx = ctx
        self._fd: int | None = None

    def _try_lock(self) -> bool:
        """Rank 0: take the lock; False when another job holds it."""
        global _registered
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                return False
            if exc.errno in _NO_LOCKS:
                log.warning("%s: the file system does not support locks; run not locked", self.path)
                return True
            raise
        os.ftruncate(fd, 0)
        os.write(fd, (json.dumps(_holder_info()) + "\n").encode())
        self._fd = fd
        _FORKED_AWAY.add(fd)
        if not _registered:
            os.register_at_fork(after_in_child=_close_in_child)
            _registered = True
        return True

    def __enter__(self) -> RunLock:
        held, error = False, None  # held: by another job
        if self.ctx.is_main:
            try:
                held = not self._try_lock()
            except OSError as exc:  # e.g. an unwritable folder: the other ranks must not wait
                error = exc
        # every rank learns rank 0's decision (only rank 0 votes)
        votes = _LOCK_VOTES.tally(
            self.ctx.device, self.ctx.group, held=held, failed=error is not None
        )
        if error is not None:
            raise error
        if votes["failed"]:
            # an OSError as on rank 0: the CLI prints it as a known one-line failure
            raise OSError(f"rank 0 could not lock {self.path} (see rank 0's error)")
        if votes["held"]:
            raise RunFolderLocked(
                f"run folder {self.path.parent} is in use by another job "
                f"({describe_holder(self.path)}; lock file {self.path}); wait for it to end "
                "or choose another train.output_dir"
            )
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            _FORKED_AWAY.discard(self._fd)
            os.close(self._fd)  # releases the flock
            self._fd = None
