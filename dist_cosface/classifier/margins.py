"""Margin functions of the target logit and the CosFace scale bound.

Every margin type is described by how the target class's cosine ``c`` is turned into its
logit, ``s * f(c)``, and by ``f'(c)`` for the backward pass; non-target classes always get
``s * c``. ``softmax`` is the exception: plain ``W x`` logits, no normalization, no scale.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, get_args

import torch

MarginType = Literal["softmax", "nsl", "cosface", "arcface"]
MARGIN_TYPES: tuple[str, ...] = get_args(MarginType)


@dataclass(frozen=True)
class MarginSpec:
    margin_type: str
    scale: float
    margin: float

    @property
    def normalized(self) -> bool:
        """Whether logits are cosines (normalized embeddings and weight rows)."""
        return self.margin_type != "softmax"

    @property
    def logit_scale(self) -> float:
        return self.scale if self.normalized else 1.0


def check_margin(margin_type: str, margin: float, num_classes: int) -> None:
    """Raise ValueError unless ``margin`` is usable for ``margin_type`` with ``num_classes``.

    Checked once, when a ``ClassifierConfig`` is built (the head is built from one).
    CosFace: ``0 <= m <= C / (C - 1)``, the largest margin for which C classes can still be
    separated at all (Wang et al. 2018, sec. 3.4: the weight vectors' best arrangement is a
    simplex with pairwise cosine ``-1 / (C - 1)``). ArcFace: ``0 <= m < pi``, an angle.
    NSL and softmax ignore the margin; it only has to be a finite number >= 0.
    """
    if isinstance(margin, bool) or not isinstance(margin, (int, float)):
        raise ValueError(f"margin must be a number, got {margin!r}")
    if not math.isfinite(margin) or margin < 0:
        raise ValueError(f"margin must be a finite number >= 0, got {margin!r}")
    if margin_type == "cosface" and margin > num_classes / (num_classes - 1):
        raise ValueError(
            f"margin must be <= C/(C-1) = {num_classes / (num_classes - 1):.4g} for cosface "
            f"with C={num_classes} classes (no separating solution beyond it), got {margin!r}"
        )
    if margin_type == "arcface" and margin >= math.pi:
        raise ValueError(f"margin must be an angle in [0, pi) for arcface, got {margin!r}")


def target_fn(spec: MarginSpec, cos: torch.Tensor) -> torch.Tensor:
    """``f(c)``: the target class's value before scaling (fp32 in, fp32 out)."""
    if spec.margin_type == "cosface":
        return cos - spec.margin
    if spec.margin_type == "arcface":
        return _arcface(cos, spec.margin)
    return cos


def target_fn_grad(spec: MarginSpec, cos: torch.Tensor) -> torch.Tensor:
    """``f'(c)``: exact derivative of :func:`target_fn` (1 for the additive margins)."""
    if spec.margin_type != "arcface":
        return torch.ones_like(cos)
    m = spec.margin
    # d/dc cos(acos(c) + m) = cos(m) + c sin(m) / sqrt(1 - c^2); the clamp only guards the
    # measure-zero points c = +-1 where the true derivative is unbounded.
    sin_theta = (1.0 - cos * cos).clamp_min(1e-12).sqrt()
    exact = math.cos(m) + cos * math.sin(m) / sin_theta
    return torch.where(cos > _arcface_threshold(m), exact, torch.ones_like(cos))


def _arcface_threshold(m: float) -> float:
    # theta + m > pi  <=>  cos(theta) < cos(pi - m): there cos(theta + m) stops being monotone
    return math.cos(math.pi - m)


def _arcface(cos: torch.Tensor, m: float) -> torch.Tensor:
    sin_theta = (1.0 - cos * cos).clamp_min(0.0).sqrt()
    phi = cos * math.cos(m) - sin_theta * math.sin(m)
    # usual fallback (InsightFace's "easy margin" off): a CosFace-like linear penalty that
    # keeps the target logit decreasing in theta beyond pi - m
    fallback = cos - math.sin(math.pi - m) * m
    return torch.where(cos > _arcface_threshold(m), phi, fallback)


def scale_lower_bound(num_classes: int, p_w: float = 0.9) -> float:
    """CosFace (Wang et al. 2018, eq. 9) bound ``s >= (C-1)/C * log((C-1) P_W / (1 - P_W))``.

    ``p_w`` is the expected minimum posterior probability of the target class.
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    if not 0.0 < p_w < 1.0:
        raise ValueError(f"p_w must be in (0, 1), got {p_w!r}")
    c = num_classes
    return (c - 1) / c * math.log((c - 1) * p_w / (1.0 - p_w))
