"""Real launches: torchrun subprocesses running ``dist-cosface train`` (kill -9 then resume,
SIGTERM preemption, two "nodes" on one machine)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.launching import (
    REPO,
    TINY,
    alive,
    checkpoint_steps,
    children,
    kill_tree,
    launch,
    logged_losses,
    logged_steps,
    wait_for,
)
from tests.multiproc import free_port


def _torchrun(tmp: Path, out: Path, *overrides: str, nproc=2, extra=(), log="log.txt"):
    cfg = tmp / "cfg.yaml"
    cfg.write_text("train:\n  seed: 0\n")
    if not extra:
        extra = ("--standalone",)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        *extra,
        "-m",
        "dist_cosface.cli",
        "train",
        str(cfg),
        *TINY,
        f"train.output_dir={out}",
        *overrides,
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    handle = (tmp / log).open("w")
    return subprocess.Popen(
        cmd, stdout=handle, stderr=subprocess.STDOUT, env=env, cwd=REPO, start_new_session=True
    )


@pytest.mark.multiproc
@pytest.mark.slow
def test_kill_9_then_resume_continues_at_the_right_step(tmp_path):
    out = tmp_path / "run"
    proc = _torchrun(tmp_path, out, "train.total_steps=200", "checkpoint.every_steps=2")
    wait_for(lambda: 4 in checkpoint_steps(out), proc, 240, "checkpoint step_4")
    # the whole job dies at once, mid-step (torchrun starts its workers in their own sessions,
    # so they are killed by pid, like a scheduler killing the job's cgroup)
    kill_tree(proc)
    latest = checkpoint_steps(out)[-1]
    assert latest >= 4
    proc = _torchrun(
        tmp_path,
        out,
        f"train.total_steps={latest + 2}",
        "checkpoint.every_steps=2",
        log="resume.txt",
    )
    assert proc.wait(timeout=240) == 0, (tmp_path / "resume.txt").read_text()[-3000:]
    log = (tmp_path / "resume.txt").read_text()
    assert f"resumed from {out / 'checkpoints' / f'step_{latest}'} at step {latest}" in log
    assert logged_steps(out)[-2:] == [latest + 1, latest + 2]
    assert checkpoint_steps(out)[-1] == latest + 2


def _two_rank_run_past_step_2(tmp_path: Path, total_steps: int) -> tuple[Path, Any, list[int]]:
    """A 2-rank torchrun training run that has logged two steps: (run dir, agent, workers)."""
    out = tmp_path / "run"
    proc = _torchrun(tmp_path, out, f"train.total_steps={total_steps}", "checkpoint.every_steps=0")
    wait_for(lambda: len(logged_steps(out)) >= 2, proc, 240, "two training steps")
    workers = children(proc.pid)
    assert len(workers) == 2
    return out, proc, workers


@pytest.mark.multiproc
def test_sigterm_writes_a_checkpoint_and_exits_zero(tmp_path):
    out, proc, workers = _two_rank_run_past_step_2(tmp_path, 500)
    os.kill(workers[0], signal.SIGTERM)  # one rank preempted: all must stop together
    assert proc.wait(timeout=120) == 0, (tmp_path / "log.txt").read_text()[-3000:]
    steps = checkpoint_steps(out)
    assert len(steps) == 1 and 2 <= steps[0] < 500
    meta = json.loads((out / "checkpoints" / f"step_{steps[0]}" / "meta.json").read_text())
    assert meta["world_size"] == 2 and meta["step"] == steps[0]
    assert f"SIGTERM: stopped at step {steps[0]}" in (tmp_path / "log.txt").read_text()


@pytest.mark.multiproc
@pytest.mark.slow
def test_workers_stop_when_their_torchrun_agent_is_killed(tmp_path):
    out, proc, workers = _two_rank_run_past_step_2(tmp_path, 100000)
    os.kill(proc.pid, signal.SIGKILL)  # the agent dies; its workers are reparented
    proc.wait(timeout=30)
    end = time.monotonic() + 180  # polling is 1 s; then one step and a checkpoint
    while any(alive(pid) for pid in workers) and time.monotonic() < end:
        time.sleep(0.5)
    still = [pid for pid in workers if alive(pid)]
    for pid in still:
        os.kill(pid, signal.SIGKILL)
    log = (tmp_path / "log.txt").read_text()
    assert not still, f"workers {still} kept running without their agent:\n{log[-3000:]}"
    assert "launcher (pid" in log and "a launcher died: stopped at step" in log, log[-3000:]
    steps = checkpoint_steps(out)  # stopped cleanly: both ranks wrote the same final checkpoint
    assert len(steps) == 1 and 2 <= steps[0] < 100000


@pytest.mark.multiproc
def test_two_nodes_on_one_machine(tmp_path):
    out = tmp_path / "run"
    port = free_port()
    nodes = [
        _torchrun(
            tmp_path,
            out,
            "train.total_steps=3",
            nproc=1,
            log=f"node{i}.txt",
            extra=(
                "--nnodes=2",
                f"--node_rank={i}",
                "--rdzv_backend=c10d",
                f"--rdzv_endpoint=127.0.0.1:{port}",
                "--rdzv_id=twonodes",
            ),
        )
        for i in (0, 1)
    ]
    for i, proc in enumerate(nodes):
        assert proc.wait(timeout=240) == 0, (tmp_path / f"node{i}.txt").read_text()[-3000:]
    meta = json.loads((out / "checkpoints" / "step_3" / "meta.json").read_text())
    assert meta["world_size"] == 2 and meta["class_layout"] == [[0, 4], [4, 4]]
    assert logged_steps(out) == [1, 2, 3]


def _run_launch_script(script: str, tmp_path: Path, env_extra: dict[str, str]) -> Path:
    """Run a shipped launcher for 2 CPU ranks and 2 steps; return the run folder."""
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("train:\n  seed: 0\n")
    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), **env_extra)
    cmd = [
        "bash",
        str(REPO / "launch" / script),
        str(cfg),
        *TINY,
        "train.total_steps=2",
        f"train.output_dir={out}",
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    return out


@pytest.mark.multiproc
def test_torchrun_launcher_script(tmp_path):
    out = _run_launch_script(
        "torchrun.sh", tmp_path, {"NPROC_PER_NODE": "2", "MASTER_PORT": str(free_port())}
    )
    meta = json.loads((out / "checkpoints" / "step_2" / "meta.json").read_text())
    assert meta["world_size"] == 2 and logged_steps(out) == [1, 2]


def _fake_slurm_commands(folder: Path) -> dict[str, str]:
    """``scontrol`` naming this machine as the only node and ``srun`` running its command once
    (one node), on a PATH in front of the real one."""
    folder.mkdir()
    (folder / "scontrol").write_text("#!/bin/sh\necho 127.0.0.1\n")
    # srun: drop its own --options, note the task and its rendezvous id, run it as the one task
    (folder / "srun").write_text(
        '#!/bin/bash\nwhile [[ "$1" == --* ]]; do shift; done\n'
        f'echo "$RDZV_ID $NNODES $NPROC_PER_NODE $*" > {folder}/task\nexec "$@"\n'
    )
    for name in ("scontrol", "srun"):
        (folder / name).chmod(0o755)
    return {"PATH": f"{folder}:{os.environ['PATH']}"}


@pytest.mark.multiproc
def test_slurm_script_runs_torchrun_script_on_each_node(tmp_path):
    env = {
        **_fake_slurm_commands(tmp_path / "bin"),
        "SLURM_SUBMIT_DIR": str(REPO),
        "SLURM_JOB_NODELIST": "node1",
        "SLURM_NNODES": "1",
        "SLURM_GPUS_ON_NODE": "2",
        "SLURM_JOB_ID": "4242",
        "MASTER_PORT": str(free_port()),
    }
    out = _run_launch_script("slurm.sbatch", tmp_path, env)
    task = (tmp_path / "bin" / "task").read_text().split()
    assert task[:5] == ["4242", "1", "2", "bash", str(REPO / "launch" / "torchrun.sh")]
    meta = json.loads((out / "checkpoints" / "step_2" / "meta.json").read_text())
    assert meta["world_size"] == 2 and logged_steps(out) == [1, 2]


@pytest.mark.multiproc
@pytest.mark.slow
def test_deepspeed_launcher_script(tmp_path):
    pytest.importorskip("deepspeed")
    out = _run_launch_script(
        "deepspeed.sh",
        tmp_path,
        {"DS_ACCELERATOR": "cpu", "NUM_GPUS": "2", "MASTER_PORT": str(free_port())},
    )
    meta = json.loads((out / "checkpoints" / "step_2" / "meta.json").read_text())
    assert meta["world_size"] == 2 and meta["engine"] == "deepspeed"
    assert logged_steps(out) == [1, 2]


def _rank_of(pid: int) -> int:
    env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return int(next(v for v in env if v.startswith(b"RANK=")).split(b"=")[1])


@pytest.mark.multiproc
@pytest.mark.slow
def test_killed_worker_restarts_from_the_last_checkpoint_with_the_same_losses(tmp_path):
    steps = ["train.total_steps=16", "checkpoint.every_steps=2"]
    ref = launch(tmp_path, tmp_path / "ref", {}, *steps, log="ref.txt")
    assert ref.wait(timeout=400) == 0, (tmp_path / "ref.txt").read_text()[-3000:]
    out = tmp_path / "run"
    proc = launch(tmp_path, out, {"MAX_RESTARTS": "1"}, *steps)
    wait_for(lambda: 4 in checkpoint_steps(out), proc, 240, "checkpoint step_4")
    rank1 = next(pid for pid in children(proc.pid) if _rank_of(pid) == 1)
    os.kill(rank1, signal.SIGKILL)  # one worker dies; torchrun restarts both
    assert proc.wait(timeout=400) == 0, (tmp_path / "log.txt").read_text()[-3000:]
    log = (tmp_path / "log.txt").read_text()
    resumed = [int(s) for s in re.findall(r"resumed from \S+step_(\d+) at step", log)]
    assert len(resumed) == 1 and 4 <= resumed[0] < 16, log[-3000:]
    expected, got = logged_losses(tmp_path / "ref"), logged_losses(out)
    assert sorted(got) == list(range(1, 17))
    for step in range(resumed[0] + 1, 17):  # the restarted steps equal the uninterrupted run
        assert got[step] == pytest.approx(expected[step], rel=1e-6), step
    meta = json.loads((out / "checkpoints" / "step_16" / "meta.json").read_text())
    assert meta["world_size"] == 2


@pytest.mark.multiproc
@pytest.mark.slow
def test_elastic_job_loses_a_node_and_goes_on_resharded(tmp_path):
    out, port = tmp_path / "run", str(free_port())
    env = {"NNODES": "1:2", "NPROC_PER_NODE": "1", "MAX_RESTARTS": "1", "MASTER_PORT": port}
    steps = ["train.total_steps=40", "checkpoint.every_steps=2"]
    first = launch(tmp_path, out, dict(env, RDZV_ID="shrink"), *steps, log="node_a.txt")
    time.sleep(3)  # node A hosts the rendezvous store; node B is the one that dies
    second = launch(tmp_path, out, dict(env, RDZV_ID="shrink"), *steps, log="node_b.txt")
    wait_for(lambda: 4 in checkpoint_steps(out), second, 300, "checkpoint step_4")
    kill_tree(second)  # node B is lost: its agent and its worker die at once
    assert first.wait(timeout=400) == 0, (tmp_path / "node_a.txt").read_text()[-3000:]
    log = (tmp_path / "node_a.txt").read_text()
    assert "(saved by 2 ranks) on 1 ranks: classifier re-sharded" in log, log[-3000:]
    meta = json.loads((out / "checkpoints" / "step_40" / "meta.json").read_text())
    assert meta["world_size"] == 1 and meta["class_layout"] == [[0, 8]]
