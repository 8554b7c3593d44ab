"""Helpers for the tests that start real launchers (``launch/torchrun.sh``, torchrun) as
subprocesses and watch their run folder: start, wait, kill, read steps and losses."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from tests.multiproc import free_port
from tests.tiny import TINY_OVERRIDES

REPO = Path(__file__).resolve().parents[1]

TINY = [*TINY_OVERRIDES, "dist.timeout_s=60"]


def launch(
    tmp_path: Path,
    out: Path,
    env_extra: dict[str, str],
    *overrides: str,
    log: str = "log.txt",
    prefix: Sequence[str] = (),
) -> subprocess.Popen:
    """``launch/torchrun.sh`` for 2 CPU ranks in the background (bash execs into torchrun).

    ``prefix`` goes before the command (``ip netns exec NAME`` runs it in a namespace).
    """
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("train:\n  seed: 0\n")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    env.update({"NPROC_PER_NODE": "2", "MASTER_PORT": str(free_port()), **env_extra})
    cmd = [*prefix, "bash", str(REPO / "launch" / "torchrun.sh"), str(cfg), *TINY]
    cmd += [f"train.output_dir={out}", *overrides]
    handle = (tmp_path / log).open("w")
    return subprocess.Popen(
        cmd, stdout=handle, stderr=subprocess.STDOUT, env=env, cwd=REPO, start_new_session=True
    )


def wait_for(predicate, proc: subprocess.Popen, timeout: float, what: str) -> None:
    """Poll ``predicate`` until true; fail (killing ``proc``) on timeout or if it exits first."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        if proc.poll() is not None:
            raise AssertionError(f"launcher exited ({proc.returncode}) before {what}")
        time.sleep(0.2)
    kill_tree(proc)
    raise AssertionError(f"timed out waiting for {what}")


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL torchrun and its workers; return once the workers are gone."""
    workers = children(proc.pid)
    for pid in [*workers, proc.pid]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=30)
    end = time.monotonic() + 30
    while any(Path(f"/proc/{pid}").exists() for pid in workers) and time.monotonic() < end:
        time.sleep(0.1)


def children(pid: int) -> list[int]:
    """The pids whose parent is ``pid``."""
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def alive(pid: int) -> bool:
    """Running (a zombie that nobody reaped yet has exited)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def logged_steps(out: Path) -> list[int]:
    """The steps in ``metrics.jsonl``, in order (a step logged twice appears twice)."""
    path = out / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if line]


def logged_losses(out: Path) -> dict[int, float]:
    """Loss per step; a step logged again after a restart counts with its last value."""
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return {rec["step"]: rec["loss"] for rec in map(json.loads, filter(None, lines))}


def checkpoint_steps(out: Path) -> list[int]:
    """The steps of the complete checkpoints (``meta.json`` written) in ``out``, ascending."""
    root = out / "checkpoints"
    return sorted(int(p.name[5:]) for p in root.glob("step_*") if (p / "meta.json").is_file())
