"""The trained head's class centers, read in the run's own sharded layout, K sub-centers each.

Rows: the checkpoint's ``classifier.weight`` is a global ``[C * K, D]`` tensor saved as a DTensor
``Shard(0)`` (``classifier/state.py``). Every rank reads only its own chunk of rows through
torch.distributed.checkpoint, exactly the chunks the head uses (``ceil(rows / world)``), so no
rank ever holds all centers. ``K`` (sub-centers per class) is ``meta.json``'s
``num_subcenters`` when present, else 1.

Assumed sub-center layout (the margins issue adds sub-centers; this is what that code must
keep, or change here): class ``c``'s sub-centers are rows ``c * K .. c * K + K - 1``. A class
belongs to the rank holding its first row; when a chunk boundary falls inside a class (K > 1
and ``ceil(C * K / world)`` not a multiple of K), the class's other rows travel to that rank in
one all-to-all. With K = 1 this is exactly ``classifier.head.class_range``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from dist_cosface.clean.comm import exchange_rows
from dist_cosface.distributed import DistContext, build_checkpoint_group
from dist_cosface.engine.checkpoint.manager import run_dcp, safe_reader
from dist_cosface.engine.checkpoint.safe import CheckpointRefused, SafeLoadPlanner

WEIGHT_KEY = "classifier.weight"


def row_chunk(num_rows: int, world_size: int, rank: int) -> tuple[int, int]:
    """``[start, stop)`` of DTensor ``Shard(0)``'s chunk of ``rank`` (chunks of ceil(n / world))."""
    per_rank = -(-num_rows // world_size)
    start = min(rank * per_rank, num_rows)
    return start, min(start + per_rank, num_rows)


def class_starts(num_classes: int, num_subcenters: int, world_size: int) -> list[int]:
    """First class of every rank plus ``num_classes``: a class lives where its first row does."""
    rows = num_classes * num_subcenters
    starts = [-(-row_chunk(rows, world_size, r)[0] // num_subcenters) for r in range(world_size)]
    return [min(s, num_classes) for s in starts] + [num_classes]


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
    rows = _read_row_chunk(Path(ckpt), meta, num_classes * k, dim, ctx)
    starts = class_starts(num_classes, k, ctx.world_size)
    if k > 1 and ctx.group is not None:
        rows = _rows_to_class_owners(rows, num_classes, k, starts, ctx)
    local = rows.view(-1, k, dim)
    return Centers(num_classes, k, starts, ctx.rank, F.normalize(local, dim=-1))


def _host_group(ctx: DistContext):
    """A gloo group over the job's ranks (DCP reads into host tensors): the job's own when it
    is gloo, else a new one, as the checkpointer builds (every rank calls this at once)."""
    if ctx.group is None or dist.get_backend(ctx.group) == "gloo":
        return ctx.group
    return build_checkpoint_group(ctx)


def _read_row_chunk(
    ckpt: Path, meta: dict, num_rows: int, dim: int, ctx: DistContext
) -> torch.Tensor:
    """This rank's chunk of rows, read as the trainer reads (the index through the restricted
    unpickler, tensors weights-only): a crafted checkpoint is refused, not run."""
    import torch.distributed.checkpoint as dcp

    start, stop = row_chunk(num_rows, ctx.world_size, ctx.rank)
    local = torch.empty(stop - start, dim)
    value = local
    group = _host_group(ctx)
    if group is not None:
        from torch.distributed.device_mesh import DeviceMesh
        from torch.distributed.tensor import DTensor, Shard

        mesh = DeviceMesh.from_group(group, "cpu")
        value = DTensor.from_local(
            local, mesh, [Shard(0)], run_check=False, shape=(num_rows, dim), stride=(dim, 1)
        )
    tree = {WEIGHT_KEY: value}
    try:
        reader = safe_reader(ckpt, meta)
        run_dcp(dcp.load, tree, group, storage_reader=reader, planner=SafeLoadPlanner(ckpt))
    except CheckpointRefused:
        raise
    except Exception as exc:  # DCP reports a shape or key mismatch with many types
        raise ValueError(
            f"{ckpt}: cannot read {WEIGHT_KEY} as [{num_rows}, {dim}] "
            f"(num_classes x num_subcenters, embedding_size of meta.json): {exc}"
        ) from exc
    got = tree[WEIGHT_KEY]
    return got.to_local() if hasattr(got, "to_local") else got


def _rows_to_class_owners(
    rows: torch.Tensor, num_classes: int, k: int, starts: list[int], ctx: DistContext
) -> torch.Tensor:
    """Move the rows of classes cut by a chunk boundary to the rank owning the class."""
    start, stop = row_chunk(num_classes * k, ctx.world_size, ctx.rank)
    # this chunk's rows of each rank's classes [starts[r], starts[r + 1]), in rank order
    send = [
        max(0, min(stop, starts[r + 1] * k) - max(start, starts[r] * k))
        for r in range(ctx.world_size)
    ]
    return exchange_rows(rows, send, ctx.group)
