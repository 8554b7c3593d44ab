"""The checkpoint guarantees with ``train.engine: deepspeed`` (ZeRO-1, 2 gloo ranks, one spawn).

DeepSpeed keeps its own files under ``deepspeed/``: a crafted one is refused by the weights-only
loader the engine's resume goes through, and a crafted DCP index is refused before DeepSpeed
opens anything; a lower-step resume into a folder with later checkpoints is refused, or
archives them; a full disk met inside DeepSpeed's own save stops every rank with one line.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from dist_cosface.distributed import DistContext, context_from_group
from dist_cosface.engine import train
from dist_cosface.engine.checkpoint import resolve_checkpoint
from tests.engine.test_checkpoint_disk import checkpoint_bytes, fails_with, fill_disk, small_disk
from tests.engine.test_checkpoint_safety import RunsCommand, _crafted_index, rerecord_files
from tests.multiproc import run_ranks
from tests.tiny import DS_COMPARE_OVERRIDES, tiny_config

pytest.importorskip("deepspeed")

_DS = (*DS_COMPARE_OVERRIDES, "train.engine=deepspeed", "train.zero_stage=1")


def _refused(cfg, ctx) -> str | None:
    try:
        train(cfg, ctx)
    except ValueError as exc:
        return str(exc)
    return None


def _deepspeed_cases(rank, world, disk, marker):
    import dist_cosface.engine.checkpoint.manager as checkpoint

    ctx = context_from_group(dist.group.WORLD, torch.device("cpu"))
    disk, results = Path(disk), {}
    run = disk / "run"
    steps = (*_DS, "checkpoint.every_steps=1", "checkpoint.keep_last=3")
    first = train(tiny_config(run, *steps, "train.total_steps=2"), ctx)
    step1 = run / "checkpoints" / "step_1"
    if rank == 0:  # crafted copies of step_1: the DCP index, and one of DeepSpeed's files
        _crafted_index(step1, disk / "index", Path(marker), rerecord=True)
        shutil.copytree(step1, disk / "ds_file")
        torch.save(
            RunsCommand(Path(marker)), disk / "ds_file/deepspeed/state/mp_rank_00_model_states.pt"
        )
        rerecord_files(disk / "ds_file")
    dist.barrier()
    for name in ("index", "ds_file"):
        cfg = tiny_config(disk / f"resumed_{name}", *steps, f"checkpoint.resume={disk / name}")
        results[name] = _refused(cfg, ctx)
    lower = f"checkpoint.resume={step1}"
    results["later"] = _refused(tiny_config(run, *steps, "train.total_steps=2", lower), ctx)
    archive = tiny_config(
        run, *steps, "train.total_steps=2", lower, "checkpoint.later_steps=archive"
    )
    results["archived"] = train(archive, ctx).loss, first.loss
    # a full disk inside DeepSpeed's own save: no room check, so that it is met there
    full = disk / "full"
    train(tiny_config(full, *steps, "train.total_steps=1"), ctx)
    if rank == 0:
        fill_disk(disk, leave=checkpoint_bytes(full / "checkpoints" / "step_1") // 4)
    dist.barrier()
    checkpoint.Checkpointer._room_problem = lambda self, target: None
    results["full"] = fails_with(tiny_config(full, *steps, "train.total_steps=3"), ctx)
    return results


@pytest.mark.slow
@pytest.mark.multiproc
def test_deepspeed_checkpoints_refuse_crafted_files_keep_one_line_and_stop_on_full_disk(tmp_path):
    env = {"DS_ACCELERATOR": "cpu", "DS_BUILD_OPS": os.environ.get("DS_BUILD_OPS", "0")}
    marker = tmp_path / "marker"
    with small_disk(tmp_path / "disk", "256m") as disk:
        per_rank = run_ranks(2, _deepspeed_cases, str(disk), str(marker), env=env, timeout_s=400)
        assert not marker.exists()
        for results in per_rank:
            assert ".metadata refused: it names posix.system" in results["index"]
            assert "mp_rank_00_model_states.pt refused: it names posix.system" in results["ds_file"]
            assert "(step_2)" in results["later"] and "later_steps=archive" in results["later"]
            resumed, uninterrupted = results["archived"]
            assert resumed == pytest.approx(uninterrupted, rel=1e-5)
            message = results["full"]["message"]
            assert message is not None and "\n" not in message
            assert "No space left on device" in message and "needs about" in message
            assert [m for m, tb in results["full"]["logged"] if tb] == []
        assert len({r["full"]["message"] for r in per_rank}) == 1  # the same line everywhere
        ckpts = disk / "run" / "checkpoints"
        assert sorted(p.name for p in ckpts.iterdir()) == ["step_1", "step_2", "superseded-1"]
        assert (ckpts / "superseded-1" / "step_2" / "deepspeed").is_dir()
        full = disk / "full" / "checkpoints"
        assert sorted(p.name for p in full.iterdir()) == ["step_1"]  # no partial folder left
        assert resolve_checkpoint(full / "step_1", DistContext()) == full / "step_1"
