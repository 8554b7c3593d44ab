"""``ClassifierState``: what a checkpoint holds of the classifier, as one ``Stateful``.

The head's rows and its row optimizer's per-row state (momentum, Adam moments, per-row step
counts) are rows ``[class_start, class_start + K)`` of global ``[num_classes, ...]`` tensors.
``state_dict()`` returns them as DTensors ``Shard(0)`` over a CPU device mesh, so
``torch.distributed.checkpoint`` writes every rank's rows in parallel and, on load, gives each
rank exactly the rows its ``class_range`` owns in the NEW world size: re-sharding on resume is
DCP's read planning, not code of ours. ``class_range`` is DTensor's ``Shard(0)`` layout for that
reason. Without a mesh (one process) the tensors are plain, which DCP reads into any layout too.

With K sub-centers per class the rows are saved as ``[num_classes, K, ...]`` (a class's K
rows together, Shard(0) over classes), so re-sharding never splits a class: DCP gives each
rank the classes its ``class_range`` owns, with all their sub-centers. The margin's running
statistics (CurricularFace ``t``, AdaFace's norm mean and std) are identical on every rank and
saved as plain (replicated) tensors under ``margin_stats``: DCP writes them once and every
rank reads them back, whatever the new world size.

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
    ``Shard(0)`` over ``mesh`` (plain tensors when ``mesh`` is None), on the CPU; with K > 1
    sub-centers ``[C, K, D]`` and ``[C, K, ...]``. Plus ``"margin_stats": {name: 0-d}``
    (replicated) when the margin type keeps running statistics.
    """

    def __init__(self, head: ShardedClassifier, optimizer, mesh: DeviceMesh | None) -> None:
        if not hasattr(optimizer, "row_state"):
            raise TypeError(f"expected a row optimizer of the head, got {type(optimizer).__name__}")
        self.head, self.optimizer, self.mesh = head, optimizer, mesh

    def state_dict(self) -> dict:
        rows = self.optimizer.row_state()
        state = {
            "weight": self._global(self.head.weight.detach()),
            "optim": {name: self._global(t) for name, t in rows.items()},
        }
        stats = self.head.margin_state.stats
        if stats:
            state["margin_stats"] = {k: v.detach().to("cpu", copy=True) for k, v in stats.items()}
        return state

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        weight = self._rows(_local(state["weight"]))
        if weight.shape != self.head.weight.shape:
            raise ValueError(
                f"classifier rows: checkpoint gives this rank {list(weight.shape)}, "
                f"the head has {list(self.head.weight.shape)} "
                f"({self.head.subcenters} sub-center(s) per class)"
            )
        self.head.weight.copy_(weight)
        self.optimizer.load_row_state({k: self._rows(_local(v)) for k, v in state["optim"].items()})
        live = self.head.margin_state.stats
        saved = state.get("margin_stats", {})
        if set(saved) != set(live):
            raise ValueError(
                f"classifier margin statistics: checkpoint has {sorted(saved)}, "
                f"margin_type={self.head.spec.margin_type} keeps {sorted(live)}"
            )
        for name, value in saved.items():
            live[name].copy_(value)

    def _rows(self, saved: torch.Tensor) -> torch.Tensor:
        """``[classes, K, ...]`` as saved -> the head's ``[classes * K, ...]`` rows."""
        if self.head.subcenters == 1 or saved.dim() < 2:
            return saved
        return saved.reshape(-1, *saved.shape[2:])

    def _global(self, local: torch.Tensor) -> torch.Tensor:
        """A host copy of this rank's rows, as the global tensor's Shard(0) piece (with K
        sub-centers ``[classes, K, ...]``, so that a class's rows are never split)."""
        copy = local.detach().to("cpu", copy=True)
        k = self.head.subcenters
        if k > 1:
            copy = copy.view(-1, k, *copy.shape[1:])
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
