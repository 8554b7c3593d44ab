"""The trainer's seams: the TrainLoader protocol, the strategy choice, the head step API."""

from __future__ import annotations

import pytest
import torch

from dist_cosface.classifier import ClassifierConfig, ShardedClassifier
from dist_cosface.data import TrainLoader, build_loader
from dist_cosface.data.protocol import check_train_loader
from dist_cosface.distributed import DistContext
from dist_cosface.engine import train
from dist_cosface.engine.strategy import DDPStrategy, build_strategy
from dist_cosface.engine.trainer import Trainer
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
