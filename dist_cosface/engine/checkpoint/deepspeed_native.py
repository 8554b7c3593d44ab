"""DeepSpeed's own checkpoint files under ``<checkpoint>/deepspeed``, beside DCP's.

The backbone's engine state (ZeRO partitions, bf16 master weights, its optimizer) is written
and read by DeepSpeed itself; everything else of the run goes through DCP. DeepSpeed is
imported only inside the functions that need it.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import torch

from dist_cosface.engine.checkpoint.contract import NATIVE_DIR
from dist_cosface.engine.checkpoint.files import read_meta
from dist_cosface.engine.checkpoint.safe import CheckpointRefused, refusal


class DeepSpeedCheckpoint:
    """The engine's own checkpoint (its ZeRO partitions, bf16 master weights, optimizer) under
    ``<checkpoint>/deepspeed``; the classifier and the rest go through DCP beside it.

    ZeRO >= 1 partitions optimizer state by data-parallel rank, so a different rank count
    would need DeepSpeed's universal-checkpoint conversion first; that is refused here with
    the way out named, rather than attempted half-way. DeepSpeed's files are torch pickles:
    they load weights-only (``_weights_only_engine``), never through a full unpickler.
    """

    def __init__(self, engine, zero_stage: int, world_size: int) -> None:
        self.engine, self.zero_stage, self.world_size = engine, zero_stage, world_size

    def save(self, folder: Path) -> None:
        try:
            self.engine.save_checkpoint(str(folder / NATIVE_DIR), tag="state")
        except Exception:
            # DeepSpeed's save ends in a barrier (its only collective after the first files
            # are written, DeepSpeed 0.19) that the ranks whose files were written are waiting
            # in: meet it, so that every rank reaches the caller's agreement on the error. A
            # full disk surfaces from torch.save as an OSError or a RuntimeError.
            import deepspeed.comm

            deepspeed.comm.barrier()
            raise

    def load(self, folder: Path) -> None:
        """Read ``folder``'s DeepSpeed files (verified with the rest of the checkpoint); the
        world size that wrote them comes from its meta.json."""
        saved_world_size = read_meta(folder)["world_size"]
        if saved_world_size != self.world_size and self.zero_stage >= 1:
            raise ValueError(
                f"{folder}: a DeepSpeed ZeRO-{self.zero_stage} checkpoint written by "
                f"{saved_world_size} ranks cannot resume on {self.world_size}: its optimizer "
                "partitions are per rank. Resume on the same rank count (DeepSpeed's "
                "ds_to_universal.py converts deepspeed/ for other counts, which dist_cosface "
                "does not load yet; docs/training.md, 'DeepSpeed and rank counts')"
            )
        full, self.engine.checkpoint_engine = self.engine.checkpoint_engine, _weights_only_engine()
        try:
            self.engine.load_checkpoint(str(folder / NATIVE_DIR), tag="state")
        finally:
            self.engine.checkpoint_engine = full


def _weights_only_engine():
    """DeepSpeed's torch checkpoint engine with ``torch.load(weights_only=True)``, allowing
    the three DeepSpeed classes its ZeRO optimizer state holds (plain records: a loss-scaler
    object's fields, an enum, a named tuple), checked on DeepSpeed 0.19 for ZeRO 0-2, fp32
    and bf16."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    class WeightsOnly(TorchCheckpointEngine):
        def load(self, path: str, map_location=None):
            with torch.serialization.safe_globals([LossScaler, ZeroStageEnum, fragment_address]):
                try:
                    return torch.load(path, map_location=map_location, weights_only=True)
                except pickle.UnpicklingError as exc:
                    raise CheckpointRefused(f"{path} refused: {refusal(exc)}") from None

    return WeightsOnly()
