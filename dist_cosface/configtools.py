"""Strict construction of typed dataclass configs from plain mappings.

Every component owns a small dataclass config; this module turns YAML mappings and dotted
command-line overrides into those dataclasses. Unknown keys and values of the wrong type are
errors that name the full dotted key, so a typo never silently falls back to a default.
A dataclass checks its value ranges in ``__post_init__``, so it is validated wherever it is
built (here, in code, in tests); its ValueError starts with the field name, and
:func:`from_mapping` reports it with the dotted key (``optim.lr must be positive``).
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config key or value is invalid; the message names the dotted key."""


class _BadValue(ConfigError):
    """The value has the annotated type but is out of range: no other Union option applies."""


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(option) for option in typing.get_args(tp))
    if origin is Literal:
        return " | ".join(repr(v) for v in typing.get_args(tp))
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against annotation ``tp`` and convert where lossless (int -> float)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        for option in typing.get_args(tp):
            try:
                return _coerce(value, option, key)
            except _BadValue:
                raise
            except ConfigError:
                continue
        raise ConfigError(f"{key}: {value!r} does not match {_type_name(tp)}")
    if tp is type(None):
        if value is not None:
            raise ConfigError(f"{key}: expected null, got {value!r}")
        return None
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{key}: {value!r} is not one of {list(allowed)}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item_tp, *_) = typing.get_args(tp) or (Any,)
        items = [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        _, val_tp = typing.get_args(tp) or (Any, Any)
        return {k: _coerce(v, val_tp, f"{key}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return from_mapping(tp, value, key)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        number = float(value) if abs(value) < 1e308 else math.inf  # no OverflowError
        if not math.isfinite(number):
            # YAML's .nan/.inf mean nothing in any of our fields, and NaN slips through
            # every range check in __post_init__ (a NaN lr would fail only at step 1)
            raise _BadValue(f"{key}: expected a finite number, got {value!r}")
        return number
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported config type {_type_name(tp)}")


def check_minimums(cfg: object, minimums: dict[str, float]) -> None:
    """For ``__post_init__``: ValueError ``<key> must be >= <minimum>, got <value>`` for the
    first field of ``cfg`` below its minimum (NaN is not below: check floats' ranges
    separately)."""
    for key, minimum in minimums.items():
        value = getattr(cfg, key)
        if value < minimum:
            raise ValueError(f"{key} must be >= {minimum}, got {value}")


def from_mapping(cls: type[T], data: Any, prefix: str = "") -> T:
    """Build dataclass ``cls`` from ``data``; missing keys keep defaults, unknown keys fail."""
    where = prefix or cls.__name__
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        dotted = [f"{prefix}.{k}" if prefix else k for k in unknown]
        raise ConfigError(f"unknown config key(s) {dotted}; allowed: {sorted(fields)}")
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        kwargs[name] = _coerce(value, hints[name], key)
    try:
        return cls(**kwargs)  # the dataclass's __post_init__ checks the value ranges
    except ConfigError:
        raise
    except ValueError as exc:
        raise ConfigError(_validation_message(prefix, where, fields, str(exc))) from exc


def _validation_message(prefix: str, where: str, fields: dict, message: str) -> str:
    """``optim.lr must be positive`` when the message starts with a field name, else
    ``optim: <message>``: validators name the field first, the dotted key adds the section."""
    first = message.split(" ", 1)[0]
    if prefix and first in fields:
        return f"{prefix}.{message}"
    return f"{where}: {message}"


def to_mapping(obj: Any) -> Any:
    """Plain-data view of a (nested) dataclass config, suitable for YAML."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_mapping(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_mapping(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_mapping(v) for k, v in obj.items()}
    return obj


class StrictYamlLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that rejects duplicate mapping keys at any depth (PyYAML keeps the
    last one silently; keys brought in by a ``<<`` merge may still be overridden) and reads
    ``1e-3`` as a float, as YAML 1.2 does (YAML 1.1 makes it the string '1e-3')."""

    def construct_document(self, node):
        _check_unique_keys(self, node, "", set())
        return super().construct_document(node)


class ConfigYamlDumper(yaml.SafeDumper):
    """Quotes strings that :class:`StrictYamlLoader` would read as floats ('1e5')."""


def to_yaml(config: Any) -> str:
    """A config dataclass as YAML that :func:`from_mapping` (through :func:`load_yaml`) reads
    back to an equal config."""
    return yaml.dump(to_mapping(config), Dumper=ConfigYamlDumper, sort_keys=False)


_EXPONENT_FLOAT = re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$")
StrictYamlLoader.add_implicit_resolver("tag:yaml.org,2002:float", _EXPONENT_FLOAT, "-+0123456789.")
ConfigYamlDumper.add_implicit_resolver("tag:yaml.org,2002:float", _EXPONENT_FLOAT, "-+0123456789.")


def _check_unique_keys(loader: yaml.SafeLoader, node: yaml.Node, path: str, seen: set) -> None:
    """Walk the node tree before construction (merges not yet applied) naming the full key."""
    if id(node) in seen:  # an alias of a node already checked
        return
    seen.add(id(node))
    if isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _check_unique_keys(loader, item, f"{path}[{i}]", seen)
    if not isinstance(node, yaml.MappingNode):
        return
    first_line: dict = {}
    for key_node, value_node in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, yaml.ScalarNode):
            continue
        key = loader.construct_object(key_node)
        dotted = f"{path}.{key}" if path else str(key)
        line = key_node.start_mark.line + 1
        if key in first_line:
            raise yaml.constructor.ConstructorError(
                problem=f"duplicate key {dotted!r} at line {line} (first at line {first_line[key]})"
            )
        first_line[key] = line
        _check_unique_keys(loader, value_node, dotted, seen)


def parse_yaml(text: str, source: str) -> Any:
    """Parse ``text`` with :class:`StrictYamlLoader`; errors are one line naming ``source``."""
    loader = StrictYamlLoader(text)
    loader.name = source
    try:
        return loader.get_single_data()
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: invalid YAML: {_yaml_problem(exc)}") from exc
    finally:
        loader.dispose()


def _yaml_problem(exc: yaml.YAMLError) -> str:
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem:
        mark = exc.problem_mark
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        context = f"{exc.context}: " if exc.context else ""
        return f"{context}{exc.problem}{where}"
    return " ".join(str(exc).split())


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``a.b.c=value`` overrides (values parsed as YAML scalars) to a nested mapping."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form dotted.key=value")
        dotted, raw = item.split("=", 1)
        parts = dotted.strip().split(".")
        if not all(parts):
            raise ConfigError(f"override {item!r} has an empty key part")
        node = data
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a section")
            node = child
        node[parts[-1]] = parse_yaml(raw, f"override {item!r}") if raw.strip() else ""
    return data


def load_yaml(path: str | Path) -> dict:
    """Read a YAML mapping, naming the file in any error."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    data = parse_yaml(read_utf8(path), str(path))
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return data


def read_utf8(path: str | Path, what: str = "config", error: type[Exception] = ConfigError) -> str:
    """The text of a UTF-8 file (a leading BOM is fine); ``error`` naming the file, and the line
    of the first byte that is not UTF-8. Also used for the evaluation's list files."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise error(f"{path}: cannot read the {what}: {exc.strerror or exc}") from exc
    try:
        return raw.decode("utf-8-sig")  # a leading BOM (some Windows editors) is fine
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise error(
            f"{path}: not UTF-8 text (byte 0x{raw[exc.start]:02x} on line {line}); "
            f"save the {what} as UTF-8"
        ) from exc
