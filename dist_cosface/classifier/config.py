"""Config of the sharded margin classifier (``classifier.*`` in YAML)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, Union, get_args

from dist_cosface.classifier.margins import (
    MARGIN_TYPES,
    AdaFaceParams,
    ArcfaceGradient,
    CombinedParams,
    CurricularFaceParams,
    MagFaceParams,
    MarginSpec,
    MarginType,
    check_margin,
    check_subcenters,
    scale_lower_bound,
)

Kernel = Literal["auto", "torch", "triton"]
KERNELS: tuple[str, ...] = get_args(Kernel)  # the one list: config, YAML types and dispatch
# what the Triton kernels implement; the other margin types and sub-centers run on the torch
# kernels (kernel: triton refuses them here, kernel: auto falls back to torch for them)
TRITON_MARGIN_TYPES = ("softmax", "nsl", "cosface", "arcface")
# the margins the unnormalized-feature ablation (unnormalized.py) implements
UNNORMALIZED_MARGIN_TYPES = ("nsl", "cosface", "arcface")


@dataclass
class ClassifierConfig:
    """Everything the head is built from but its width, group and timing (checked here once)."""

    num_classes: int = 1000
    margin_type: MarginType = "cosface"
    scale: Union[float, Literal["auto"]] = 64.0  # "auto": CosFace lower bound at scale_p_w
    margin: float = 0.35  # m of cosface / arcface / curricularface / adaface
    # the parameters of the margin types that need more than m (docs/classifier.md)
    combined: CombinedParams = field(default_factory=CombinedParams)
    arcface_gradient: ArcfaceGradient = "exact"  # arcface / combined: or "straight_through"
    curricularface: CurricularFaceParams = field(default_factory=CurricularFaceParams)
    adaface: AdaFaceParams = field(default_factory=AdaFaceParams)
    magface: MagFaceParams = field(default_factory=MagFaceParams)
    subcenters: int = 1  # K sub-centers per class (K * C rows), class logit = max over them
    scale_p_w: float = 0.9  # expected minimum target posterior used by scale="auto"
    sample_rate: float = 1.0  # Partial FC: fraction of classes sampled per step (<1 samples)
    sample_seed: int = 0  # Partial FC negatives depend only on (seed, step, micro-step, rank)
    chunk_size: Union[int, None] = None  # classes per chunk; None picks automatically
    materialize: bool = False  # fast path: keep the full local logits when they fit
    # False: the paper's unnormalized-feature ablation, logits ||x|| (cos - m); one process only
    feature_norm: bool = True
    # loss kernels: "auto" = Triton on CUDA when it imports, else torch; "triton" needs CUDA.
    # The default stays "torch" until tools/gpu_checks.sh has passed on a GPU (docs/classifier.md)
    kernel: Kernel = "torch"

    def __post_init__(self) -> None:
        if not _is_int(self.num_classes) or self.num_classes < 2:
            raise ValueError(f"num_classes must be an integer >= 2, got {self.num_classes!r}")
        if self.margin_type not in MARGIN_TYPES:
            raise ValueError(
                f"margin_type must be one of {list(MARGIN_TYPES)}, got {self.margin_type!r}"
            )
        if self.scale != "auto" and not _is_positive_number(self.scale):
            raise ValueError(f"scale must be positive or 'auto', got {self.scale!r}")
        if not _is_number(self.scale_p_w) or not 0.0 < self.scale_p_w < 1.0:
            raise ValueError(f"scale_p_w must be in (0, 1), got {self.scale_p_w!r}")
        if not _is_number(self.sample_rate) or not 0.0 < self.sample_rate <= 1.0:
            raise ValueError(f"sample_rate must be in (0, 1], got {self.sample_rate!r}")
        if self.chunk_size is not None and (not _is_int(self.chunk_size) or self.chunk_size < 1):
            raise ValueError(f"chunk_size must be an integer >= 1 or null, got {self.chunk_size!r}")
        if self.kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {list(KERNELS)}, got {self.kernel!r}")
        _check_sections(self)
        check_margin(
            self.margin_type,
            self.margin,
            self.num_classes,
            arcface_gradient=self.arcface_gradient,
            combined=self.combined,
        )
        check_subcenters(self.subcenters)
        if self.kernel == "triton" and not self.triton_supported:
            raise ValueError(
                f"kernel 'triton' does not implement {self._triton_missing()}: the Triton "
                f"kernels cover margin_type {list(TRITON_MARGIN_TYPES)} with one sub-center "
                "and arcface_gradient exact; use kernel torch (kernel auto runs this head on "
                "the torch kernels)"
            )
        if not self.feature_norm:
            _check_unnormalized_features(self.margin_type, self.sample_rate, self.subcenters)

    @property
    def triton_supported(self) -> bool:
        """Whether the Triton kernels implement this head (``kernel: auto`` needs it)."""
        return not self._triton_missing()

    def _triton_missing(self) -> str:
        missing = []
        if self.margin_type not in TRITON_MARGIN_TYPES:
            missing.append(f"margin_type={self.margin_type}")
        if self.subcenters > 1:
            missing.append(f"subcenters={self.subcenters}")
        if self.arcface_gradient != "exact":
            missing.append(f"arcface_gradient={self.arcface_gradient}")
        return ", ".join(missing)

    def margin_spec(self) -> MarginSpec:
        """The margin maths of the loss, with ``scale: auto`` resolved (CosFace bound)."""
        scale = self.scale
        if scale == "auto":
            scale = scale_lower_bound(self.num_classes, self.scale_p_w)
        return MarginSpec(
            self.margin_type,
            float(scale),
            float(self.margin),
            arcface_gradient=self.arcface_gradient,
            combined=self.combined,
            curricularface=self.curricularface,
            adaface=self.adaface,
            magface=self.magface,
        )


_SECTIONS = {
    "combined": CombinedParams,
    "curricularface": CurricularFaceParams,
    "adaface": AdaFaceParams,
    "magface": MagFaceParams,
}


def _check_sections(cfg: ClassifierConfig) -> None:
    """The margin sections have their own types (built from YAML mappings by configtools)."""
    for name, kind in _SECTIONS.items():
        if not isinstance(getattr(cfg, name), kind):
            raise ValueError(
                f"{name} must be a {kind.__name__}, got {type(getattr(cfg, name)).__name__}"
            )


def _check_unnormalized_features(margin_type: str, sample_rate: float, subcenters: int) -> None:
    """The ablation's limits that the config alone decides (one process: the head checks)."""
    if margin_type == "softmax":
        raise ValueError(
            "feature_norm=False applies to nsl/cosface/arcface; softmax never normalizes"
        )
    if margin_type not in UNNORMALIZED_MARGIN_TYPES:
        raise ValueError(
            f"feature_norm=False applies to {list(UNNORMALIZED_MARGIN_TYPES)}, "
            f"not to margin_type={margin_type}"
        )
    if subcenters > 1:
        raise ValueError(f"feature_norm=False is implemented for subcenters=1, got {subcenters}")
    if sample_rate < 1.0:
        raise ValueError(
            "feature_norm=False (the paper's unnormalized-feature ablation) is implemented "
            f"without sampling only; got sample_rate {sample_rate}"
        )


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_positive_number(value: object) -> bool:
    return _is_number(value) and math.isfinite(value) and value > 0
