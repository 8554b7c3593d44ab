"""The trainer's seams: the TrainLoader protocol, the strategy choice, the head step API,
the metrics sinks and the run summary."""

from __future__ import annotations

import inspect
import json
import logging
import typing

import pytest
import torch

from dist_cosface.classifier import ClassifierConfig, ShardedClassifier
from dist_cosface.data import TrainLoader, build_loader
from dist_cosface.data.protocol import check_train_loader
from dist_cosface.distributed import DistContext
from dist_cosface.engine import RunSummary, progress, train
from dist_cosface.engine.progress import ProgressLog
from dist_cosface.engine.strategy import DDPStrategy, build_strategy
from dist_cosface.engine.trainer import Trainer
from dist_cosface.metrics import MetricsSink, PrometheusMetrics, RunMetrics, StepRecord
from tests.tiny import FixedLoader, fixed_batches, linear_backbone, tiny_config


class _NoFailure:
    """A loader without the ``failure`` member (everything else present)."""

    num_classes, epoch, stats = 8, 0, {}

    def __init__(self):
        self.inner = FixedLoader(fixed_batches(2, 4), 8)

    def __len__(self):
        return len(self.inner)

    def __iter__(self):
        return iter(self.inner)

    def set_epoch(self, epoch):
        self.inner.set_epoch(epoch)

    def state_dict(self):
        return self.inner.state_dict()

    def load_state_dict(self, state):
        self.inner.load_state_dict(state)


def test_loaders_conform_and_a_loader_without_failure_is_refused(tmp_path):
    cfg = tiny_config(tmp_path)
    for loader in (build_loader(cfg.data, DistContext()), FixedLoader(fixed_batches(1, 4), 8)):
        assert isinstance(loader, TrainLoader)
        check_train_loader(loader)
    assert not isinstance(_NoFailure(), TrainLoader)
    with pytest.raises(TypeError, match=r"_NoFailure lacks \['failure'\]"):
        train(cfg, DistContext(), backbone=linear_backbone(cfg), loader=_NoFailure())


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_ddp_strategy_in_one_process(tmp_path, precision):
    cfg = tiny_config(tmp_path, f"train.precision={precision}")
    backbone = linear_backbone(cfg)
    strategy = build_strategy(cfg, DistContext(), backbone)
    assert isinstance(strategy, DDPStrategy)
    assert strategy.backbone is backbone and strategy.model is backbone  # no DDP wrapper
    assert strategy.native_checkpoint() is None
    optimizer = strategy.checkpoint_state().optimizer
    assert strategy.optimizers() == [optimizer]
    assert optimizer.param_groups[0]["params"] == list(backbone.parameters())
    head = [torch.nn.Parameter(torch.zeros(3))]
    assert strategy.clip_params(head) == [*backbone.parameters(), *head]
    assert strategy.scaler.enabled == (precision == "fp16")


def test_building_a_trainer_writes_nothing(tmp_path):
    cfg = tiny_config(tmp_path / "run")
    trainer = Trainer(cfg, DistContext(), backbone=linear_backbone(cfg))
    assert trainer.head.num_local_classes == 8
    assert not (tmp_path / "run").exists()


def test_head_step_report():
    x, labels = torch.randn(6, 4), torch.tensor([0, 1, 2, 3, 4, 5])
    head = ShardedClassifier(ClassifierConfig(num_classes=10, sample_rate=0.5), 4, None)
    head.begin_step(0, collect_health=True)
    head(x, labels).backward()
    report = head.step_report()
    assert report.comm_seconds is None  # not built with time_collectives
    assert report.health is not None
    assert report.health.to_floats()["sampled_classes"] == 6  # the 6 positives of 10 * 0.5
    head.begin_step(1)  # a step without collect_health: the previous request does not linger
    head(x, labels).backward()
    assert head.step_report().health is None
    timed = ShardedClassifier(ClassifierConfig(num_classes=10), 4, None, time_collectives=True)
    timed.begin_step(0)
    timed(x, labels)
    assert timed.step_report().comm_seconds == 0.0  # one process: no collectives to time


class _Hooks(RunMetrics):
    """The no-op exporter, keeping the records it gets and what its hooks make of them."""

    def __init__(self) -> None:
        self.records: list[StepRecord] = []
        self.calls: list[tuple] = []
        self.closed = False

    def write(self, record):
        self.records.append(record)
        super().write(record)

    def on_step(self, **values):
        self.calls.append(("step", values))

    def on_log(self, **values):
        self.calls.append(("log", values))

    def on_bad_samples(self, total):
        self.calls.append(("bad_samples", total))

    def on_bad_shards(self, total):
        self.calls.append(("bad_shards", total))

    def close(self):
        self.closed = True


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def test_progress_log_and_exporter_implement_the_sink_protocol(tmp_path):
    sinks = (ProgressLog(tmp_path / "metrics.jsonl", True, 3), RunMetrics())
    assert all(isinstance(sink, MetricsSink) for sink in sinks)
    for cls in (ProgressLog, RunMetrics, PrometheusMetrics):
        for name in ("write", "close"):
            want = inspect.signature(getattr(MetricsSink, name))
            assert inspect.signature(getattr(cls, name)) == want, f"{cls.__name__}.{name}"
        assert typing.get_type_hints(cls.write)["record"] is StepRecord


def test_the_trainer_drives_every_sink_from_one_record(tmp_path, monkeypatch, caplog):
    hooks = _Hooks()
    monkeypatch.setattr("dist_cosface.engine.trainer.build_metrics", lambda *a: hooks)
    to_progress: list[StepRecord] = []
    progress_write = ProgressLog.write
    monkeypatch.setattr(
        ProgressLog, "write", lambda self, r: (to_progress.append(r), progress_write(self, r))
    )
    caplog.set_level(logging.INFO, logger=progress.__name__)
    lines = _Lines()
    progress.log.addHandler(lines)  # its own handler: the CLI may have stopped propagation
    cfg = tiny_config(tmp_path, "train.total_steps=3", "train.log_every=2")
    loader = FixedLoader(fixed_batches(3, 4), 8)
    loader.stats = {"skipped_samples": 2, "bad_shards": 1}
    try:
        summary = train(cfg, DistContext(), backbone=linear_backbone(cfg), loader=loader)
    finally:
        progress.log.removeHandler(lines)
    assert [id(r) for r in to_progress] == [id(r) for r in hooks.records]  # the same objects
    assert [(r.step, r.samples, r.world_size) for r in to_progress] == [
        (s, 4, 1) for s in (1, 2, 3)
    ]
    logged = [r.logged for r in to_progress]
    assert logged[0] is None and logged[1] is not None and logged[2] is not None
    assert hooks.closed
    # the exporter's hooks: on_step every step, the log-step hooks on steps 2 and 3 only
    assert [c[0] for c in hooks.calls] == [
        "step",
        *(["step", "log", "bad_samples", "bad_shards"] * 2),
    ]
    assert hooks.calls[1][1]["step_seconds"] == to_progress[1].step_seconds
    assert hooks.calls[2][1] == dict(
        step=2, loss=logged[1].loss, lr=logged[1].lr, grad_norm=logged[1].grad_norm
    )
    assert hooks.calls[3][1] == 2 and hooks.calls[4][1] == 1
    # the progress sink: metrics.jsonl and the line, from the same values
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(x["step"], x["loss"], x["lr"]) for x in rows] == [
        (2, logged[1].loss, logged[1].lr),
        (3, logged[2].loss, logged[2].lr),
    ]
    assert len(lines.lines) == 2 and lines.lines[1].startswith("step 3/3 | ")
    assert f"| loss {logged[2].loss:.4f} | lr {logged[2].lr:.5g} |" in lines.lines[1]
    assert summary == RunSummary(
        step=3,
        loss=logged[2].loss,
        samples_per_s=rows[-1]["samples_per_s"],
        grad_norm=logged[2].grad_norm,
        checkpoint=str(tmp_path / "checkpoints" / "step_3"),
    )
