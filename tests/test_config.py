"""Typed config loading: defaults, YAML overrides, dotted overrides, strict errors."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Union

import pytest
import yaml

from dist_cosface.config import RunConfig, dump_config, load_config
from dist_cosface.configtools import ConfigError, apply_overrides, from_mapping

REPO = Path(__file__).resolve().parents[1]


@dataclass
class _Inner:
    rate: float = 0.5
    mode: Literal["a", "b"] = "a"

    def validate(self) -> None:
        if self.rate > 1:
            raise ValueError(f"rate must be <= 1, got {self.rate}")


@dataclass
class _Outer:
    inner: _Inner = field(default_factory=_Inner)
    size: Union[int, None] = None
    names: list[str] = field(default_factory=list)


def test_defaults_and_nested_values():
    cfg = from_mapping(_Outer, {"inner": {"rate": 1}, "size": 3, "names": ["x"]})
    assert cfg.inner.rate == 1.0 and isinstance(cfg.inner.rate, float)
    assert cfg.inner.mode == "a" and cfg.size == 3 and cfg.names == ["x"]


@pytest.mark.parametrize(
    "data, needle",
    [
        ({"inner": {"rat": 1}}, "inner.rat"),
        ({"inner": {"mode": "c"}}, "inner.mode: 'c' is not one of"),
        ({"size": "3"}, "size: '3'"),
        ({"size": True}, "size: True"),
        ({"inner": {"rate": 2}}, "rate must be <= 1, got 2"),
        ({"names": "x"}, "names: expected a list"),
        ({"inner": 5}, "inner: expected a mapping"),
    ],
)
def test_errors_name_the_key_and_value(data, needle):
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace("[", r"\[")):
        from_mapping(_Outer, data)


def test_dotted_overrides_parse_yaml_scalars():
    data = apply_overrides({"a": {"b": 1}}, ["a.b=2.5", "a.c=null", "d.e=[1, 2]", "f=text"])
    assert data == {"a": {"b": 2.5, "c": None}, "d": {"e": [1, 2]}, "f": "text"}
    with pytest.raises(ConfigError, match="not of the form"):
        apply_overrides({}, ["novalue"])
    with pytest.raises(ConfigError, match="'a' is not a section"):
        apply_overrides({"a": 1}, ["a.b=2"])


def test_yaml_then_overrides_then_round_trip(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("optim:\n  lr: 0.3\ntrain:\n  total_steps: 7\n")
    cfg = load_config(path, ["optim.lr=0.2"])
    assert cfg.optim.lr == 0.2 and cfg.train.total_steps == 7
    assert cfg.model == RunConfig().model  # untouched sections keep their defaults
    dumped = tmp_path / "resolved.yaml"
    dump_config(cfg, dumped)
    assert load_config(dumped) == cfg


def test_bad_files_are_named(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_config(missing)
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="bad.yaml: top level must be a mapping"):
        load_config(bad)
    typo = tmp_path / "typo.yaml"
    typo.write_text("optim:\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match=r"optim\.learning_rate"):
        load_config(typo)


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load(path):
    raw = yaml.safe_load(path.read_text())
    cfg = load_config(path)
    # every key written in the file is honoured (nothing silently dropped)
    for section, values in raw.items():
        for key, value in values.items():
            got = getattr(getattr(cfg, section), key)
            assert got == value or (isinstance(value, int) and got == float(value)), (section, key)
