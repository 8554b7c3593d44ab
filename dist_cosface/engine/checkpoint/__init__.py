"""A run's checkpoints: one package, one owner per job.

- ``contract``: the ``Stateful`` protocol every part of the state implements (and
  ``NativeCheckpoint`` for an engine's own files), the state's section keys and file names.
- ``manager``: :class:`Checkpointer` (save sync or async, wait, restore, one line of
  checkpoints per run folder) and :func:`resolve_checkpoint` (the checkpoint to resume).
- ``files``: meta.json, the size and CRC32 of every file, durable writes, verification.
- ``safe``: reading a checkpoint without running code from it (the allow-lists).
- ``reader``: reading in one process (``load_backbone`` for eval/export, ``read_tree``).
- ``train_state``: what a checkpoint holds, gathered from its owners (``TrainState``).
- ``deepspeed_native``: DeepSpeed's own files beside DCP's (``DeepSpeedCheckpoint``).
"""

from dist_cosface.engine.checkpoint.contract import NativeCheckpoint, Stateful
from dist_cosface.engine.checkpoint.files import read_meta
from dist_cosface.engine.checkpoint.manager import (
    FORMAT_VERSION,
    Checkpointer,
    CheckpointWriteError,
    ResumePoint,
    find_latest_checkpoint,
    resolve_checkpoint,
)
from dist_cosface.engine.checkpoint.reader import load_backbone, read_tree, read_value
from dist_cosface.engine.checkpoint.train_state import BackboneState, TrainState

__all__ = [
    "FORMAT_VERSION",
    "BackboneState",
    "CheckpointWriteError",
    "Checkpointer",
    "NativeCheckpoint",
    "ResumePoint",
    "Stateful",
    "TrainState",
    "find_latest_checkpoint",
    "load_backbone",
    "read_meta",
    "read_tree",
    "read_value",
    "resolve_checkpoint",
]
