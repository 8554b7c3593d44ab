"""``ClassifierState``: what a checkpoint holds of the classifier, as one ``Stateful``.

The head's rows and its row optimizer's per-row state (momentum, Adam moments, per-row step
counts) are rows ``[class_start, class_start + K)`` of global ``[num_classes, ...]`` tensors.
``state_dict()`` returns them as DTensors ``Shard(0)`` over a CPU device mesh, so
``torch.distributed.checkpoint`` writes every rank's rows in parallel and, on load, gives each
rank exactly the rows its ``class_range`` owns in the NEW world size: re-sharding on resume is
DCP's read planning, not code of ours. ``class_range`` is DTensor's ``Shard(0)`` layout for that
reason. Without a mesh (one process) the tensors are plain, which DCP reads into any layout too.

The values are host copies: taking ``state_dict()`` is the staging step of an asynchronous
save, after which training may change the live rows while a background thread writes.
"""

from __future__ import annotations

import torch
from torch.distributed.device_mesh import DeviceMesh

from dist_cosface.classifier.head import ShardedClassifier


class ClassifierState:
    """``state_dict()`` / ``load_state_dict()`` of a head and its row optimizer (``Stateful``).

    Layout: ``{"weight": [C, D], "optim": {name: [C, ...] per-row state}}``, each a DTensor
    ``Shard(0)`` over ``mesh`` (plain tensors when ``mesh`` is None), on the CPU.
    """

    def __init__(self, head: ShardedClassifier, optimizer, mesh: DeviceMesh | None) -> None:
        if not hasattr(optimizer, "row_state"):
            raise TypeError(f"expected a row optimizer of the head, got {type(optimizer).__name__}")
        self.head, self.optimizer, self.mesh = head, optimizer, mesh

    def state_dict(self) -> dict:
        rows = self.optimizer.row_state()
        return {
            "weight": self._global(self.head.weight.detach()),
            "optim": {name: self._global(t) for name, t in rows.items()},
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        weight = _local(state["weight"])
        if weight.shape != self.head.weight.shape:
            raise ValueError(
                f"classifier rows: checkpoint gives this rank {list(weight.shape)}, "
                f"the head has {list(self.head.weight.shape)}"
            )
        self.head.weight.copy_(weight)
        self.optimizer.load_row_state({k: _local(v) for k, v in state["optim"].items()})

    def _global(self, local: torch.Tensor) -> torch.Tensor:
        """A host copy of this rank's rows, as the global tensor's Shard(0) piece."""
        copy = local.detach().to("cpu", copy=True)
        if self.mesh is None:
            return copy
        from torch.distributed.tensor import DTensor, Shard

        shape = (self.head.num_classes, *copy.shape[1:])
        stride = torch.empty(shape, device="meta").stride()
        return DTensor.from_local(
            copy, self.mesh, [Shard(0)], run_check=False, shape=shape, stride=stride
        )


def _local(value: torch.Tensor) -> torch.Tensor:
    return value.to_local() if hasattr(value, "to_local") else value
