"""Typed config loading: defaults, YAML overrides, dotted overrides, strict errors."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Union

import pytest
import yaml

from dist_cosface.config import RunConfig, dump_config, load_config
from dist_cosface.configtools import ConfigError, apply_overrides, from_mapping, load_yaml

REPO = Path(__file__).resolve().parents[1]


@dataclass
class _Inner:
    rate: float = 0.5
    mode: Literal["a", "b"] = "a"

    def __post_init__(self) -> None:
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
    # every key written in the file is honoured (nothing silently dropped)
    _assert_honoured(load_config(path), raw, path.name)


def _assert_honoured(cfg, values: dict, where: str) -> None:
    for key, value in values.items():
        got = getattr(cfg, key)
        if isinstance(value, dict):  # a nested section (data.augment)
            _assert_honoured(got, value, f"{where}:{key}")
        elif isinstance(value, list):
            assert list(got) == value, f"{where}:{key}"
        else:
            assert got == value or (isinstance(value, int) and got == float(value)), (where, key)


# ---------------------------------------------------------------- value checks


@pytest.mark.parametrize(
    "key", ["optim.lr", "optim.momentum", "classifier.scale", "data.synthetic_noise"]
)
@pytest.mark.parametrize("raw", [".nan", ".inf", "-.inf", "1e999"])
def test_non_finite_numbers_are_rejected_naming_the_key(key, raw):
    with pytest.raises(ConfigError, match=rf"^{re.escape(key)}: expected a finite number"):
        load_config(None, [f"{key}={raw}"])


@pytest.mark.parametrize(
    "override, key",
    [
        ("optim.momentum=-0.1", "optim.momentum"),
        ("optim.momentum=1.0", "optim.momentum"),
        ("optim.weight_decay=-0.0005", "optim.weight_decay"),
        ("optim.betas=[0.9, 1.0]", "optim.betas"),
        ("optim.betas=[-0.1, 0.999]", "optim.betas"),
        ("optim.poly_power=-1", "optim.poly_power"),
        ("optim.lr=0", "optim.lr"),
    ],
)
def test_optimizer_ranges_are_checked_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=rf"^{re.escape(key)} must be"):
        load_config(None, [override])


@pytest.mark.parametrize(
    "override",
    [
        "model.dropout=1.0",
        "classifier.sample_rate=0.0",
        "data.batch_size=0",
        "optim.lr=0.0",
        "train.total_steps=0",
        "checkpoint.keep_last=0",
        "eval.n_folds=1",
        "metrics.port=70000",
        "dist.timeout_s=0",
    ],
)
def test_every_section_is_validated_when_constructed_directly(override):
    """Code and tests that build a section get the check (and message) YAML gets."""
    dotted, raw = override.split("=")
    section, key = dotted.split(".")
    with pytest.raises(ConfigError) as from_yaml:
        load_config(None, [override])
    section_cls = type(getattr(RunConfig(), section))
    with pytest.raises(ValueError) as direct:
        section_cls(**{key: yaml.safe_load(raw)})
    assert str(direct.value).startswith(f"{key} must be"), direct.value
    assert str(from_yaml.value) == f"{section}.{direct.value}"


def test_optimizer_boundaries_are_accepted():
    cfg = load_config(None, ["optim.momentum=0", "optim.weight_decay=0", "optim.betas=[0, 0.5]"])
    assert cfg.optim.momentum == 0.0 and cfg.optim.betas == [0.0, 0.5]


_MARGIN_CASES = [
    ("cosface", 5.0, 1000, False),  # must fail at config load, not at head build
    ("cosface", 1.0, 1000, True),
    ("cosface", 1.002, 1000, False),  # bound C/(C-1) = 1.001
    ("cosface", 1.9, 2, True),  # bound 2 for two classes
    ("cosface", -0.1, 1000, False),
    ("arcface", 0.5, 1000, True),
    ("arcface", 3.2, 1000, False),  # an angle: at most pi
    ("nsl", 5.0, 1000, True),  # ignored by NSL and softmax, only finite and >= 0
    ("softmax", -1.0, 1000, False),
]


@pytest.mark.parametrize("margin_type, margin, num_classes, ok", _MARGIN_CASES)
def test_config_in_code_and_yaml_apply_one_margin_rule(margin_type, margin, num_classes, ok):
    from dist_cosface.classifier import ClassifierConfig, ShardedClassifier

    overrides = [
        f"classifier.margin_type={margin_type}",
        f"classifier.margin={margin}",
        f"classifier.num_classes={num_classes}",
    ]
    build = lambda: ClassifierConfig(  # noqa: E731
        num_classes=num_classes, margin_type=margin_type, margin=margin, chunk_size=64
    )
    if ok:
        assert load_config(None, overrides).classifier.margin == margin
        assert ShardedClassifier(build(), 4, None).spec.margin == margin
        return
    with pytest.raises(ValueError, match=r"margin must be") as code_error:
        build()
    with pytest.raises(ConfigError, match=r"^classifier\.margin must be") as config_error:
        load_config(None, overrides)
    assert str(config_error.value) == f"classifier.{code_error.value}"


def test_non_utf8_file_is_named(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("train:\n  output_dir: runs/café\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin1\.yaml: not UTF-8 text \(byte 0xe9 on line 2\)"):
        load_config(path)
    bom = tmp_path / "bom.yaml"
    bom.write_bytes("\ufefftrain:\n  output_dir: runs/café\n".encode())
    assert load_config(bom).train.output_dir == "runs/café"


@pytest.mark.parametrize(
    "override", ["optim.lr=[1,2", "optim.lr={a: 1", "optim.lr='x", "a=b: c: d"]
)
def test_malformed_override_is_named(override):
    with pytest.raises(ConfigError, match=rf"^override {re.escape(repr(override))}: invalid YAML"):
        load_config(None, [override])


@pytest.mark.parametrize(
    "text, dotted, line",
    [
        ("optim:\n  lr: 0.1\n  lr: 0.2\n", "optim.lr", 3),
        ("optim:\n  lr: 0.1\ntrain:\n  seed: 1\noptim:\n  momentum: 0.5\n", "optim", 5),
        ("eval:\n  targets:\n    - path: a\n      path: b\n", "eval.targets[0].path", 4),
    ],
)
def test_duplicate_yaml_keys_are_errors(tmp_path, text, dotted, line):
    path = tmp_path / "dup.yaml"
    path.write_text(text)
    expected = rf"dup\.yaml: invalid YAML: duplicate key '{re.escape(dotted)}' at line {line}"
    with pytest.raises(ConfigError, match=expected):
        load_config(path)


def test_merge_keys_may_still_be_overridden(tmp_path):
    path = tmp_path / "merge.yaml"
    path.write_text("optim: &o {lr: 0.3, momentum: 0.5}\nclassifier:\n  margin: 0.3\n")
    base = load_yaml(path)
    merged = apply_overrides(base, ["optim={<<: {lr: 0.4, momentum: 0.6}, lr: 0.2}"])
    assert merged["optim"] == {"lr": 0.2, "momentum": 0.6}
    with pytest.raises(ConfigError, match="duplicate key 'lr'"):
        apply_overrides({}, ["optim={lr: 0.4, lr: 0.2}"])


def test_exponent_floats_without_a_dot_are_numbers(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("optim:\n  lr: 1e-3\n  weight_decay: 5E-4\n")
    cfg = load_config(path, ["optim.min_lr=1e-5"])
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.min_lr) == (1e-3, 5e-4, 1e-5)
    assert load_config(None, ["train.output_dir=1e3x"]).train.output_dir == "1e3x"
    quoted = load_config(None, ["train.output_dir='1e5'"])  # a string that looks like a float
    dump_config(quoted, tmp_path / "resolved.yaml")
    assert load_config(tmp_path / "resolved.yaml") == quoted


@pytest.mark.parametrize(
    "write, args, needle",
    [
        (None, ["classifier.margin=5.0"], "classifier.margin must be <="),
        (None, ["optim.lr=.nan"], "optim.lr: expected a finite number"),
        (None, ["optim.lr=[1,2"], "override 'optim.lr=[1,2': invalid YAML"),
        (b"optim:\n  lr: 0.1\n  lr: 0.2\n", [], "duplicate key 'optim.lr'"),
        (b"optim:\n  name: \xff\n", [], "not UTF-8 text"),
    ],
)
def test_cli_prints_one_error_line_and_exits_2(tmp_path, capsys, write, args, needle):
    from dist_cosface.cli import main

    path = tmp_path / "run.yaml"
    path.write_bytes(write if write is not None else b"train:\n  total_steps: 3\n")
    with pytest.raises(SystemExit) as exited:
        main(["config", str(path), *args])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith("dist-cosface config: config error: ") and needle in err


def test_cli_config_output_loads_back_equal(tmp_path, capsys):
    from dist_cosface.cli import main

    args = ["optim.lr=1e-3", "train.output_dir='2e5'", "classifier.margin=0.4"]
    assert main(["config", str(REPO / "configs" / "quickstart.yaml"), *args]) == 0
    resolved = tmp_path / "resolved.yaml"
    resolved.write_text(capsys.readouterr().out)
    assert load_config(resolved) == load_config(REPO / "configs" / "quickstart.yaml", args)
