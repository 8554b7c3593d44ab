"""Margin health in the training loop and the exporter: collected on log steps only, written
to metrics.jsonl, served by Prometheus, Partial FC's seen classes reset per epoch."""

from __future__ import annotations

import json
import math

import pytest

import dist_cosface.classifier.head as head_module
from dist_cosface.distributed import DistContext
from dist_cosface.engine import train
from dist_cosface.metrics import EXPORTED_NAMES, MetricsConfig, PrometheusMetrics
from dist_cosface.metrics.exporter import RunMetrics
from tests.prom_scrape import scrape, value
from tests.tiny import FixedLoader, fixed_batches, linear_backbone, tiny_config

HEALTH_KEYS = {
    "target_cos_mean",
    "target_cos_p10",
    "hardest_neg_cos_mean",
    "margin_violation_rate",
    "weight_norm_min",
    "weight_norm_mean",
    "weight_norm_max",
    "classes_seen_fraction",
    "sampled_classes",
    "margin",
    "logit_scale",
    "scale_lower_bound",
}


epochs: list[int] = []


class _CountingSlot(head_module.RowStatsSlot):
    made = 0

    def __init__(self) -> None:
        super().__init__()
        _CountingSlot.made += 1


class _Recorder(RunMetrics):
    def __init__(self) -> None:
        self.health: list[dict[str, float]] = []

    def on_margin_health(self, health):
        self.health.append(dict(health))


def _run(tmp_path, monkeypatch, *overrides):
    _CountingSlot.made = 0
    monkeypatch.setattr(head_module, "RowStatsSlot", _CountingSlot)
    epochs.clear()
    real_set_epoch = head_module.ShardedClassifier.set_epoch

    def recording_set_epoch(self, epoch):
        epochs.append(epoch)
        real_set_epoch(self, epoch)

    monkeypatch.setattr(head_module.ShardedClassifier, "set_epoch", recording_set_epoch)
    recorder = _Recorder()
    monkeypatch.setattr("dist_cosface.engine.trainer.build_metrics", lambda *a: recorder)
    cfg = tiny_config(tmp_path, "train.total_steps=7", "train.log_every=3", *overrides)
    loader = FixedLoader(fixed_batches(3, 4), 8)  # 3 steps per epoch
    train(cfg, DistContext(), backbone=linear_backbone(cfg), loader=loader)
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    return lines, recorder


def test_statistics_on_log_steps_only_in_jsonl_and_exporter(tmp_path, monkeypatch):
    lines, recorder = _run(
        tmp_path, monkeypatch, "classifier.sample_rate=0.5", "optim.grad_accum_steps=2"
    )
    assert [x["step"] for x in lines] == [3, 6, 7]
    assert _CountingSlot.made == 3 * 2  # log steps x micro-batches, never on other steps
    for line in lines:
        assert HEALTH_KEYS <= set(line), line
        assert -1.0 <= line["target_cos_p10"] <= line["target_cos_mean"] <= 1.0
        assert -1.0 <= line["hardest_neg_cos_mean"] <= 1.0
        assert 0.0 <= line["margin_violation_rate"] <= 1.0
        assert 0 < line["weight_norm_min"] <= line["weight_norm_mean"] <= line["weight_norm_max"]
        assert line["logit_scale"] == 16.0 and line["margin"] == 0.2
        assert line["scale_lower_bound"] == pytest.approx((7 / 8) * math.log(7 * 9))
        assert 4 <= line["sampled_classes"] <= 8  # ceil(0.5 * 8) negatives+positives
    # 3 batches per epoch: the head hears of each new epoch at its first micro-batch
    assert epochs == [i // 3 for i in range(7 * 2)]
    assert [h["target_cos_mean"] for h in recorder.health] == [x["target_cos_mean"] for x in lines]


def test_switched_off_collects_nothing(tmp_path, monkeypatch):
    lines, recorder = _run(tmp_path, monkeypatch, "metrics.margin_health=false")
    assert _CountingSlot.made == 0 and recorder.health == []
    assert all(not (HEALTH_KEYS & set(x)) for x in lines)


def test_exporter_serves_the_gauges():
    m = PrometheusMetrics(MetricsConfig(port=0, node="n1"), DistContext(), {})
    try:
        health = {
            "target_cos_mean": 0.5,
            "target_cos_p10": 0.25,
            "hardest_neg_cos_mean": 0.125,
            "margin_violation_rate": 0.75,
            "weight_norm_min": 1.0,
            "weight_norm_mean": 2.0,
            "weight_norm_max": 4.0,
            "classes_seen_fraction": 0.375,
            "sampled_classes": 12.0,
            "margin": 0.35,
            "logit_scale": 30.0,
            "scale_lower_bound": 31.5,
        }
        before = scrape(m.port)
        assert not any(n.startswith("dist_cosface_target_cos") for n, _ in before)
        m.on_margin_health(health)
        got = scrape(m.port)
        assert value(got, "dist_cosface_target_cos_mean", rank="0") == 0.5
        assert value(got, "dist_cosface_target_cos_p10") == 0.25
        assert value(got, "dist_cosface_hardest_negative_cos_mean") == 0.125
        assert value(got, "dist_cosface_margin_violation_rate") == 0.75
        for stat, expected in (("min", 1.0), ("mean", 2.0), ("max", 4.0)):
            assert value(got, "dist_cosface_class_weight_norm", stat=stat) == expected
        assert value(got, "dist_cosface_partial_fc_classes_seen_ratio") == 0.375
        assert value(got, "dist_cosface_partial_fc_sampled_classes") == 12.0
        assert value(got, "dist_cosface_margin") == 0.35
        assert value(got, "dist_cosface_logit_scale") == 30.0
        assert value(got, "dist_cosface_logit_scale_lower_bound") == 31.5
        served = {n for n, _ in got if n.startswith("dist_cosface_")}
        assert served <= set(EXPORTED_NAMES) | {"dist_cosface_samples_created"} | {
            n for n in served if n.endswith("_created")
        }
        with pytest.raises(ValueError, match="target_cos_mena"):
            m.on_margin_health({"target_cos_mena": 0.5})
    finally:
        m.close()
