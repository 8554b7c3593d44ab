"""Config of the sharded margin classifier (``classifier.*`` in YAML)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Union

from dist_cosface.classifier.margins import check_margin


@dataclass
class ClassifierConfig:
    num_classes: int = 1000
    margin_type: Literal["softmax", "nsl", "cosface", "arcface"] = "cosface"
    scale: Union[float, Literal["auto"]] = 64.0  # "auto": CosFace lower bound at scale_p_w
    margin: float = 0.35
    scale_p_w: float = 0.9  # expected minimum target posterior used by scale="auto"
    sample_rate: float = 1.0  # Partial FC: fraction of classes sampled per step (<1 samples)
    sample_seed: int = 0  # Partial FC negatives depend only on (seed, step, micro-step, rank)
    chunk_size: Union[int, None] = None  # classes per chunk; None picks automatically
    materialize: bool = False  # fast path: keep the full local logits when they fit
    # False: the paper's unnormalized-feature ablation, logits ||x|| (cos - m); one process only
    feature_norm: bool = True
    # loss kernels: "auto" = Triton on CUDA when it imports, else torch; "triton" needs CUDA.
    # The default stays "torch" until tools/gpu_checks.sh has passed on a GPU (docs/classifier.md)
    kernel: Literal["auto", "torch", "triton"] = "torch"

    def __post_init__(self) -> None:
        if self.num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {self.num_classes}")
        if not 0.0 < self.sample_rate <= 1.0:
            raise ValueError(f"sample_rate must be in (0, 1], got {self.sample_rate}")
        if self.chunk_size is not None and self.chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {self.chunk_size}")
        if self.scale != "auto" and self.scale <= 0:
            raise ValueError(f"scale must be positive or 'auto', got {self.scale}")
        if not 0.0 < self.scale_p_w < 1.0:
            raise ValueError(f"scale_p_w must be in (0, 1), got {self.scale_p_w}")
        if self.kernel not in ("auto", "torch", "triton"):
            raise ValueError(f"kernel must be one of auto/torch/triton, got {self.kernel!r}")
        check_margin(self.margin_type, self.margin, self.num_classes)
