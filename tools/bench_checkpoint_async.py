"""How long a checkpoint blocks training: synchronous vs asynchronous DCP saves.

Spawns ``--ranks`` gloo processes holding a sharded ``[--classes, --dim]`` fp32 head with its
SGD momentum rows (plus a small backbone), and saves it through ``Checkpointer`` both ways, in
the same run:
  sync    ``save()`` returns once every rank's file is written and meta.json is published
  async   ``save()`` returns after the host snapshot; a background thread writes, and the
          ranks go on computing (a matmul loop standing in for training steps) until ``wait()``
Printed per mode (best of ``--repeats``, slowest rank): the seconds ``save()`` blocked the
loop, and the seconds until the checkpoint was published; the async blocking time is also
given as a ratio of the sync one.

  python tools/bench_checkpoint_async.py [--classes 2000000] [--dim 128] [--ranks 2]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # runnable as a plain script from a checkout (tools.spawn)
    sys.path.insert(0, str(REPO))

from dist_cosface.classifier import (  # noqa: E402
    ClassifierConfig,
    ShardedClassifier,
    build_classifier_optimizer,
)
from dist_cosface.classifier.state import ClassifierState  # noqa: E402
from dist_cosface.distributed import context_from_group  # noqa: E402
from dist_cosface.engine.amp import ShardedLossScaler  # noqa: E402
from dist_cosface.engine.checkpoint import Checkpointer  # noqa: E402
from dist_cosface.engine.checkpoint.train_state import BackboneState, TrainState  # noqa: E402
from dist_cosface.engine.config import CheckpointConfig  # noqa: E402


class _Position:
    """A data-loader stand-in: only its position is checkpointed."""

    def state_dict(self) -> dict:
        return {"epoch": 0, "batches_consumed": 0}


def _state(args, ctx, checkpointer):
    head = ShardedClassifier(ClassifierConfig(num_classes=args.classes), args.dim, ctx.group)
    optim = build_classifier_optimizer(head, "sgd", lr=0.1)
    backbone = torch.nn.Linear(512, args.dim)
    return head, TrainState(
        backbone=BackboneState(backbone, torch.optim.SGD(backbone.parameters(), lr=0.1)),
        classifier=ClassifierState(head, optim, checkpointer.mesh),
        scaler=ShardedLossScaler(False),
        loader=_Position(),
        rank=ctx.rank,
    )


def _train_until_done(head, checkpointer) -> None:
    """Keep the rank busy (as training would) while the writer thread runs."""
    x = torch.randn(256, head.embedding_size)
    future = checkpointer._pending
    while future is not None and not future.done():
        x = torch.tanh(x @ head.weight[:256].detach().T @ head.weight[:256].detach())
    checkpointer.wait()


def _one_save(args, ctx, root: Path, async_save: bool, step: int) -> tuple[float, float]:
    settings = CheckpointConfig(keep_last=1, async_save=async_save)
    checkpointer = Checkpointer(settings, root, ctx)
    head, state = _state(args, ctx, checkpointer)
    dist.barrier(group=ctx.group)
    t0 = time.perf_counter()
    blocked = checkpointer.save(step, state, {"epoch": 0, "num_classes": args.classes})
    _train_until_done(head, checkpointer)
    dist.barrier(group=ctx.group)
    return blocked, time.perf_counter() - t0


def _rank(rank: int, world: int, args, root: str) -> dict:
    ctx = context_from_group(dist.group.WORLD, torch.device("cpu"))
    results = {}
    for mode in ("sync", "async"):
        runs = [
            _one_save(args, ctx, Path(root) / mode, mode == "async", step)
            for step in range(args.repeats)
        ]
        results[mode] = min(runs)
    return results


def main() -> None:
    from tools.spawn import run_ranks

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, default=2_000_000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--dir", default=None, help="where to write (default: a temp folder)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as root:
        results = run_ranks(
            args.ranks, _rank, args, root, timeout_s=1800, collective_timeout_s=1800
        )
    gb = args.classes * args.dim * 4 * 2 / 1e9
    print(f"head {args.classes} x {args.dim} fp32 + momentum = {gb:.2f} GB on {args.ranks} ranks")
    sync_block = max(r["sync"][0] for r in results)
    for mode in ("sync", "async"):
        block = max(r[mode][0] for r in results)
        done = max(r[mode][1] for r in results)
        print(
            f"{mode:5}  blocks the loop {block:7.2f} s ({block / sync_block:.2f}x sync)   "
            f"published after {done:7.2f} s"
        )


if __name__ == "__main__":
    main()
