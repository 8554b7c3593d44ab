"""The run-folder lock: a second job on one output_dir fails at once, naming the holder."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from dist_cosface.distributed import DistContext, context_from_group
from dist_cosface.engine import train
from dist_cosface.engine.runlock import RunFolderLocked, RunLock
from tests.multiproc import run_ranks
from tests.tiny import tiny_config

REPO = Path(__file__).resolve().parents[2]

_HOLDER = textwrap.dedent(
    """
    import sys, time
    from dist_cosface.distributed import DistContext
    from dist_cosface.engine.runlock import RunLock

    with RunLock(sys.argv[1], DistContext()):
        print("locked", flush=True)
        time.sleep(600)
    """
)


def _hold(folder: Path) -> subprocess.Popen:
    """Another process (another job's rank 0) holding the lock on ``folder``."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(folder)], stdout=subprocess.PIPE, text=True, env=env
    )
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_second_job_fails_at_once_naming_the_holder(tmp_path):
    out = tmp_path / "run"
    holder = _hold(out)
    try:
        with pytest.raises(RunFolderLocked, match=rf"in use by another job .*pid {holder.pid},"):
            train(tiny_config(out), DistContext())
        assert not (out / "checkpoints").exists() and not (out / "metrics.jsonl").exists()
    finally:
        holder.kill()  # SIGKILL: the kernel releases the lock of a crashed holder
        holder.wait()
    summary = train(tiny_config(out), DistContext())
    assert summary.step == 3
    with RunLock(out, DistContext()):  # released after the run
        with pytest.raises(RunFolderLocked):  # one process cannot take it twice either
            RunLock(out, DistContext()).__enter__()


def _train_locked_out(rank, world, out):
    ctx = context_from_group(dist.group.WORLD, torch.device("cpu"))
    try:
        train(tiny_config(out), ctx)
    except RunFolderLocked as exc:
        return str(exc)
    return "trained"


@pytest.mark.multiproc
def test_every_rank_of_the_second_job_learns_the_lock_is_taken(tmp_path):
    out = tmp_path / "run"
    holder = _hold(out)
    try:
        messages = run_ranks(2, _train_locked_out, str(out), timeout_s=120)
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    for message in messages:  # no rank trained, none hung
        assert f"pid {holder.pid}" in message and str(out / ".lock") in message
