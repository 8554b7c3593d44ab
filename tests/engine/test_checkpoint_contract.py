"""Every part of a checkpoint implements its contract (``engine.checkpoint.contract``) with the
contract's exact parameters: found by scanning the packages that own run state, so a new part
(another engine's backbone state, a new loader) is checked without being listed here."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import dist_cosface.classifier
import dist_cosface.data
import dist_cosface.engine
from dist_cosface.classifier.state import ClassifierState
from dist_cosface.data.base import BaseLoader
from dist_cosface.data.protocol import TrainLoader
from dist_cosface.engine.amp import ShardedLossScaler
from dist_cosface.engine.checkpoint.contract import NativeCheckpoint, Stateful
from dist_cosface.engine.checkpoint.deepspeed_native import DeepSpeedCheckpoint
from dist_cosface.engine.checkpoint.train_state import BackboneState, RankState

_OWNERS = (dist_cosface.engine, dist_cosface.classifier, dist_cosface.data)


def _classes_defining(methods: tuple[str, ...]) -> set[type]:
    """Classes of the owning packages whose own body defines all of ``methods``."""
    found = set()
    for package in _OWNERS:
        for info in pkgutil.walk_packages(package.__path__, f"{package.__name__}."):
            module = importlib.import_module(info.name)
            for _, cls in inspect.getmembers(module, inspect.isclass):
                if cls.__module__ == module.__name__ and all(m in vars(cls) for m in methods):
                    found.add(cls)
    return found


def _parameters(function) -> list[tuple]:
    """(name, kind, default) of each parameter: what a caller of the contract relies on."""
    return [(p.name, p.kind, p.default) for p in inspect.signature(function).parameters.values()]


def _mismatches(classes: set[type], protocol: type, methods: tuple[str, ...]) -> list[str]:
    return [
        f"{cls.__module__}.{cls.__qualname__}.{name}{inspect.signature(getattr(cls, name))}"
        for cls in sorted(classes, key=lambda c: (c.__module__, c.__qualname__))
        for name in methods
        if _parameters(getattr(cls, name)) != _parameters(getattr(protocol, name))
    ]


def test_every_stateful_part_has_the_contracts_signature():
    methods = ("state_dict", "load_state_dict")
    found = _classes_defining(methods) - {Stateful}
    parts = {BackboneState, ClassifierState, ShardedLossScaler, RankState, BaseLoader, TrainLoader}
    assert parts <= found
    assert _mismatches(found, Stateful, methods) == []


def test_every_native_checkpoint_has_the_contracts_signature():
    methods = ("save", "load")
    found = _classes_defining(methods) - {NativeCheckpoint}
    assert DeepSpeedCheckpoint in found
    assert _mismatches(found, NativeCheckpoint, methods) == []
