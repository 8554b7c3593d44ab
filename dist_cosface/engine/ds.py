"""DeepSpeed glue: the backbone runs inside a DeepSpeed engine, the classifier does not.

DeepSpeed owns the backbone's gradient averaging, ZeRO partitioning (stages 0-2) and bf16
master weights (and the backbone's clipping when it keeps the gradients, see
``owns_backbone_grads``, the one place of that rule; ``strategy.DeepSpeedStrategy`` applies
it). The sharded classifier keeps its own
row optimizer (DeepSpeed must not average or partition its rows). ``engine.backward``
divides the loss by the accumulation steps, which also scales the classifier's gradients,
so both halves see the same averaged loss as the ddp engine.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import torch

from dist_cosface.distributed import DistContext
from dist_cosface.engine.ckpt_safe import CheckpointRefused, refusal

if TYPE_CHECKING:
    from dist_cosface.config import RunConfig


def owns_backbone_grads(cfg: RunConfig) -> bool:
    """Whether DeepSpeed keeps the backbone's gradients outside ``param.grad``.

    ZeRO >= 1 partitions them and bf16 keeps them in fp32 buffers; then DeepSpeed clips the
    backbone on its own norm and the engine clips the classifier on the classifier's norm.
    With stage 0 in fp32 the averaged gradients sit in ``param.grad`` and the engine clips
    backbone and classifier together on the global norm, exactly as with DDP.
    """
    return cfg.train.zero_stage > 0 or cfg.train.precision != "fp32"


def deepspeed_config(cfg: RunConfig, world_size: int) -> dict:
    micro = cfg.data.batch_size
    accum = cfg.optim.grad_accum_steps
    return {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "train_batch_size": micro * accum * world_size,
        "zero_optimization": {"stage": cfg.train.zero_stage},
        "bf16": {"enabled": cfg.train.precision == "bf16"},
        "gradient_clipping": (cfg.optim.grad_clip or 0.0) if owns_backbone_grads(cfg) else 0.0,
        # our SGD/AdamW are plain torch optimizers; ZeRO only needs their param_groups
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def build_deepspeed_engine(
    backbone: torch.nn.Module, optimizer: torch.optim.Optimizer, cfg: RunConfig, ctx: DistContext
):
    """Wrap ``backbone`` and its optimizer; needs a launched process group (torchrun)."""
    if not ctx.is_distributed:
        raise ValueError(
            "train.engine='deepspeed' needs a launched process group "
            "(torchrun or deepspeed launcher); use engine='ddp' for one process"
        )
    if ctx.device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    # The default group already exists (init_distributed); DeepSpeed adopts it.
    deepspeed.init_distributed(dist_backend="nccl" if ctx.device.type == "cuda" else "gloo")
    engine, _, _, _ = deepspeed.initialize(
        model=backbone,
        optimizer=optimizer,
        config=deepspeed_config(cfg, ctx.world_size),
        dist_init_required=False,
    )
    if cfg.train.precision == "bf16" and ctx.device.type == "cpu":
        # DeepSpeed casts parameters but not buffers to bf16; CPU batch_norm needs its running
        # statistics in the input's dtype (CUDA accepts fp32 statistics, so they stay fp32)
        for buf in engine.module.buffers():
            if buf.is_floating_point():
                buf.data = buf.data.to(torch.bfloat16)
    return engine


def engine_grad_norm(engine) -> float | None:
    """Backbone gradient norm DeepSpeed computed in its last step, when it exposes one."""
    value = engine.get_global_grad_norm()
    if value is None:
        return None
    return float(value.item() if isinstance(value, torch.Tensor) else value)


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

    def save(self, folder) -> None:
        try:
            self.engine.save_checkpoint(str(folder / "deepspeed"), tag="state")
        except Exception:
            # DeepSpeed's save ends in a barrier (its only collective after the first files
            # are written, DeepSpeed 0.19) that the ranks whose files were written are waiting
            # in: meet it, so that every rank reaches the caller's agreement on the error. A
            # full disk surfaces from torch.save as an OSError or a RuntimeError.
            import deepspeed.comm

            deepspeed.comm.barrier()
            raise

    def load(self, folder, saved_world_size: int) -> None:
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
            self.engine.load_checkpoint(str(folder / "deepspeed"), tag="state")
        finally:
            self.engine.checkpoint_engine = full


def _weights_only_engine():
    """DeepSpeed's torch checkpoint engine with ``torch.load(weights_only=True)``, allowing
    the three DeepSpeed classes its ZeRO optimizer state holds (plain records: a loss-scaler
    object's fields, an enum, a named tuple), checked on DeepSpeed 0.19 for ZeRO 0-2, fp32
    and bf16."""
    import pickle

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
