"""The backbone's DeepSpeed engine: its config, construction and gradient norm.

The backbone runs inside a DeepSpeed engine, the classifier does not.

DeepSpeed owns the backbone's gradient averaging, ZeRO partitioning (stages 0-2) and bf16
master weights (and the backbone's clipping when it keeps the gradients, see
``owns_backbone_grads``, the one place of that rule; ``strategy.DeepSpeedStrategy`` applies
it). The sharded classifier keeps its own
row optimizer (DeepSpeed must not average or partition its rows). ``engine.backward``
divides the loss by the accumulation steps, which also scales the classifier's gradients,
so both halves see the same averaged loss as the ddp engine. The engine's own checkpoint
files are ``checkpoint.deepspeed_native``'s.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import torch

from dist_cosface.distributed import DistContext

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
