"""Resume on a different number of ranks: 2-rank checkpoint, 3-rank resume."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist

from dist_cosface.distributed import context_from_group
from dist_cosface.engine import train
from dist_cosface.engine.checkpoint import find_latest_checkpoint
from dist_cosface.engine.checkpoint.reader import read_tree
from dist_cosface.engine.trainer import Trainer
from tests.multiproc import run_ranks
from tests.tiny import tiny_config

# 9 classes: 5 + 4 rows on 2 ranks, 3 + 3 + 3 on 3 ranks (shard borders move)
_OVERRIDES = (
    "classifier.num_classes=9",
    "data.synthetic_num_classes=9",
    "optim.name=sgd",
    "train.total_steps=2",
)


def _score_checkpoint(cfg, ctx, ckpt: str) -> dict:
    """Restore ``ckpt`` into fresh parts and score a fixed global batch of 12 images."""
    parts = Trainer(cfg, ctx)
    parts.checkpointer.restore(Path(ckpt), parts.state)
    gen = torch.Generator().manual_seed(123)
    images = torch.rand(12, 3, 32, 32, generator=gen) * 2 - 1
    labels = torch.randint(0, 9, (12,), generator=gen)
    per_rank = 12 // ctx.world_size
    mine = slice(ctx.rank * per_rank, (ctx.rank + 1) * per_rank)
    parts.strategy.backbone.eval()  # BatchNorm running statistics: independent of the split
    with torch.no_grad():
        loss = parts.head(parts.strategy.backbone(images[mine]), labels[mine]).item()
    momentum = parts.head_optim.state[parts.head.weight]["momentum_buffer"]
    # numpy: tensors would travel as shared-memory handles that die with the rank
    return {
        "loss": loss,
        "rows": parts.head.weight.detach().numpy().copy(),
        "momentum": momentum.numpy().copy(),
    }


def _train_two(rank, world, out):
    ctx = context_from_group(dist.group.WORLD, torch.device("cpu"))
    cfg = tiny_config(out, *_OVERRIDES)
    summary = train(cfg, ctx)
    return _score_checkpoint(cfg, ctx, summary.checkpoint)


def _resume_three(rank, world, out):
    ctx = context_from_group(dist.group.WORLD, torch.device("cpu"))
    cfg = tiny_config(out, *_OVERRIDES, "train.total_steps=3")
    score = _score_checkpoint(cfg, ctx, find_latest_checkpoint(out))
    return score, train(cfg, ctx)


@pytest.mark.multiproc
def test_resume_two_ranks_on_three_ranks(tmp_path):
    out = str(tmp_path / "run")
    two = run_ranks(2, _train_two, out)
    three = run_ranks(3, _resume_three, out)
    scores = [s for s, _ in three]
    assert [s["rows"].shape[0] for s in two] == [5, 4]
    assert [s["rows"].shape[0] for s in scores] == [3, 3, 3]
    for key in ("rows", "momentum"):  # rows and their optimizer state re-sharded exactly
        np.testing.assert_array_equal(
            np.concatenate([s[key] for s in scores]), np.concatenate([s[key] for s in two])
        )
    for s in scores:
        assert s["loss"] == pytest.approx(two[0]["loss"], rel=1e-5)
    summary = three[0][1]
    assert summary.resumed_from.endswith("step_2") and summary.step == 3
    assert np.isfinite(summary.loss)


@pytest.mark.multiproc
def test_resume_two_ranks_on_one_process(tmp_path):
    from dist_cosface.distributed import DistContext

    out = str(tmp_path / "run")
    two = run_ranks(2, _train_two, out)
    cfg = tiny_config(out, *_OVERRIDES, "train.total_steps=3")
    one = _score_checkpoint(cfg, DistContext(), find_latest_checkpoint(out))
    for key in ("rows", "momentum"):  # the two shards' rows, merged by DCP on load
        np.testing.assert_array_equal(one[key], np.concatenate([s[key] for s in two]))
    assert one["loss"] == pytest.approx(two[0]["loss"], rel=1e-5)
    summary = train(cfg, DistContext())
    assert summary.resumed_from.endswith("step_2") and summary.step == 3


def _train_with_saves(rank, world, out, async_save):
    ctx = context_from_group(dist.group.WORLD, torch.device("cpu"))
    overrides = ("train.total_steps=4", "checkpoint.every_steps=1", "checkpoint.keep_last=4")
    cfg = tiny_config(out, *_OVERRIDES, *overrides, f"checkpoint.async_save={async_save}")
    return train(cfg, ctx).loss


@pytest.mark.multiproc
def test_async_save_overlapping_steps_equals_sync_save(tmp_path):
    """Every step's save overlaps the next step's training (the writer is waited for only
    when the next save starts): the snapshot must hold the state of its own step."""
    sync, asyn = str(tmp_path / "sync"), str(tmp_path / "async")
    losses_sync = run_ranks(2, _train_with_saves, sync, False)
    losses_async = run_ranks(2, _train_with_saves, asyn, True)
    assert losses_async == losses_sync
    for step in (1, 2, 3, 4):
        want = read_tree(Path(sync) / "checkpoints" / f"step_{step}", "")
        got = read_tree(Path(asyn) / "checkpoints" / f"step_{step}", "")
        assert set(got) == set(want)
        for key, value in want.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(got[key], value), (step, key)
            else:
                assert got[key] == value, (step, key)
