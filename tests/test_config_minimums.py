"""configtools.check_minimums: the lower bounds of the data, eval, model and convert configs."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from dist_cosface.configtools import ConfigError, check_minimums, from_mapping
from dist_cosface.data.config import DataConfig
from dist_cosface.data.convert import ConvertOptions
from dist_cosface.eval.config import EvalConfig
from dist_cosface.models.config import ModelConfig


@pytest.mark.parametrize(
    ("cls", "section", "key", "bad", "minimum"),
    [
        (DataConfig, "data", "image_size", 15, 16),
        (DataConfig, "data", "num_workers", -1, 0),
        (DataConfig, "data", "synthetic_noise", -0.5, 0),
        (EvalConfig, "eval", "n_folds", 1, 2),
        (EvalConfig, "eval", "every_steps", -3, 0),
        (ModelConfig, "model", "embedding_size", 1, 2),
        (ConvertOptions, "shards", "align_size", 7, 8),
    ],
)
def test_a_value_below_its_minimum_names_the_dotted_key(cls, section, key, bad, minimum):
    with pytest.raises(ConfigError) as info:
        from_mapping(cls, {key: bad}, section)
    assert str(info.value) == f"{section}.{key} must be >= {minimum}, got {bad}"
    from_mapping(cls, {key: minimum}, section)  # the minimum itself is allowed


def test_check_minimums_reports_the_first_field_below_its_minimum():
    cfg = SimpleNamespace(every_steps=0, batch_size=0, n_folds=0)  # EvalConfig(...) would raise
    with pytest.raises(ValueError, match=r"^batch_size must be >= 1, got 0$"):
        check_minimums(cfg, {"every_steps": 0, "batch_size": 1, "n_folds": 2})
    check_minimums(EvalConfig(), {"every_steps": 0, "batch_size": 1, "n_folds": 2})
