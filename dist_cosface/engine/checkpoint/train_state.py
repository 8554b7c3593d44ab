"""What a training checkpoint holds, gathered from its owners as ``Stateful`` parts.

``TrainState.snapshot()`` is the tree handed to torch.distributed.checkpoint, one section per
owner (the keys are ``contract``'s)::

    backbone/model      the plain backbone's weights (replicated: DCP writes each once)
    backbone/optim      its optimizer (DDP engine; DeepSpeed keeps its own, see ``native``)
    classifier/...      ``ClassifierState``: rows + row optimizer state, DTensor Shard(0)
    scaler              the fp16 loss scaler
    rank<r>/rng         this rank's RNG streams (torch, CUDA, Python, NumPy)
    rank<r>/loader      this rank's data-loader position

Every tensor in a snapshot is a host copy, so taking it is the only part of an asynchronous
save that blocks training. ``rank<r>`` entries exist only for rank r and are read back only
on the same world size (a data position cannot be mapped onto another split of the data).
The non-tensor values of each section (optimizer settings, the loss scale, the Python RNG
state, loader positions) travel as one JSON document in a uint8 tensor, ``<section>._json``
(``safe.encode_plain``), so a checkpoint holds tensors only and resuming unpickles none
of it beyond torch's weights-only loader.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from dist_cosface.engine.checkpoint.contract import (
    BACKBONE,
    CLASSIFIER,
    LOADER,
    MODEL,
    OPTIM,
    RNG,
    SCALER,
    NativeCheckpoint,
    Stateful,
    rank_section,
)
from dist_cosface.engine.checkpoint.safe import decode_plain, encode_plain


class BackboneState:
    """The backbone's weights and (unless its engine saves them natively) its optimizer."""

    def __init__(self, backbone: torch.nn.Module, optimizer: torch.optim.Optimizer | None):
        self.backbone, self.optimizer = backbone, optimizer

    def state_dict(self) -> dict:
        state = {MODEL: self.backbone.state_dict()}
        if self.optimizer is not None:
            from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

            # keyed by parameter name, state created for every parameter (DCP needs both)
            state[OPTIM] = get_optimizer_state_dict(self.backbone, self.optimizer)
        return host_copy(state)

    def load_state_dict(self, state: dict) -> None:
        self.backbone.load_state_dict(state[MODEL])
        if self.optimizer is not None:
            from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

            set_optimizer_state_dict(self.backbone, self.optimizer, state[OPTIM])


class RankState:
    """One rank's own section: its RNG streams and its data position.

    Loading sets the RNG streams and keeps the position in ``position``: the loader takes it
    only after it has been set to the resumed epoch (``epochs.EpochStream``).
    """

    def __init__(self, loader: Stateful) -> None:
        self.loader = loader
        self.position: dict | None = None

    def state_dict(self) -> dict:
        return host_copy({RNG: rng_state(), LOADER: self.loader.state_dict()})

    def load_state_dict(self, state: dict) -> None:
        set_rng_state(state[RNG])
        self.position = state[LOADER]


@dataclass
class TrainState:
    """The owners of a run's state; ``snapshot`` / ``restore`` map them to one DCP tree."""

    backbone: Stateful  # BackboneState
    classifier: Stateful  # ClassifierState
    scaler: Stateful  # ShardedLossScaler
    loader: Stateful  # TrainLoader
    rank: int
    native: NativeCheckpoint | None = None
    own: RankState = field(init=False)

    def __post_init__(self) -> None:
        self.own = RankState(self.loader)
        for key, part in self.parts().items():
            if not isinstance(part, Stateful):
                raise TypeError(
                    f"TrainState's {key} part must be Stateful (state_dict, load_state_dict), "
                    f"got {type(part).__name__}"
                )

    def parts(self, same_world: bool = True) -> dict[str, Stateful]:
        """The owners by section; this rank's own section only on the same world size."""
        parts = {BACKBONE: self.backbone, CLASSIFIER: self.classifier, SCALER: self.scaler}
        if same_world:
            parts[rank_section(self.rank)] = self.own
        return parts

    def snapshot(self) -> dict:
        """Host copies of everything (the blocking part of a save), non-tensors as JSON."""
        return encode_plain(self._state(same_world=True))

    def _state(self, same_world: bool) -> dict:
        return {key: part.state_dict() for key, part in self.parts(same_world).items()}

    def template(self, same_world: bool, encoded: bool = True) -> dict:
        """What to read back: a snapshot, without this rank's section on another world size.

        ``encoded=False``: the layout of format-3 checkpoints (non-tensor values pickled).
        """
        tree = self._state(same_world)
        return encode_plain(tree) if encoded else tree

    def restore(self, tree: dict, skip_backbone: bool) -> dict | None:
        """Load ``tree`` (a template DCP filled in); returns the loader position or None.

        ``skip_backbone``: the native checkpoint restored the backbone already.
        """
        tree = decode_plain(tree)
        self.own.position = None
        for key, part in self.parts(same_world=rank_section(self.rank) in tree).items():
            if not (skip_backbone and key == BACKBONE):
                part.load_state_dict(tree[key])
        return self.own.position


def host_copy(tree: Any) -> Any:
    """``tree`` with every plain tensor replaced by a host copy (DTensors are left as they are:
    ``ClassifierState`` makes its own copies)."""
    if isinstance(tree, dict):
        return {k: host_copy(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(host_copy(v) for v in tree)
    if isinstance(tree, torch.Tensor) and not hasattr(tree, "to_local"):
        return tree.detach().to("cpu", copy=True)
    return tree


def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": int(np_state[2]),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    keys = state["numpy_keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, state["numpy_pos"], 0, 0.0))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
