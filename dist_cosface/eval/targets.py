"""Resolve ``eval.targets`` entries to loaded verification sets."""

from __future__ import annotations

from pathlib import Path

from dist_cosface.eval.bin_file import load_bin
from dist_cosface.eval.config import EvalConfig
from dist_cosface.eval.pairs_file import load_pairs
from dist_cosface.eval.verification_set import VerificationSet


def load_target(target: str | Path) -> VerificationSet:
    """A ``.bin`` file, a pairs file, or a folder that holds ``pairs.txt`` and the images."""
    path = Path(target)
    if path.is_dir():
        return load_pairs(path / "pairs.txt", path)
    if path.suffix == ".bin":
        return load_bin(path)
    if path.is_file():
        return load_pairs(path)
    raise ValueError(f"eval target not found (expected .bin, pairs file or folder): {target}")


def load_targets(cfg: EvalConfig) -> dict[str, VerificationSet]:
    """Load every configured target once (callers evaluating repeatedly keep the result)."""
    sets: dict[str, VerificationSet] = {}
    for target in cfg.targets:
        vset = load_target(target)
        if vset.name in sets:
            raise ValueError(f"eval.targets: two targets are named {vset.name!r} ({target})")
        sets[vset.name] = vset
    return sets
