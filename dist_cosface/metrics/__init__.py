"""Prometheus metrics of a training run (one exporter per rank)."""

from dist_cosface.metrics.config import MetricsConfig
from dist_cosface.metrics.exporter import (
    EXPORTED_NAMES,
    PrometheusMetrics,
    RunMetrics,
    build_metrics,
)
from dist_cosface.metrics.sink import LogValues, MetricsSink, StepRecord

__all__ = [
    "EXPORTED_NAMES",
    "LogValues",
    "MetricsConfig",
    "MetricsSink",
    "PrometheusMetrics",
    "RunMetrics",
    "StepRecord",
    "build_metrics",
]
