"""Configs of the training engine: optimizer, schedule, loop and checkpoints."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Union


@dataclass
class OptimConfig:
    name: Literal["sgd", "adamw"] = "sgd"
    lr: float = 0.1  # for the global batch as configured
    momentum: float = 0.9
    weight_decay: float = 5e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # adamw
    schedule: Literal["cosine", "poly", "constant"] = "poly"
    poly_power: float = 2.0
    warmup_steps: int = 0
    min_lr: float = 0.0
    grad_clip: Union[float, None] = 5.0  # global L2 norm; None disables
    grad_accum_steps: int = 1

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        # torch.optim would reject most of these only at the first step, without the key
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.poly_power < 0:
            raise ValueError(f"poly_power must be >= 0, got {self.poly_power}")
        if self.grad_accum_steps < 1:
            raise ValueError(f"grad_accum_steps must be >= 1, got {self.grad_accum_steps}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"betas must be two values in [0, 1), got {self.betas}")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise ValueError(f"grad_clip must be positive or null, got {self.grad_clip}")
        if self.min_lr < 0 or self.min_lr > self.lr:
            raise ValueError(f"min_lr must be in [0, lr], got {self.min_lr}")


@dataclass
class FSDPConfig:
    """``train.fsdp.*``: how ``train.engine: fsdp`` shards the backbone (docs/training.md)."""

    # after a block's forward, free its gathered weights and gather them again for its backward
    # (every rank holds one block's full weights at a time); false keeps them from the forward
    # to the backward: one all-gather less per block and step, the weights of all blocks held
    reshard_after_forward: bool = True
    # dtype the weights are gathered and computed in (null: train.precision); bf16 / fp16
    # halve the all-gather bytes. Units that hold BatchNorm keep fp32 weights, which its
    # float32 running statistics need (docs/training.md)
    param_dtype: Union[Literal["fp32", "bf16", "fp16"], None] = None
    # dtype of the gradients' reduce-scatter: fp32 (exact sums), or the training precision
    # (bf16 / fp16: half the bytes on the wire, rounded sums)
    reduce_dtype: Literal["fp32", "bf16", "fp16"] = "fp32"

    def dtypes(self, precision: str) -> tuple[str, str]:
        """(param_dtype, reduce_dtype) with null resolved to ``precision``."""
        return self.param_dtype or precision, self.reduce_dtype


@dataclass
class TrainConfig:
    engine: Literal["ddp", "deepspeed", "fsdp"] = "ddp"
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    zero_stage: int = 0  # deepspeed only
    total_steps: int = 1000
    log_every: int = 10
    seed: int = 0
    output_dir: str = "runs/default"
    # fp16: consecutive overflow-skipped steps tolerated before the run stops with an error
    max_skipped_steps: int = 20
    # time the classifier's collectives for the metrics (adds device syncs; off by default)
    time_collectives: bool = False
    # torch.compile the backbone for training (the classifier stays eager; docs/training.md)
    compile: bool = False
    compile_backend: Literal["inductor", "aot_eager"] = "inductor"  # aot_eager: no codegen
    compile_mode: Literal[
        "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"
    ] = "default"
    fsdp: FSDPConfig = field(default_factory=FSDPConfig)  # engine fsdp only

    def __post_init__(self) -> None:
        if self.total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {self.total_steps}")
        if self.zero_stage not in (0, 1, 2):
            raise ValueError(f"zero_stage must be 0, 1 or 2, got {self.zero_stage}")
        if self.log_every < 1:
            raise ValueError(f"log_every must be >= 1, got {self.log_every}")
        if self.max_skipped_steps < 1:
            raise ValueError(f"max_skipped_steps must be >= 1, got {self.max_skipped_steps}")
        if self.engine == "deepspeed" and self.precision == "fp16":
            # DeepSpeed's fp16 loss scale would also scale the classifier's gradients, which
            # live outside its optimizer; use bf16 there, or fp16 with the ddp engine.
            raise ValueError("train.precision='fp16' is not supported with engine='deepspeed'")
        self._check_fsdp()
        if self.compile_mode != "default" and self.compile_backend != "inductor":
            # torch.compile's modes are inductor settings; other backends would ignore them
            raise ValueError(
                f"compile_mode {self.compile_mode!r} needs compile_backend 'inductor', "
                f"got {self.compile_backend!r}"
            )

    def _check_fsdp(self) -> None:
        if self.engine == "fsdp" and self.zero_stage != 0:
            # ZeRO stages are DeepSpeed's; FSDP always shards weights, gradients and optimizer
            raise ValueError(
                f"zero_stage {self.zero_stage} applies to engine 'deepspeed' only; engine "
                "'fsdp' shards weights, gradients and optimizer state itself (zero_stage: 0)"
            )
        if self.engine != "fsdp" and self.fsdp != FSDPConfig():
            raise ValueError(
                f"fsdp.* settings apply to engine 'fsdp' only (engine is {self.engine!r}); "
                "remove them or set train.engine: fsdp"
            )
        for key in ("param_dtype", "reduce_dtype"):
            value = getattr(self.fsdp, key)
            if value not in (None, "fp32", self.precision):
                raise ValueError(
                    f"fsdp.{key} {value!r} must be 'fp32' or the training precision "
                    f"(train.precision is {self.precision!r})"
                )


@dataclass
class CheckpointConfig:
    every_steps: int = 500  # 0 disables periodic checkpoints (the final one is still written)
    keep_last: int = 3
    resume: Union[Literal["auto", "none"], str] = "auto"  # or a checkpoint folder
    # write in a background thread once a host snapshot is taken (training goes on meanwhile)
    async_save: bool = False
    # checkpoints of the run folder after the step a run starts from (an explicit lower-step
    # resume, or resume none): refuse to start, or archive them into checkpoints/superseded-<step>
    later_steps: Literal["refuse", "archive"] = "refuse"

    def __post_init__(self) -> None:
        if self.every_steps < 0:
            raise ValueError(f"every_steps must be >= 0, got {self.every_steps}")
        if self.keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {self.keep_last}")
