"""Every finished run exits 0: consecutive 2-rank ``dist-cosface train`` jobs with async saves.

Before ``Checkpointer.close`` (the writer thread joined, its group destroyed) about a third of
such runs ended in SIGABRT at interpreter exit ("terminate called without an active
exception"): the daemon writer thread was still freeing its snapshot when the interpreter shut
down. The runs here are real 2-rank jobs, each rank a process that runs the CLI's ``train`` and
then the interpreter's normal exit; they are forked from one driver that imported torch once
(``python -m tests.engine.test_checkpoint_exit RUNS OUT``), which keeps 30 of them affordable.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from tests.tiny import TINY_OVERRIDES

RUNS = 30
CONCURRENT = 2  # jobs at a time; each is its own 2-rank group on its own port
_TRAIN = [
    *TINY_OVERRIDES,
    "train.total_steps=1",
    "checkpoint.every_steps=0",  # the final step's save, still in flight when training ends
    "checkpoint.async_save=true",
]


@pytest.mark.slow
@pytest.mark.multiproc
def test_consecutive_async_runs_all_exit_zero(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.getcwd(), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "tests.engine.test_checkpoint_exit", str(RUNS), str(tmp_path)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    codes = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(codes) == RUNS
    failed = {run: c for run, c in enumerate(codes) if c != [0, 0]}
    if failed:
        first = min(failed)
        log = (tmp_path / f"run{first}" / "rank0.log").read_text()[-2000:]
        pytest.fail(f"{len(failed)} of {RUNS} runs exited non-zero {failed}; run {first}:\n{log}")


def _rank(run: int, rank: int, port: int, out: str) -> None:
    """In a forked child: one rank of job ``run``, exactly as torchrun would start it."""
    from dist_cosface.cli import main

    folder = f"{out}/run{run}"
    os.makedirs(folder, exist_ok=True)
    log = os.open(f"{folder}/rank{rank}.log", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE="2",
        LOCAL_WORLD_SIZE="2",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    # SystemExit unwinds to the top of this module: the interpreter then exits normally
    sys.exit(main(["train", f"{out}/config.yaml", *_TRAIN, f"train.output_dir={folder}/out"]))


def _start_job(run: int, out: str) -> list[int] | None:
    """Fork the two ranks of job ``run``; their pids (None in a child, after it ran)."""
    from tools.spawn import free_port

    port = free_port()
    pids = []
    for rank in range(2):
        pid = os.fork()
        if pid == 0:
            _rank(run, rank, port, out)
        pids.append(pid)
    return pids


def _drive(runs: int, out: str) -> list[list[int]]:
    """Exit codes ``[rank 0, rank 1]`` of ``runs`` jobs, ``CONCURRENT`` at a time."""
    with open(f"{out}/config.yaml", "w") as handle:
        handle.write("train:\n  log_every: 1\n")
    codes: list[list[int]] = [[0, 0] for _ in range(runs)]
    running: dict[int, list[int]] = {}
    started = 0
    deadline = time.monotonic() + 60.0 * runs
    while started < runs or running:
        while started < runs and len(running) < CONCURRENT:
            running[started] = _start_job(started, out)
            started += 1
        pid, status = os.wait()
        for run, pids in running.items():
            if pid in pids:
                codes[run][pids.index(pid)] = os.waitstatus_to_exitcode(status)
                pids[pids.index(pid)] = -1
                if pids == [-1, -1]:
                    del running[run]
                break
        if time.monotonic() > deadline:
            raise TimeoutError(f"jobs {sorted(running)} still running")
    return codes


def _preload() -> None:
    """What every rank imports anyway, once, before forking (torch's lazy imports too)."""
    import gc

    import torch._dynamo  # noqa: F401 - first optimizer construction imports it
    import torch.distributed.checkpoint  # noqa: F401
    import torch.distributed.tensor  # noqa: F401

    import dist_cosface.cli  # noqa: F401
    import dist_cosface.data  # noqa: F401
    import dist_cosface.engine.trainer  # noqa: F401

    gc.freeze()  # the children's collections and exits need not touch the shared heap


if __name__ == "__main__":
    _preload()
    print(json.dumps(_drive(int(sys.argv[1]), sys.argv[2])), flush=True)
