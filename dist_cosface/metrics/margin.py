"""Prometheus gauges of the classifier's margin health (``classifier/health.py``).

They are set at log steps from :meth:`MarginHealth.to_floats`, i.e. from host floats; like
the other log-time gauges they appear on first use, so a run never shows a made-up 0.
"""

from __future__ import annotations

from collections.abc import Callable

PREFIX = "dist_cosface"

# MarginHealth field -> (gauge name without prefix, help text)
_GAUGES = {
    "target_cos_mean": ("target_cos_mean", "Mean target cosine cos(theta_y) over the global batch"),
    "target_cos_p10": ("target_cos_p10", "10th percentile of the target cosine, global batch"),
    "hardest_neg_cos_mean": (
        "hardest_negative_cos_mean",
        "Mean over the global batch of the largest non-target cosine (classes in use)",
    ),
    "margin_violation_rate": (
        "margin_violation_rate",
        "Share of the global batch whose hardest negative beats the margin-penalized target",
    ),
    "margin": ("margin", "Margin m of the LMCL head"),
    "logit_scale": ("logit_scale", "Scale s of the normalized logits"),
    "scale_lower_bound": (
        "logit_scale_lower_bound",
        "CosFace lower bound on s for this number of classes and P_W (default 0.9)",
    ),
    "sampled_classes": (
        "partial_fc_sampled_classes",
        "Classes of this rank's shard used in the last step (Partial FC sample)",
    ),
    "classes_seen_fraction": (
        "partial_fc_classes_seen_ratio",
        "Share of this rank's classes used at least once this epoch",
    ),
    "effective_margin_mean": (
        "effective_margin_mean",
        "Mean over the global batch of cos(theta_y) - f(cos theta_y): the cosine gap the "
        "margin type asks of the target (per-row margins included)",
    ),
    "feature_norm_mean": (
        "feature_norm_mean",
        "Mean norm of the backbone's raw embeddings over the global batch",
    ),
    "subcenter_dominant_share": (
        "subcenter_dominant_share",
        "Sub-centers: mean over this rank's classes of the share of their samples (this "
        "epoch) nearest to the class's dominant sub-center; 1/K none dominates, 1 one takes all",
    ),
}
_WEIGHT_NORM = ("class_weight_norm", "Raw row norms of this rank's class weights", "stat")
_WEIGHT_STATS = {"weight_norm_min": "min", "weight_norm_mean": "mean", "weight_norm_max": "max"}
# MarginHealth.running_stats, flattened by to_floats as running_stat_<name>
_RUNNING = (
    "margin_running_stat",
    "Running statistics of the margin type, identical on every rank (CurricularFace t, "
    "AdaFace norm_mean / norm_std)",
    "stat",
)
_RUNNING_PREFIX = "running_stat_"

MARGIN_HEALTH_NAMES = tuple(f"{PREFIX}_{name}" for name, _ in _GAUGES.values()) + (
    f"{PREFIX}_{_WEIGHT_NORM[0]}",
    f"{PREFIX}_{_RUNNING[0]}",
)


class MarginHealthGauges:
    """The gauges on one registry; ``make(kind, name, doc, extra=())`` builds a labelled
    metric with the exporter's constant labels, ``values`` are those labels' values."""

    def __init__(self, make: Callable, values: dict[str, str]) -> None:
        from prometheus_client import Gauge

        self._values = values
        self._gauges = {key: make(Gauge, name, doc) for key, (name, doc) in _GAUGES.items()}
        name, doc, label = _WEIGHT_NORM
        self._norm = make(Gauge, name, doc, extra=(label,))
        name, doc, label = _RUNNING
        self._running = make(Gauge, name, doc, extra=(label,))

    def set(self, health: dict[str, float]) -> None:
        """Set every gauge whose field is present (absent: does not apply to this head)."""
        running = {k for k in health if k.startswith(_RUNNING_PREFIX)}
        unknown = set(health) - set(_GAUGES) - set(_WEIGHT_STATS) - running
        if unknown:
            raise ValueError(f"unknown margin-health fields {sorted(unknown)}")
        for key, value in health.items():
            if key in _WEIGHT_STATS:
                self._norm.labels(**self._values, stat=_WEIGHT_STATS[key]).set(value)
            elif key in running:
                stat = key.removeprefix(_RUNNING_PREFIX)
                self._running.labels(**self._values, stat=stat).set(value)
            elif value is not None:
                self._gauges[key].labels(**self._values).set(value)
