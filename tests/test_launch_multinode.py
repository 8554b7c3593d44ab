"""Two real nodes: two network namespaces joined by a veth pair, one ``launch/torchrun.sh`` in
each, talking TCP over the veth like two hosts on one switch (the other launcher tests share
one host name and loopback).

Needs root and iproute2's ``ip``; skipped, with the reason, where namespaces cannot be made.
The addresses (192.0.2.0/24, the documentation range) exist only inside the namespaces, whose
names are unique per run; the namespaces, the veth pair and every process in them are removed
afterwards, also when the test fails.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.launching import alive, checkpoint_steps, launch, logged_losses, wait_for

ADDRESSES = ("192.0.2.1", "192.0.2.2")  # node A hosts the rendezvous, node B is lost
PORT = "29500"  # each namespace has its own ports: runs side by side never collide
TOTAL_STEPS = 20
# the job: 2 one-rank nodes; a checkpoint every 4 steps, all kept for the reference run
STEPS = [f"train.total_steps={TOTAL_STEPS}", "checkpoint.every_steps=4", "checkpoint.keep_last=9"]


@dataclass
class Node:
    netns: str
    address: str
    interface: str  # its end of the veth pair

    def exec_prefix(self) -> list[str]:
        return ["ip", "netns", "exec", self.netns]


def _ip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)


def _pids_in(netns: str) -> list[int]:
    return [int(pid) for pid in _ip("netns", "pids", netns).stdout.split()]


def _kill_namespace(netns: str) -> None:
    """SIGKILL every process in ``netns`` (a lost node); return once none runs there."""
    end = time.monotonic() + 30
    while time.monotonic() < end:
        running = [pid for pid in _pids_in(netns) if alive(pid)]
        if not running:
            return
        for pid in running:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.1)
    raise AssertionError(f"processes left in namespace {netns}: {_pids_in(netns)}")


def _make_nodes(tag: str, made: list[str]) -> list[Node]:
    """Two namespaces, a veth pair between them, an address and ``lo`` up in each."""
    ends = [f"{tag}x", f"{tag}y"]  # interface names: at most 15 characters
    nodes = [Node(f"{tag}{n}", addr, end) for n, addr, end in zip("ab", ADDRESSES, ends)]
    for node in nodes:
        add = _ip("netns", "add", node.netns)
        if add.returncode != 0:
            pytest.skip(f"cannot create a network namespace: {add.stderr.strip()}")
        made.append(node.netns)
    steps = [("link", "add", ends[0], "type", "veth", "peer", "name", ends[1])]
    for node in nodes:
        end = node.interface
        steps += [
            ("link", "set", end, "netns", node.netns),
            ("-n", node.netns, "addr", "add", f"{node.address}/24", "dev", end),
            ("-n", node.netns, "link", "set", end, "up"),
            ("-n", node.netns, "link", "set", "lo", "up"),  # down in a new namespace
        ]
    for step in steps:
        done = _ip(*step)
        if done.returncode != 0:
            pytest.skip(f"cannot set up the namespaces (ip {' '.join(step)}): {done.stderr}")
    probe = subprocess.run([*nodes[0].exec_prefix(), "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot run a process in a network namespace: {probe.stderr.strip()}")
    return nodes


@pytest.fixture
def two_nodes():
    """Nodes A and B in their own network namespaces; all removed at teardown."""
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    if shutil.which("ip") is None:
        pytest.skip("network namespaces need iproute2's ip")
    tag = f"dcf{secrets.token_hex(4)}"
    made: list[str] = []
    try:
        yield _make_nodes(tag, made)
    finally:
        _ip("link", "del", f"{tag}x")  # if it never moved into a namespace
        for netns in made:
            try:
                _kill_namespace(netns)
            finally:  # the veth end inside goes with it, and so the pair
                _ip("netns", "del", netns)


def _start(tmp_path: Path, node: Node, env: dict[str, str], *overrides: str, log: str):
    env = {"NPROC_PER_NODE": "1", "MASTER_ADDR": ADDRESSES[0], "MASTER_PORT": PORT, **env}
    return launch(
        tmp_path, tmp_path / "run", env, *STEPS, *overrides, log=log, prefix=node.exec_prefix()
    )


def _log(tmp_path: Path, name: str) -> str:
    return (tmp_path / name).read_text()


@pytest.mark.multiproc
@pytest.mark.slow
def test_two_nodes_lose_one_and_finish_on_the_other(tmp_path, two_nodes):
    node_a, node_b = two_nodes
    out = tmp_path / "run"
    job = {"NNODES": "2", "RDZV_ID": "netns"}
    procs = [_start(tmp_path, node, job, log=f"node_{n}.txt") for n, node in zip("ab", two_nodes)]
    wait_for(lambda: 4 in checkpoint_steps(out), procs[0], 240, "checkpoint step_4")
    _kill_namespace(node_b.netns)  # node B is lost: its agent and its worker die at once
    procs[1].wait(timeout=30)
    # node A's worker loses its peer mid-step: the job fails there instead of hanging
    assert procs[0].wait(timeout=120) != 0, _log(tmp_path, "node_a.txt")[-3000:]
    for n, node in zip("ab", two_nodes):  # the launcher found each node's address and veth
        seen = f"node address {node.address}, gloo interface {node.interface},"
        assert seen in _log(tmp_path, f"node_{n}.txt")
    resume = checkpoint_steps(out)[-1]  # the latest intact checkpoint, saved by both nodes
    meta = json.loads((out / "checkpoints" / f"step_{resume}" / "meta.json").read_text())
    assert meta["world_size"] == 2 and resume < TOTAL_STEPS

    # the job goes on with the nodes that come (1 of 1..2); the reference: one rank from the
    # same checkpoint, alone in its own folder, at the same time
    elastic = {"NNODES": "1:2", "RDZV_ID": "netns", "RDZV_CONF": "last_call_timeout=1"}
    survivor = _start(tmp_path, node_a, elastic, log="node_a_again.txt")
    reference = launch(
        tmp_path,
        tmp_path / "ref",
        {"NNODES": "1", "NPROC_PER_NODE": "1"},
        *STEPS,
        f"checkpoint.resume={out / 'checkpoints' / f'step_{resume}'}",
        log="reference.txt",
        prefix=node_a.exec_prefix(),
    )
    assert survivor.wait(timeout=240) == 0, _log(tmp_path, "node_a_again.txt")[-3000:]
    assert reference.wait(timeout=240) == 0, _log(tmp_path, "reference.txt")[-3000:]
    log = _log(tmp_path, "node_a_again.txt")
    assert re.search(rf"resumed from \S+step_{resume} at step {resume}\b", log), log[-3000:]
    assert "(saved by 2 ranks) on 1 ranks: classifier re-sharded" in log, log[-3000:]
    expected, got = logged_losses(tmp_path / "ref"), logged_losses(out)
    assert sorted(got) == list(range(1, TOTAL_STEPS + 1))
    assert sorted(expected) == list(range(resume + 1, TOTAL_STEPS + 1))
    for step in expected:  # every step after the restore equals the uninterrupted run
        assert got[step] == pytest.approx(expected[step], rel=1e-6), step
    meta = json.loads((out / "checkpoints" / f"step_{TOTAL_STEPS}" / "meta.json").read_text())
    assert meta["world_size"] == 1 and meta["class_layout"] == [[0, 8]]
