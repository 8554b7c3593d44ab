"""What every part of a checkpoint implements, and the names it is stored under.

A checkpoint is gathered from its owners, never from their internals: each owner of run state
(the backbone and its optimizer, the classifier's rows, the fp16 loss scaler, a rank's RNG
streams and data position) is a :class:`Stateful`, with exactly this protocol's methods and
parameters (``tests/engine/test_checkpoint_contract.py`` compares every implementation's
signature with it). ``TrainState`` maps them to the keys below; DCP writes what they return.

An engine that writes its own files beside DCP's (DeepSpeed: its ZeRO partitions, master
weights and optimizer) is a :class:`NativeCheckpoint`: it is handed the checkpoint folder and
reads anything else it needs (the world size that wrote it) from that folder's ``meta.json``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol, runtime_checkable

# top-level sections of the state tree (docs/training.md, "The state tree")
BACKBONE = "backbone"  # BackboneState: MODEL and, unless the engine saves it natively, OPTIM
MODEL = "model"
OPTIM = "optim"
CLASSIFIER = "classifier"  # classifier.state.ClassifierState
SCALER = "scaler"  # amp.ShardedLossScaler
RNG = "rng"  # in a rank's section: its RNG streams
LOADER = "loader"  # in a rank's section: its data position

# files and folders of a checkpoint folder
META_FILE = "meta.json"  # written last: its presence marks a complete checkpoint
INDEX_FILE = ".metadata"  # DCP's index
NATIVE_DIR = "deepspeed"  # DeepSpeed's own files


def rank_section(rank: int) -> str:
    """The section of the state that only ``rank`` holds (read back on the same world size)."""
    return f"rank{rank}"


@runtime_checkable
class Stateful(Protocol):
    """An owner of run state: host copies out, a state of the same layout back in."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@runtime_checkable
class NativeCheckpoint(Protocol):
    """Engine state written by the engine's own code into ``<folder>/deepspeed``, synchronously
    and collectively (every rank calls it at the same point)."""

    def save(self, folder: Path) -> None: ...

    def load(self, folder: Path) -> None: ...
