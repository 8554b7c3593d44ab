"""Run a function on N local ranks (spawned processes) and collect their return values.

Shared by the multi-process tests (``tests/multiproc.py``) and the benchmarks
(``tools/bench_*.py``): each rank runs inside an initialized default process group (gloo, or
NCCL with one GPU per rank); an exception in any rank is raised in the caller with that rank's
traceback, and a rank that dies or hangs fails the call instead of hanging the caller.
A source checkout's root must be on ``sys.path`` (spawn re-imports ``fn`` by name).
"""

from __future__ import annotations

import datetime
import os
import pickle
import queue
import socket
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.multiprocessing as mp


class RanksFailed(RuntimeError):
    """A rank raised, died or produced no result in time; the message says which and why."""


def free_port() -> int:
    """A local TCP port that is free right now (the OS picks it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def free_port_range(n: int) -> int:
    """A base port p with p .. p+n-1 all free right now (one per rank: exporters, launchers)."""
    for _ in range(100):
        base = free_port()
        if base + n > 65535:
            continue
        socks = []
        try:
            for port in range(base, base + n):
                sock = socket.socket()
                socks.append(sock)
                sock.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for sock in socks:
                sock.close()
    raise RuntimeError(f"no {n} consecutive free ports")


def torchrun_command(nproc: int, *args: str) -> list[str]:
    """``python -m torch.distributed.run --standalone``, ``nproc`` local ranks, then ``args``."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        *args,
    ]


def _init_group(rank: int, world_size: int, port: int, backend: str, timeout_s: float) -> None:
    import torch.distributed as dist

    device = None
    if backend == "nccl":  # one GPU per rank
        device = torch.device("cuda", rank)
        torch.cuda.set_device(device)
    dist.init_process_group(
        backend,
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
        device_id=device,
    )


def _rank_main(rank, world_size, port, fn, args, results, options):
    os.environ.update(options["env"])
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size),
    )
    if options["threads"]:
        torch.set_num_threads(options["threads"])
    import torch.distributed as dist

    try:
        _init_group(rank, world_size, port, options["backend"], options["collective_timeout_s"])
        # Plain pickle copies tensors by value; the queue's own pickler would hand over shared
        # memory that disappears when this process exits before the parent reads it.
        out = pickle.dumps(fn(rank, world_size, *args))
        results.put((rank, "ok", out))
    except BaseException:  # noqa: BLE001 - forwarded to the parent verbatim
        results.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(
    world_size: int,
    fn: Callable[..., Any],
    *args: Any,
    timeout_s: float = 180.0,
    env: dict[str, str] | None = None,
    backend: str = "gloo",
    threads: int | None = 1,
    collective_timeout_s: float = 60.0,
) -> list[Any]:
    """Spawn ``world_size`` ranks running ``fn(rank, world_size, *args)``; raises RanksFailed.

    ``fn`` must be importable at module level (spawn pickles it by name). Returns the list of
    per-rank return values (tensors are fine), ordered by rank. ``timeout_s``: the longest wait
    for the next rank's result; ``threads``: torch threads per rank (None: torch's default);
    ``collective_timeout_s``: the process group's timeout.
    """
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    options = {
        "env": dict(env or {}),
        "backend": backend,
        "threads": threads,
        "collective_timeout_s": collective_timeout_s,
    }
    procs = [
        ctx.Process(target=_rank_main, args=(r, world_size, port, fn, args, results, options))
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    outputs: dict[int, Any] = {}
    error = None
    try:
        error = _collect(procs, results, outputs, timeout_s)
    finally:
        for p in procs:
            p.join(timeout=5 if error is None else 1)
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
    if error is not None:
        raise RanksFailed(error)
    return [outputs[r] for r in range(world_size)]


def _collect(procs: list, results, outputs: dict[int, Any], timeout_s: float) -> str | None:
    """Fill ``outputs`` by rank; the first failure's description, or None."""
    deadline = time.monotonic() + timeout_s
    while len(outputs) < len(procs):
        try:
            rank, status, payload = results.get(timeout=1.0)
        except queue.Empty:
            # A rank killed from outside (OOM killer, segfault) never reports: notice its exit.
            dead = [(r, p.exitcode) for r, p in enumerate(procs) if p.exitcode not in (None, 0)]
            if dead:
                return f"rank {dead[0][0]} exited with status {dead[0][1]} without a result"
            if time.monotonic() > deadline:
                missing = sorted(set(range(len(procs))) - set(outputs))
                return f"ranks {missing} produced no result within {timeout_s}s (hang?)"
            continue
        if status != "ok":
            return f"rank {rank} failed:\n{payload}"
        outputs[rank] = pickle.loads(payload)
        deadline = time.monotonic() + timeout_s
    return None
