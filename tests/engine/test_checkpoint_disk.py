"""A full disk fails the save that meets it, on every rank at once, in one line.

A real ENOSPC: the runs write into a small tmpfs the test mounts (root only; skipped with the
reason otherwise), filled so that the next checkpoint does not fit. Synchronous saves stop at
that save (rank 0 checks the room before anything is written); an asynchronous writer that
meets the full disk is voted on at the next step (at the latest, the next save waits for it
and fails). Either way
every rank raises the same one-line ``CheckpointWriteError`` naming the folder, the bytes the
checkpoint needs and the bytes free, and the previous checkpoint stays intact.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from dist_cosface.distributed import DistContext, context_from_group
from dist_cosface.engine import train
from dist_cosface.engine.checkpoint import CheckpointWriteError, resolve_checkpoint
from tests.multiproc import run_ranks
from tests.tiny import tiny_config

EVERY = 10  # an asynchronous failure must stop the run before the next save (step 20)


@contextlib.contextmanager
def small_disk(path: Path, size: str = "64m"):
    """A tmpfs of ``size`` mounted at ``path`` (skips the test where mounting is refused)."""
    path.mkdir(parents=True, exist_ok=True)
    mount = ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)]
    try:
        done = subprocess.run(mount, capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        pytest.skip("no mount command: a real full disk needs a tmpfs")
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs for a real full disk: {done.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=30)


def fill_disk(folder: Path, leave: int) -> None:
    """Take all free space of ``folder``'s file system but ``leave`` bytes."""
    take = shutil.disk_usage(folder).free - leave
    with open(folder / "filler", "wb") as handle:
        os.posix_fallocate(handle.fileno(), 0, max(take, 0))


def checkpoint_bytes(ckpt: Path) -> int:
    return sum(p.stat().st_size for p in ckpt.rglob("*") if p.is_file())


class _Errors(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def fails_with(cfg, ctx) -> dict:
    """Train ``cfg`` expecting a CheckpointWriteError: its message and what was logged."""
    errors = _Errors()
    logging.getLogger("dist_cosface").addHandler(errors)
    try:
        train(cfg, ctx)
    except CheckpointWriteError as exc:
        message = str(exc)
    else:
        message = None
    finally:
        logging.getLogger("dist_cosface").removeHandler(errors)
    logged = [(r.getMessage(), r.exc_info is not None) for r in errors.records]
    return {"message": message, "logged": logged}


def _full_disk_on_ranks(rank, world, disk, engine):
    """Per mode: a first checkpoint, the disk filled to half the next one, the run resumed."""
    import dist_cosface.engine.checkpoint.manager as checkpoint

    ctx = context_from_group(dist.group.WORLD, torch.device("cpu"))
    results = {}
    for mode in ("sync", "async"):
        out = Path(disk) / mode
        steps = [
            f"train.engine={engine}",
            "checkpoint.keep_last=1",
            f"checkpoint.every_steps={EVERY}",
        ]
        steps.append(f"checkpoint.async_save={mode == 'async'}")
        train(tiny_config(out, *steps, f"train.total_steps={EVERY}"), ctx)
        if rank == 0:
            fill_disk(
                Path(disk), leave=checkpoint_bytes(out / "checkpoints" / f"step_{EVERY}") // 2
            )
        dist.barrier()
        if mode == "async":  # no room check: the writer thread itself meets the full disk
            checkpoint.Checkpointer._room_problem = lambda self, target: None
        results[mode] = fails_with(tiny_config(out, *steps, f"train.total_steps={4 * EVERY}"), ctx)
        dist.barrier()
        if rank == 0:
            os.unlink(Path(disk) / "filler")
    return results


def _last_step(run: Path) -> int:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return max(json.loads(line).get("step", 0) for line in lines)


@pytest.mark.multiproc
def test_full_disk_fails_that_save_on_every_rank_in_one_line(tmp_path):
    with small_disk(tmp_path / "disk") as disk:
        per_rank = run_ranks(2, _full_disk_on_ranks, str(disk), "ddp", timeout_s=300)
        for mode in ("sync", "async"):
            run = disk / mode
            messages = {r[mode]["message"] for r in per_rank}
            assert len(messages) == 1, messages  # every rank stopped, with the same line
            (message,) = messages
            assert message is not None and "\n" not in message
            assert f"checkpoint step_{2 * EVERY}" in message and str(run / "checkpoints") in message
            assert "needs about" in message and "free" in message
            assert "previous checkpoints are kept" in message
            for r in per_rank:  # the trainer's log: that line, no traceback
                assert [m for m, tb in r[mode]["logged"] if tb] == []
                assert any(message in m for m, _ in r[mode]["logged"])
            stopped = _last_step(run)
            if mode == "sync":
                assert stopped == 2 * EVERY  # at that save
            else:
                # voted on as soon as the writer fails (a fast writer fails before the step
                # that launched it is logged), at the latest when the next save waits for it
                # (a loaded machine can keep a writer busy for ten tiny steps)
                assert 2 * EVERY <= stopped <= 3 * EVERY
            previous = run / "checkpoints" / f"step_{EVERY}"
            assert resolve_checkpoint(previous, DistContext()) == previous  # files intact
            assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [previous.name]
