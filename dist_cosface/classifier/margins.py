"""The margin types of the head: their parameters, the one rule that checks them, and their maths.

Every normalized margin type turns the target class's cosine ``c`` into its logit ``s f(c)``
(``f`` may depend on per-row parameters, e.g. the feature norm), with ``f'(c)`` for the
backward pass; non-target classes get ``s c``, except CurricularFace, which reweights its
hard negatives. ``softmax`` is the exception: plain ``W x`` logits, no normalization, no scale.

One small object per margin type (:class:`Margin` and its subclasses, built by
:func:`margin_of`) holds its maths; it is stateless: running statistics (CurricularFace's
``t``, AdaFace's norm mean and std) live in a :class:`MarginState` owned by the head and are
passed in. The parameter sections (``classifier.combined``, ``.curricularface``, ``.adaface``,
``.magface``) check their own ranges; :func:`check_margin` is the rule that needs the whole
config (the margin against the type and the class count), called by
``ClassifierConfig.__post_init__``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from functools import lru_cache
from typing import Literal, get_args

import torch

MarginType = Literal[
    "softmax", "nsl", "cosface", "arcface", "combined", "curricularface", "adaface", "magface"
]
MARGIN_TYPES: tuple[str, ...] = get_args(MarginType)
ArcfaceGradient = Literal["exact", "straight_through"]
ARCFACE_GRADIENTS: tuple[str, ...] = get_args(ArcfaceGradient)
# margin types whose target is an angle added to theta (arcface_gradient applies to them)
ANGULAR_GRADIENT_TYPES = ("arcface", "combined")
MAX_SUBCENTERS = 64


def _check_number(
    name: str, value: object, low: float, high: float, *, open_low=False, open_high=False
) -> None:
    """ValueError naming ``name`` unless ``value`` is a finite number in the interval."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    below = value <= low if open_low else value < low
    above = value >= high if open_high else value > high
    if below or above:
        interval = f"{'(' if open_low else '['}{low:g}, {high:g}{')' if open_high else ']'}"
        raise ValueError(f"{name} must be in {interval}, got {value!r}")


@dataclass(frozen=True)
class CombinedParams:
    """``classifier.combined``: ``f = cos(m1 theta + m2) - m3`` (insightface's convention:
    (1, 0.5, 0) is ArcFace, (1, 0, 0.35) CosFace)."""

    m1: float = 1.0
    m2: float = 0.5
    m3: float = 0.0

    def __post_init__(self) -> None:
        _check_number("m1", self.m1, 1.0, 4.0)  # a multiplicative angular margin, SphereFace's
        _check_number("m2", self.m2, 0.0, math.pi, open_high=True)  # an angle
        _check_number("m3", self.m3, 0.0, 2.0)  # additive; check_margin adds m3 <= C/(C-1)


@dataclass(frozen=True)
class CurricularFaceParams:
    """``classifier.curricularface``: ``momentum`` of the running mean t of the target cosine
    (t <- momentum * batch mean + (1 - momentum) * t; the paper's 0.01)."""

    momentum: float = 0.01

    def __post_init__(self) -> None:
        _check_number("momentum", self.momentum, 0.0, 1.0, open_low=True)


@dataclass(frozen=True)
class AdaFaceParams:
    """``classifier.adaface``: ``h`` (how much of the normalized feature norm reaches the
    margin; the paper's 0.333) and ``momentum`` of the running mean / std of the norms."""

    h: float = 0.333
    momentum: float = 0.01

    def __post_init__(self) -> None:
        _check_number("h", self.h, 0.0, 1.0, open_low=True)
        _check_number("momentum", self.momentum, 0.0, 1.0, open_low=True)


@dataclass(frozen=True)
class MagFaceParams:
    """``classifier.magface``: the norm range [l_a, u_a], the margin range [l_m, u_m] that
    m(a) maps it to linearly, and the weight lambda_g of the regulariser g(a) = a/u_a^2 + 1/a
    (defaults: the MagFace code's l_a, u_a, l_m, u_m and the paper's lambda_g)."""

    l_a: float = 10.0
    u_a: float = 110.0
    l_m: float = 0.45
    u_m: float = 0.8
    lambda_g: float = 35.0

    def __post_init__(self) -> None:
        _check_number("l_a", self.l_a, 0.0, 1e6, open_low=True)
        _check_number("u_a", self.u_a, 0.0, 1e6, open_low=True)
        if self.u_a <= self.l_a:
            raise ValueError(f"u_a must be > l_a = {self.l_a}, got {self.u_a}")
        _check_number("l_m", self.l_m, 0.0, math.pi, open_high=True)
        _check_number("u_m", self.u_m, 0.0, math.pi, open_high=True)
        if self.u_m < self.l_m:
            raise ValueError(f"u_m must be >= l_m = {self.l_m}, got {self.u_m}")
        _check_number("lambda_g", self.lambda_g, 0.0, 1e6)


@dataclass(frozen=True)
class MarginSpec:
    """The margin maths of a head (``ClassifierConfig.margin_spec()``, ``scale: auto``
    resolved). The per-type sections are used only by their own type."""

    margin_type: str
    scale: float
    margin: float
    arcface_gradient: str = "exact"
    combined: CombinedParams = field(default_factory=CombinedParams)
    curricularface: CurricularFaceParams = field(default_factory=CurricularFaceParams)
    adaface: AdaFaceParams = field(default_factory=AdaFaceParams)
    magface: MagFaceParams = field(default_factory=MagFaceParams)

    @property
    def normalized(self) -> bool:
        """Whether logits are cosines (normalized embeddings and weight rows)."""
        return self.margin_type != "softmax"

    @property
    def logit_scale(self) -> float:
        return self.scale if self.normalized else 1.0


def check_margin(
    margin_type: str,
    margin: float,
    num_classes: int,
    *,
    arcface_gradient: str = "exact",
    combined: CombinedParams | None = None,
) -> None:
    """Raise ValueError unless ``margin`` (and the options that depend on the type) fit
    ``margin_type`` with ``num_classes``.

    Checked once, when a ``ClassifierConfig`` is built (the head is built from one).
    CosFace: ``0 <= m <= C / (C - 1)``, the largest margin for which C classes can still be
    separated at all (Wang et al. 2018, sec. 3.4: the weight vectors' best arrangement is a
    simplex with pairwise cosine ``-1 / (C - 1)``); the same bound holds for combined's m3.
    ArcFace and CurricularFace: ``0 <= m < pi``, an angle. AdaFace: ``0 <= m <= 1`` (the
    margin reaches 2m on the additive side). NSL, softmax, combined (m1, m2, m3 instead) and
    MagFace (its [l_m, u_m] instead) ignore ``margin``: a finite number >= 0.
    ``arcface_gradient: straight_through`` applies to ``arcface`` and ``combined`` only.
    """
    if isinstance(margin, bool) or not isinstance(margin, (int, float)):
        raise ValueError(f"margin must be a number, got {margin!r}")
    if not math.isfinite(margin) or margin < 0:
        raise ValueError(f"margin must be a finite number >= 0, got {margin!r}")
    bound = num_classes / (num_classes - 1)
    if margin_type == "cosface" and margin > bound:
        raise ValueError(
            f"margin must be <= C/(C-1) = {bound:.4g} for cosface "
            f"with C={num_classes} classes (no separating solution beyond it), got {margin!r}"
        )
    if margin_type in ("arcface", "curricularface") and margin >= math.pi:
        raise ValueError(f"margin must be an angle in [0, pi) for {margin_type}, got {margin!r}")
    if margin_type == "adaface" and margin > 1.0:
        raise ValueError(f"margin must be in [0, 1] for adaface, got {margin!r}")
    if margin_type == "combined" and combined is not None and combined.m3 > bound:
        raise ValueError(
            f"combined.m3 must be <= C/(C-1) = {bound:.4g} with C={num_classes} classes "
            f"(the CosFace bound), got {combined.m3!r}"
        )
    if arcface_gradient not in ARCFACE_GRADIENTS:
        raise ValueError(
            f"arcface_gradient must be one of {list(ARCFACE_GRADIENTS)}, got {arcface_gradient!r}"
        )
    if arcface_gradient != "exact" and margin_type not in ANGULAR_GRADIENT_TYPES:
        raise ValueError(
            f"arcface_gradient {arcface_gradient} applies to {list(ANGULAR_GRADIENT_TYPES)} "
            f"only, not to margin_type={margin_type}"
        )


def check_subcenters(subcenters: object) -> None:
    if isinstance(subcenters, bool) or not isinstance(subcenters, int):
        raise ValueError(f"subcenters must be an integer, got {subcenters!r}")
    if not 1 <= subcenters <= MAX_SUBCENTERS:
        raise ValueError(f"subcenters must be in [1, {MAX_SUBCENTERS}], got {subcenters}")


# ---- per-row parameters and the head's margin state ---------------------------------------


@dataclass(frozen=True)
class RowParams:
    """Per-row margin parameters of one forward (``[N]`` tensors over the global batch, or
    None where the margin type has none).

    ``angle``: per-row angular margin (MagFace's m(a), differentiable; AdaFace's g_angle);
    ``additive``: per-row additive margin (AdaFace's g_add); ``hard_threshold``: CurricularFace's
    cos(theta_y + m) per row, ``t``: its running t of this forward (0-d) (both set by the loss
    after the target cosines were all-reduced).
    """

    angle: torch.Tensor | None = None
    additive: torch.Tensor | None = None
    hard_threshold: torch.Tensor | None = None
    t: torch.Tensor | None = None

    def detached(self) -> RowParams:
        """The same values outside autograd (what the kernels and the statistics read)."""
        return RowParams(
            *(None if v is None else v.detach() for v in (self.angle, self.additive)),
            self.hard_threshold,
            self.t,
        )


class MarginState:
    """The head's mutable margin state: running statistics and sub-center hit counts.

    ``stats``: 0-d float64 tensors by name (CurricularFace ``t``; AdaFace ``norm_mean``,
    ``norm_std``). They are computed from all-reduced or all-gathered values, so they are
    identical on every rank and at every rank count; a checkpoint keeps them replicated.
    ``subcenter_hits [local classes, K]`` (K > 1 only): how often each sub-center was the
    nearest one of its class's samples this epoch (rows of this rank; margin health).
    """

    def __init__(self, initial: dict[str, float], num_local_classes: int, subcenters: int):
        self.stats = {k: torch.tensor(v, dtype=torch.float64) for k, v in initial.items()}
        self.subcenter_hits = (
            torch.zeros(num_local_classes, subcenters, dtype=torch.long) if subcenters > 1 else None
        )

    def to(self, device: torch.device) -> MarginState:
        self.stats = {k: v.to(device) for k, v in self.stats.items()}
        if self.subcenter_hits is not None:
            self.subcenter_hits = self.subcenter_hits.to(device)
        return self

    def update(self, name: str, batch_value: torch.Tensor, momentum: float) -> torch.Tensor:
        """``stat <- momentum * batch_value + (1 - momentum) * stat`` (in place); returns it."""
        stat = self.stats[name]
        stat.mul_(1.0 - momentum).add_(batch_value.detach().to(stat.dtype) * momentum)
        return stat

    def new_epoch(self) -> None:
        if self.subcenter_hits is not None:
            self.subcenter_hits.zero_()


# ---- the margin types ---------------------------------------------------------------------


def _sin_of(cos: torch.Tensor) -> torch.Tensor:
    return (1.0 - cos * cos).clamp_min(0.0).sqrt()


def _as(value, like: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(value, dtype=like.dtype, device=like.device)


def arc_target(cos: torch.Tensor, m) -> torch.Tensor:
    """``cos(theta + m)``, and insightface's fallback ``cos(theta) - m sin(m)`` where
    ``theta + m > pi`` (``m`` a float or an ``[N]`` tensor)."""
    m = _as(m, cos)
    phi = cos * torch.cos(m) - _sin_of(cos) * torch.sin(m)
    # InsightFace's "easy margin" off: a CosFace-like linear penalty that keeps the target
    # logit decreasing in theta beyond pi - m, where cos(theta + m) turns back up
    fallback = cos - m * torch.sin(m)
    return torch.where(cos > torch.cos(math.pi - m), phi, fallback)


def arc_target_grad(cos: torch.Tensor, m) -> torch.Tensor:
    """d/dc of :func:`arc_target`: ``cos m + c sin m / sin theta``, 1 on the fallback."""
    m = _as(m, cos)
    # the clamp only guards the measure-zero points c = +-1 where the derivative is unbounded
    sin_theta = (1.0 - cos * cos).clamp_min(1e-12).sqrt()
    exact = torch.cos(m) + cos * torch.sin(m) / sin_theta
    return torch.where(cos > torch.cos(math.pi - m), exact, torch.ones_like(cos))


def arc_target_grad_m(cos: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """d/dm of :func:`arc_target`: ``-sin(theta + m)``, ``-(sin m + m cos m)`` on the fallback."""
    exact = -(_sin_of(cos) * torch.cos(m) + cos * torch.sin(m))
    return torch.where(cos > torch.cos(math.pi - m), exact, -(torch.sin(m) + m * torch.cos(m)))


class Margin:
    """One margin type's maths (stateless; the head's :class:`MarginState` is passed in).

    ``target(c, p)`` is ``f(c)`` for the ``[N]`` target cosines ``c`` with the per-row
    parameters ``p``; ``target_grad`` its derivative in ``c``. Subclasses add what their type
    needs: per-row parameters from the feature norms, running statistics, the negatives'
    transform, a regulariser. Plain NSL: ``f(c) = c``.
    """

    stat_names: tuple[str, ...] = ()  # running statistics in MarginState.stats
    uses_norms = False  # row_params reads the feature norms
    reweights_negatives = False  # CurricularFace: negatives are not plain s c
    param_requires_grad = False  # MagFace: RowParams.angle is differentiable

    def __init__(self, spec: MarginSpec) -> None:
        self.spec = spec

    @property
    def normalized(self) -> bool:
        return self.spec.normalized

    def initial_stats(self) -> dict[str, float]:
        return {}

    def row_params(
        self, norms: torch.Tensor | None, state: MarginState | None, update: bool
    ) -> RowParams | None:
        """Per-row parameters from the global batch's feature norms (None: the type has none)."""
        return None

    def target(self, cos: torch.Tensor, p: RowParams | None = None) -> torch.Tensor:
        return cos

    def target_grad(self, cos: torch.Tensor, p: RowParams | None = None) -> torch.Tensor:
        return torch.ones_like(cos)

    def target_grad_param(self, cos: torch.Tensor, p: RowParams) -> torch.Tensor:
        """d f / d p.angle (only for ``param_requires_grad`` types)."""
        raise NotImplementedError(f"{self.spec.margin_type} has no differentiable parameter")

    def regulariser(self, norms: torch.Tensor) -> torch.Tensor | None:
        """Per-row term added to the loss (MagFace's lambda_g g(a)), None for the others."""
        return None


class CosFace(Margin):
    def target(self, cos, p=None):
        return cos - self.spec.margin


class ArcFace(Margin):
    def target(self, cos, p=None):
        return arc_target(cos, self.spec.margin)

    def target_grad(self, cos, p=None):
        if self.spec.arcface_gradient == "straight_through":
            return torch.ones_like(cos)  # arcface_torch's no_grad margin: d/dc taken as 1
        return arc_target_grad(cos, self.spec.margin)


class Combined(Margin):
    """``cos(m1 theta + m2) - m3``; beyond ``theta* = (pi - m2) / m1`` (where ``m1 theta +
    m2`` passes pi and the cosine turns back up) the continuous linear continuation
    ``c - cos(theta*) - 1 - m3``, decreasing in theta like the target it replaces."""

    def __init__(self, spec: MarginSpec) -> None:
        super().__init__(spec)
        p = spec.combined
        self.m1, self.m2, self.m3 = p.m1, p.m2, p.m3
        theta_star = (math.pi - self.m2) / self.m1
        self.cos_star = math.cos(theta_star) if theta_star < math.pi else -1.0

    def _in_range(self, cos):
        return cos >= self.cos_star

    def target(self, cos, p=None):
        if self.m1 == 1.0:  # the identity cos(theta + m2) = c cos m2 - sin theta sin m2
            core = cos * math.cos(self.m2) - _sin_of(cos) * math.sin(self.m2)
        else:
            core = torch.cos(self.m1 * torch.acos(cos.clamp(-1.0, 1.0)) + self.m2)
        fallback = cos - self.cos_star - 1.0
        return torch.where(self._in_range(cos), core, fallback) - self.m3

    def target_grad(self, cos, p=None):
        if self.spec.arcface_gradient == "straight_through":
            return torch.ones_like(cos)
        sin_theta = (1.0 - cos * cos).clamp_min(1e-12).sqrt()
        if self.m1 == 1.0:
            exact = math.cos(self.m2) + cos * math.sin(self.m2) / sin_theta
        else:  # d/dc cos(m1 acos c + m2) = m1 sin(m1 theta + m2) / sin theta
            theta = torch.acos(cos.clamp(-1.0, 1.0))
            exact = self.m1 * torch.sin(self.m1 * theta + self.m2) / sin_theta
        return torch.where(self._in_range(cos), exact, torch.ones_like(cos))


class CurricularFace(ArcFace):
    """ArcFace's target; a negative with ``c_j > cos(theta_y + m)`` (hard) gets
    ``c_j (t + c_j)``, t the running mean of the target cosine over the global batch."""

    stat_names = ("t",)
    reweights_negatives = True

    def initial_stats(self):
        return {"t": 0.0}

    def hard_threshold(self, global_target_cos: torch.Tensor) -> torch.Tensor:
        """``cos(theta_y + m)`` per row, the trig identity without the fallback (the paper's
        mask)."""
        m = self.spec.margin
        return global_target_cos * math.cos(m) - _sin_of(global_target_cos) * math.sin(m)

    def negative_params(
        self, global_target_cos: torch.Tensor, state: MarginState, update: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(hard threshold [N], t): t is updated with this batch's mean first, as the paper."""
        if update:
            momentum = self.spec.curricularface.momentum
            state.update("t", global_target_cos.mean(), momentum)
        t = state.stats["t"].to(global_target_cos.dtype)
        return self.hard_threshold(global_target_cos), t

    @staticmethod
    def reweight_(
        logits: torch.Tensor, threshold: torch.Tensor, t: torch.Tensor, scale: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A chunk of ``s c`` logits, in place: ``s c (t + c)`` where ``c > threshold`` (``[N,
        1]`` broadcast; the hard negatives), unchanged elsewhere (-inf stays -inf). Returns the
        hard mask and ``t + c`` (1 off the mask) for :meth:`reweight_grad_`. One float
        temporary of the chunk's size: at small D this elementwise work, not the matmul, is
        what the reweighting costs."""
        t_plus_c = logits / scale
        hard = t_plus_c > threshold
        t_plus_c.add_(t).masked_fill_(~hard, 1.0)
        logits.mul_(t_plus_c)
        return hard, t_plus_c

    @staticmethod
    def reweight_grad_(hard: torch.Tensor, t_plus_c: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``d/dc`` of the reweighted negative, in place over ``t_plus_c``: ``t + 2 c`` on the
        hard negatives, 1 elsewhere."""
        return t_plus_c.mul_(2.0).sub_(t).masked_fill_(~hard, 1.0)


class AdaFace(Margin):
    """Per-row angular and additive margins from the feature norm ``a`` (detached):
    ``z = clip(h (a - mean) / (std + eps), -1, 1)``, ``g_angle = -m z``, ``g_add = m + m z``,
    ``f = cos(clip(theta + g_angle, eps, pi - eps)) - g_add``, theta of ``c`` clipped to
    ``[-1 + eps, 1 - eps]``; mean and std are running statistics of the global batch's norms."""

    stat_names = ("norm_mean", "norm_std")
    uses_norms = True
    EPS = 1e-3
    NORM_CLIP = (1e-3, 100.0)  # the reference's safe norms

    def initial_stats(self):
        return {"norm_mean": 20.0, "norm_std": 100.0}  # the reference's initial values

    def row_params(self, norms, state, update):
        a = norms.detach().clamp(*self.NORM_CLIP)
        if update:
            momentum = self.spec.adaface.momentum
            state.update("norm_mean", a.mean(), momentum)
            # the unbiased std of the batch (the reference's torch.std); 0 for one sample
            std = a.std() if a.numel() > 1 else torch.zeros((), dtype=a.dtype, device=a.device)
            state.update("norm_std", std, momentum)
        mean = state.stats["norm_mean"].to(a.dtype)
        std = state.stats["norm_std"].to(a.dtype)
        z = ((a - mean) / (std + self.EPS) * self.spec.adaface.h).clamp(-1.0, 1.0)
        m = self.spec.margin
        return RowParams(angle=-m * z, additive=m + m * z)

    def _theta(self, cos, p):
        theta = torch.acos(cos.clamp(-1.0 + self.EPS, 1.0 - self.EPS))
        return theta, theta + p.angle

    def target(self, cos, p=None):
        _, shifted = self._theta(cos, p)
        return torch.cos(shifted.clamp(self.EPS, math.pi - self.EPS)) - p.additive

    def target_grad(self, cos, p=None):
        theta, shifted = self._theta(cos, p)
        inside = (
            (cos > -1.0 + self.EPS)
            & (cos < 1.0 - self.EPS)
            & (shifted > self.EPS)
            & (shifted < math.pi - self.EPS)
        )
        grad = torch.sin(shifted) / torch.sin(theta)  # d cos(theta + g) / dc, theta = acos c
        return torch.where(inside, grad, torch.zeros_like(cos))


class MagFace(Margin):
    """ArcFace's target with a per-row margin ``m(a) = l_m + (u_m - l_m)(a - l_a)/(u_a - l_a)``
    of the feature norm ``a`` clipped to ``[l_a, u_a]``, plus ``lambda_g g(a)``,
    ``g(a) = a / u_a^2 + 1 / a``; the gradient flows through ``a`` into both."""

    uses_norms = True
    param_requires_grad = True

    def _clipped(self, norms: torch.Tensor) -> torch.Tensor:
        p = self.spec.magface
        return norms.clamp(p.l_a, p.u_a)

    def row_params(self, norms, state, update):
        p = self.spec.magface
        slope = (p.u_m - p.l_m) / (p.u_a - p.l_a)
        return RowParams(angle=p.l_m + slope * (self._clipped(norms) - p.l_a))

    def target(self, cos, p=None):
        return arc_target(cos, p.angle.detach().to(cos.dtype))

    def target_grad(self, cos, p=None):
        return arc_target_grad(cos, p.angle.detach().to(cos.dtype))

    def target_grad_param(self, cos, p):
        return arc_target_grad_m(cos, p.angle.detach().to(cos.dtype))

    def regulariser(self, norms):
        p = self.spec.magface
        a = self._clipped(norms)
        return p.lambda_g * (a / p.u_a**2 + 1.0 / a)


_MARGINS: dict[str, type[Margin]] = {
    "softmax": Margin,
    "nsl": Margin,
    "cosface": CosFace,
    "arcface": ArcFace,
    "combined": Combined,
    "curricularface": CurricularFace,
    "adaface": AdaFace,
    "magface": MagFace,
}


@lru_cache(maxsize=64)
def margin_of(spec: MarginSpec) -> Margin:
    """The (stateless, shared) margin object of ``spec``."""
    return _MARGINS[spec.margin_type](spec)


def with_threshold(p: RowParams | None, threshold: torch.Tensor, t: torch.Tensor) -> RowParams:
    return replace(p or RowParams(), hard_threshold=threshold, t=t)


def target_fn(spec: MarginSpec, cos: torch.Tensor, params: RowParams | None = None) -> torch.Tensor:
    """``f(c)``: the target class's value before scaling (fp32 in, fp32 out)."""
    return margin_of(spec).target(cos, params)


def target_fn_grad(
    spec: MarginSpec, cos: torch.Tensor, params: RowParams | None = None
) -> torch.Tensor:
    """``f'(c)``: the derivative of :func:`target_fn` used by the backward pass (exact, or 1
    with ``arcface_gradient: straight_through``)."""
    return margin_of(spec).target_grad(cos, params)


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
