"""Run a function on N real gloo ranks (spawned processes) and collect per-rank results.

Used by every distributed test: the function runs inside an initialized default process
group; exceptions in any rank fail the test with that rank's traceback, and a hung rank
fails it after ``timeout_s`` instead of hanging the suite.
"""

from __future__ import annotations

import datetime
import os
import pickle
import queue
import socket
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank_main(rank, world_size, port, fn, args, results, env):
    os.environ.update(env)
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size),
    )
    torch.set_num_threads(1)
    import torch.distributed as dist

    try:
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=60),
        )
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
) -> list[Any]:
    """Spawn ``world_size`` gloo ranks running ``fn(rank, world_size, *args)``.

    ``fn`` must be importable at module level (spawn pickles it by name). Returns the list of
    per-rank return values (tensors are fine), ordered by rank.
    """
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(
            target=_rank_main, args=(r, world_size, port, fn, args, results, dict(env or {}))
        )
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    outputs: dict[int, Any] = {}
    errors: list[str] = []
    try:
        for _ in range(world_size):
            rank, status, payload = results.get(timeout=timeout_s)
            if status == "ok":
                outputs[rank] = pickle.loads(payload)
            else:
                errors.append(f"rank {rank} failed:\n{payload}")
                break
    except queue.Empty:
        missing = sorted(set(range(world_size)) - set(outputs))
        errors.append(f"ranks {missing} produced no result within {timeout_s}s (hang?)")
    finally:
        for p in procs:
            p.join(timeout=5 if not errors else 1)
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
    if errors:
        raise AssertionError("\n".join(errors))
    return [outputs[r] for r in range(world_size)]
