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

The result (:class:`MarginHealth`) keeps 0-d tensors on the device; :meth:`MarginHealth.to_floats`
is the one device-to-host copy, made at log steps only.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from dist_cosface.classifier.loss_common import RowStats
from dist_cosface.classifier.margins import MarginSpec, target_fn

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

    def to_floats(self) -> dict[str, float]:
        """Host floats by field name, with ONE device-to-host copy for all tensors."""
        tensors = {f.name: getattr(self, f.name) for f in fields(self)}
        names = [k for k, v in tensors.items() if isinstance(v, torch.Tensor)]
        stacked = torch.stack([tensors[k].detach().double().reshape(()) for k in names])
        out = dict(zip(names, stacked.tolist()))
        for key, value in tensors.items():
            if key not in out and value is not None:
                out[key] = float(value)
        return out


def violation_threshold(spec: MarginSpec, target_cos: torch.Tensor) -> torch.Tensor:
    """The margin-penalized target value a negative must stay below: ``f(cos theta_y)``.

    CosFace: ``cos theta_y - m``; ArcFace: ``cos(theta_y + m)``; NSL and softmax: the target
    itself (a violation is then a misclassified sample).
    """
    return target_fn(spec, target_cos)


def row_health(
    spec: MarginSpec, stats: RowStats
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(target mean, target 10th percentile, hardest-negative mean, violation rate), 0-d
    tensors in the statistics' dtype. The percentile interpolates linearly (numpy's default)."""
    tgt, neg = stats.target_cos, stats.hardest_neg_cos
    p10 = torch.quantile(tgt, TARGET_COS_QUANTILE)
    violated = (neg > violation_threshold(spec, tgt)).to(tgt.dtype)
    return tgt.mean(), p10, neg.mean(), violated.mean()


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
) -> MarginHealth:
    """Assemble :class:`MarginHealth`; ``seen [K]`` bool marks the rows used this epoch."""
    tgt_mean, tgt_p10, neg_mean, violation = row_health(spec, stats)
    norm_min, norm_mean, norm_max = weight_norm_stats(weight)
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
    )
