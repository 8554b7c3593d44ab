"""The whole run's configuration: one typed section per component.

YAML files only override the defaults below; dotted command-line overrides
(``optim.lr=0.2``) are applied on top. Unknown keys and invalid values raise
:class:`~dist_cosface.configtools.ConfigError` naming the key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from dist_cosface.classifier.config import ClassifierConfig
from dist_cosface.configtools import apply_overrides, from_mapping, load_yaml, to_yaml
from dist_cosface.data.config import DataConfig
from dist_cosface.distributed import DistConfig
from dist_cosface.engine.config import CheckpointConfig, OptimConfig, TrainConfig
from dist_cosface.eval.config import EvalConfig
from dist_cosface.metrics.config import MetricsConfig
from dist_cosface.models.config import ModelConfig


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    dist: DistConfig = field(default_factory=DistConfig)


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """Defaults, overridden by the YAML file (if any), overridden by dotted overrides."""
    data = load_yaml(path) if path else {}
    data = apply_overrides(data, list(overrides or []))
    return from_mapping(RunConfig, data)


def dump_config(cfg: RunConfig, path: str | Path) -> None:
    Path(path).write_text(config_to_yaml(cfg))


def config_to_yaml(cfg: RunConfig) -> str:
    """The resolved config as YAML that :func:`load_config` reads back to an equal config."""
    return to_yaml(cfg)
