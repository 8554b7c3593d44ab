"""tools/spawn.py: per-rank results in rank order; a raising, dying or hung rank fails the call.

(``torchrun_command`` is exercised by tests/test_failure.py.)
"""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist

from tools.spawn import RanksFailed, free_port_range, run_ranks


def _all_reduce_rank(rank, world_size, scale):
    t = torch.tensor([float(rank)])
    dist.all_reduce(t, group=dist.group.WORLD)
    return rank, world_size, t * scale, os.environ["RANK"], os.environ["EXTRA"]


def _rank1_raises(rank, world_size):
    if rank == 1:
        raise ValueError("bad input on rank 1")
    return rank


def _rank1_dies(rank, world_size):
    if rank == 1:
        os._exit(3)  # as if killed: no exception, no result
    return rank


def _rank0_hangs(rank, world_size):
    if rank == 0:
        import time

        time.sleep(60)
    return rank


@pytest.mark.multiproc
def test_results_come_back_in_rank_order_from_a_real_group():
    got = run_ranks(3, _all_reduce_rank, 2.0, env={"EXTRA": "x"})
    assert [g[:2] for g in got] == [(0, 3), (1, 3), (2, 3)]
    assert all(torch.equal(g[2], torch.tensor([6.0])) for g in got)  # (0 + 1 + 2) * 2
    assert [g[3:] for g in got] == [("0", "x"), ("1", "x"), ("2", "x")]


@pytest.mark.multiproc
def test_a_raising_rank_fails_the_call_with_its_traceback():
    with pytest.raises(RanksFailed, match=r"(?s)rank 1 failed:.*ValueError: bad input on rank 1"):
        run_ranks(2, _rank1_raises)


@pytest.mark.multiproc
def test_a_dying_rank_fails_the_call_with_its_exit_status():
    # timeout_s is far beyond the test: the death itself must end the wait
    with pytest.raises(RanksFailed, match="rank 1 exited with status 3"):
        run_ranks(2, _rank1_dies, timeout_s=3600.0)


@pytest.mark.multiproc
def test_a_hung_rank_fails_the_call_after_the_timeout():
    # rank 1 may not have reported yet either on a loaded machine: "[0]" or "[0, 1]"
    with pytest.raises(RanksFailed, match=r"ranks \[0[, 1]*\] produced no result within 5.0s"):
        run_ranks(2, _rank0_hangs, timeout_s=5.0)


def test_free_port_range_gives_consecutive_bindable_ports():
    base = free_port_range(3)
    socks = [socket.socket() for _ in range(3)]
    try:
        for offset, sock in enumerate(socks):
            sock.bind(("127.0.0.1", base + offset))  # raises if a port of the range is taken
    finally:
        for sock in socks:
            sock.close()
