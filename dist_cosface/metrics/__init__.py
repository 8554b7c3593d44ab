"""Prometheus metrics of a training run (one exporter per rank)."""

from dist_cosface.metrics.config import MetricsConfig
from dist_cosface.metrics.exporter import (
    EXPORTED_NAMES,
    PrometheusMetrics,
    RunMetrics,
    build_metrics,
)

__all__ = ["EXPORTED_NAMES", "MetricsConfig", "PrometheusMetrics", "RunMetrics", "build_metrics"]
