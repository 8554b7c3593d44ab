"""Margin-health statistics of the LMCL head ("is the model learning the margin geometry?").

Everything is derived from two per-row quantities of the GLOBAL batch that the head's forward
already has (no extra GEMM):

- ``target_cos [N]``: cos(theta_y) of each sample with its own class (softmax: the raw
  target logit ``W_y x``);
- ``hardest_neg_cos [N]``: the largest non-target cosine over the classes in use this step
  (all classes, or the Partial FC sample; softmax: the largest non-target logit).

Each rank computes ``target_cos`` for the rows whose class it owns (0 elsewhere) and its
local hardest negative (-inf where it has no non-target column). The loss's two existing
all-reduces carry them on the steps that ask for statistics: the local hardest negative rides
in the row-max all-reduce (MAX over ``[2, N]`` instead of ``[N]``) and the target cosine in
the sum-exp all-reduce (SUM over ``[3, N]`` instead of ``[2, N]``). After that every rank
holds both vectors for the whole global batch, so the mean and the exact 10th percentile
need no further communication. Those two collectives are the loss's own
(``loss_common.reduce_row_max`` and ``reduce_row_sums``, which every kernel path reaches
through ``loss_common.global_log_sum_exp``); this module only reads their result, a
``loss_common.RowStats``.

Every margin type is judged against its own effective target value ``f(cos theta_y)``
(with its per-row parameters: AdaFace's and MagFace's margins depend on the feature norm):
a violation is a hardest negative above it, and ``effective_margin_mean`` is the mean gap
``cos theta_y - f(cos theta_y)`` the margin asks for. The margin's running statistics
(CurricularFace ``t``, AdaFace's norm mean and std), the global batch's mean feature norm and,
with sub-centers, the share of each class's samples nearest to its dominant sub-center are
reported alongside (all already on the device: no collective).

The result (:class:`MarginHealth`) keeps 0-d tensors on the device; :meth:`MarginHealth.to_floats`
is the one device-to-host copy, made at log steps only.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from dist_cosface.classifier.loss_common import RowStats
from dist_cosface.classifier.margins import MarginSpec, MarginState, RowParams, target_fn

TARGET_COS_QUANTILE = 0.1


@dataclass
class MarginHealth:
    """One log step's margin health. Tensors are 0-d and stay on the device until
    :meth:`to_floats`; ``None`` fields do not apply (e.g. no scale for plain softmax)."""

    target_cos_mean: torch.Tensor
    target_cos_p10: torch.Tensor
    hardest_neg_cos_mean: torch.Tensor
    margin_violation_rate: torch.Tensor
    weight_norm_min: torch.Tensor
    weight_norm_mean: torch.Tensor
    weight_norm_max: torch.Tensor
    classes_seen_fraction: torch.Tensor
    sampled_classes: int
    margin: float
    logit_scale: float | None
    scale_lower_bound: float | None
    effective_margin_mean: torch.Tensor | None = None  # mean of cos_y - f(cos_y)
    feature_norm_mean: torch.Tensor | None = None  # mean |x| of the global batch
    running_stats: dict[str, torch.Tensor] | None = None  # CurricularFace t, AdaFace norms
    subcenter_dominant_share: torch.Tensor | None = None  # K > 1: this rank's classes

    def to_floats(self) -> dict[str, float]:
        """Host floats by field name (running statistics as ``running_stat_<name>``), with ONE
        device-to-host copy for all tensors."""
        tensors = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "running_stats"}
        for name, value in (self.running_stats or {}).items():
            tensors[f"running_stat_{name}"] = value
        names = [k for k, v in tensors.items() if isinstance(v, torch.Tensor)]
        stacked = torch.stack([tensors[k].detach().double().reshape(()) for k in names])
        out = dict(zip(names, stacked.tolist()))
        for key, value in tensors.items():
            if key not in out and value is not None:
                out[key] = float(value)
        return out


def violation_threshold(
    spec: MarginSpec, target_cos: torch.Tensor, params: RowParams | None = None
) -> torch.Tensor:
    """The margin-penalized target value a negative must stay below: ``f(cos theta_y)``.

    CosFace: ``cos theta_y - m``; ArcFace and CurricularFace: ``cos(theta_y + m)``; combined:
    ``cos(m1 theta_y + m2) - m3``; AdaFace and MagFace: their per-row margins (``params``);
    NSL and softmax: the target itself (a violation is then a misclassified sample).
    """
    return target_fn(spec, target_cos, params)


def row_health(
    spec: MarginSpec, stats: RowStats, params: RowParams | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(target mean, target 10th percentile, hardest-negative mean, violation rate), 0-d
    tensors in the statistics' dtype. The percentile interpolates linearly (numpy's default)."""
    tgt, neg = stats.target_cos, stats.hardest_neg_cos
    p10 = torch.quantile(tgt, TARGET_COS_QUANTILE)
    violated = (neg > violation_threshold(spec, tgt, params)).to(tgt.dtype)
    return tgt.mean(), p10, neg.mean(), violated.mean()


def dominant_subcenter_share(hits: torch.Tensor) -> torch.Tensor:
    """Mean over the classes with samples of (hits of the most-hit sub-center / all hits);
    ``hits [classes, K]``. 1/K: no sub-center dominates; 1: one sub-center takes every sample
    (NaN when no class has a sample yet)."""
    total = hits.sum(dim=1)
    used = total > 0
    share = hits.amax(dim=1)[used].double() / total[used].double()
    return share.mean()


def weight_norm_stats(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(min, mean, max) of the raw row norms of this rank's weight shard, in fp32 or wider."""
    w = weight.detach()
    norms = w.to(torch.promote_types(w.dtype, torch.float32)).norm(dim=1)
    return norms.min(), norms.mean(), norms.max()


def margin_health(
    spec: MarginSpec,
    stats: RowStats,
    weight: torch.Tensor,
    seen: torch.Tensor,
    sampled_classes: int,
    scale_bound: float | None,
    *,
    params: RowParams | None = None,
    norms: torch.Tensor | None = None,
    state: MarginState | None = None,
) -> MarginHealth:
    """Assemble :class:`MarginHealth`; ``seen [K]`` bool marks the classes used this epoch,
    ``params`` / ``norms [N]`` are the forward's per-row margin parameters and feature norms,
    ``state`` the head's running statistics and sub-center hits."""
    tgt_mean, tgt_p10, neg_mean, violation = row_health(spec, stats, params)
    norm_min, norm_mean, norm_max = weight_norm_stats(weight)
    gap = None
    if spec.normalized:
        gap = (stats.target_cos - violation_threshold(spec, stats.target_cos, params)).mean()
    hits = state.subcenter_hits if state is not None else None
    return MarginHealth(
        target_cos_mean=tgt_mean,
        target_cos_p10=tgt_p10,
        hardest_neg_cos_mean=neg_mean,
        margin_violation_rate=violation,
        weight_norm_min=norm_min,
        weight_norm_mean=norm_mean,
        weight_norm_max=norm_max,
        classes_seen_fraction=seen.float().mean(),
        sampled_classes=int(sampled_classes),
        margin=spec.margin if spec.normalized else 0.0,
        logit_scale=spec.scale if spec.normalized else None,
        scale_lower_bound=scale_bound if spec.normalized else None,
        effective_margin_mean=gap,
        feature_norm_mean=norms.mean() if norms is not None else None,
        running_stats=_copies(state.stats) if state is not None and state.stats else None,
        subcenter_dominant_share=dominant_subcenter_share(hits) if hits is not None else None,
    )


def _copies(stats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Device copies: the live statistics change in place on the next training forward."""
    return {name: value.detach().clone() for name, value in stats.items()}
