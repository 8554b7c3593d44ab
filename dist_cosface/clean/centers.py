"""The trained head's class centers, read in the run's own sharded layout, K sub-centers each.

Rows: the checkpoint's ``classifier.weight`` is saved as a DTensor ``Shard(0)`` over classes
(``classifier/state.py``). Every rank reads only its own classes through
torch.distributed.checkpoint, exactly the chunks the head uses (``ceil(C / world)``,
``classifier.head.shard_chunk``), so no rank ever holds all centers.

Sub-centers: with ``K > 1`` the head saves its rows as ``[C, K, D]`` (a class's K rows together,
``Shard(0)`` over classes; ``classifier/state.py``), so every rank reads whole classes, the
classes its ``class_range`` owns, and no rows travel between ranks. ``K`` is ``meta.json``'s
``num_subcenters`` (the trainer records it; 1 when absent, as in checkpoints written before
sub-centers existed).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from dist_cosface.classifier.head import shard_chunk
from dist_cosface.distributed import DistContext, build_checkpoint_group
from dist_cosface.engine.checkpoint.manager import run_dcp, safe_reader
from dist_cosface.engine.checkpoint.safe import CheckpointRefused, SafeLoadPlanner

WEIGHT_KEY = "classifier.weight"


def class_starts(num_classes: int, world_size: int) -> list[int]:
    """First class of every rank plus ``num_classes`` (the head's ``class_range`` layout)."""
    return [shard_chunk(num_classes, world_size, r)[0] for r in range(world_size)] + [num_classes]


@dataclass
class Centers:
    """This rank's classes ``[starts[rank], starts[rank + 1])`` and their sub-centers."""

    num_classes: int
    num_subcenters: int
    starts: list[int]
    rank: int
    rows: torch.Tensor  # [local classes, K, D] float32, unit rows

    @property
    def class_start(self) -> int:
        return self.starts[self.rank]

    @property
    def num_local(self) -> int:
        return self.starts[self.rank + 1] - self.starts[self.rank]

    @property
    def dim(self) -> int:
        return self.rows.shape[-1]

    def owners(self, labels: torch.Tensor) -> torch.Tensor:
        """The rank owning each class of ``labels``."""
        bounds = torch.tensor(self.starts[1:-1], dtype=torch.int64)
        return torch.searchsorted(bounds, labels, right=True)


def num_subcenters(meta: dict, where: str) -> int:
    k = meta.get("num_subcenters", 1)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"{where}: num_subcenters must be an integer >= 1, got {k!r}")
    return k


def load_centers(ckpt: Path, meta: dict, dim: int, ctx: DistContext) -> Centers:
    """Collective: read this rank's sub-centers of a verified checkpoint (see module doc)."""
    where = str(Path(ckpt) / "meta.json")
    num_classes, k = int(meta["num_classes"]), num_subcenters(meta, where)
    shape = (num_classes, k, dim) if k > 1 else (num_classes, dim)
    local = _read_class_chunk(Path(ckpt), meta, shape, ctx).view(-1, k, dim)
    starts = class_starts(num_classes, ctx.world_size)
    return Centers(num_classes, k, starts, ctx.rank, F.normalize(local, dim=-1))


def _host_group(ctx: DistContext):
    """A gloo group over the job's ranks (DCP reads into host tensors): the job's own when it
    is gloo, else a new one, as the checkpointer builds (every rank calls this at once)."""
    if ctx.group is None or dist.get_backend(ctx.group) == "gloo":
        return ctx.group
    return build_checkpoint_group(ctx)


def _read_class_chunk(
    ckpt: Path, meta: dict, shape: tuple[int, ...], ctx: DistContext
) -> torch.Tensor:
    """This rank's chunk of rows, read as the trainer reads (the index through the restricted
    unpickler, tensors weights-only): a crafted checkpoint is refused, not run."""
    import torch.distributed.checkpoint as dcp

    start, stop = shard_chunk(shape[0], ctx.world_size, ctx.rank)
    local = torch.empty(stop - start, *shape[1:])
    value = local
    group = _host_group(ctx)
    if group is not None:
        from torch.distributed.device_mesh import DeviceMesh
        from torch.distributed.tensor import DTensor, Shard

        mesh = DeviceMesh.from_group(group, "cpu")
        value = DTensor.from_local(
            local, mesh, [Shard(0)], run_check=False, shape=shape, stride=local.stride()
        )
    tree = {WEIGHT_KEY: value}
    try:
        reader = safe_reader(ckpt, meta)
        run_dcp(dcp.load, tree, group, storage_reader=reader, planner=SafeLoadPlanner(ckpt))
    except CheckpointRefused:
        raise
    except Exception as exc:  # DCP reports a shape or key mismatch with many types
        raise ValueError(
            f"{ckpt}: cannot read {WEIGHT_KEY} as {list(shape)} "
            f"(num_classes, num_subcenters when > 1, embedding_size of meta.json): {exc}"
        ) from exc
    got = tree[WEIGHT_KEY]
    return got.to_local() if hasattr(got, "to_local") else got
