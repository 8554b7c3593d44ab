"""Resolve ``eval.targets`` entries to loaded verification sets, and check them at start-up."""

from __future__ import annotations

from pathlib import Path

from dist_cosface.eval.bin_file import load_bin
from dist_cosface.eval.config import EvalConfig
from dist_cosface.eval.pairs_file import load_pairs
from dist_cosface.eval.verification_set import VerificationSet
from dist_cosface.imageio import decode_image


def _open_target(path: Path) -> VerificationSet:
    if path.is_dir():
        return load_pairs(path / "pairs.txt", path)
    if path.suffix == ".bin":
        return load_bin(path)
    if path.is_file():
        return load_pairs(path)
    raise ValueError(f"eval target not found (expected .bin, pairs file or folder): {path}")


def load_target(target: str | Path) -> VerificationSet:
    """A ``.bin`` file, a pairs file, or a folder that holds ``pairs.txt`` and the images."""
    path = Path(target)
    try:
        return _open_target(path)
    except UnicodeDecodeError as exc:  # a binary file given as a pairs file
        raise ValueError(f"{path}: not a text pairs file ({exc})") from exc
    except OSError as exc:  # unreadable: permissions, I/O error, a dangling link
        raise ValueError(f"{path}: cannot read eval target: {exc}") from exc


def add_target(sets: dict[str, VerificationSet], vset: VerificationSet, target) -> None:
    """Results are keyed by set name, so two targets must not share one."""
    if vset.name in sets:
        raise ValueError(f"eval.targets: two targets are named {vset.name!r} ({target})")
    sets[vset.name] = vset


def load_targets(cfg: EvalConfig) -> dict[str, VerificationSet]:
    """Load every configured target once (callers evaluating repeatedly keep the result)."""
    sets: dict[str, VerificationSet] = {}
    for target in cfg.targets:
        add_target(sets, load_target(target), target)
    return sets


def check_set(vset: VerificationSet, cfg: EvalConfig) -> None:
    """What evaluation needs of a loaded set: enough pairs for the folds."""
    if vset.num_pairs < cfg.n_folds:
        raise ValueError(f"{vset.source}: {vset.num_pairs} pairs < eval.n_folds={cfg.n_folds}")


def check_targets(cfg: EvalConfig) -> dict[str, VerificationSet]:
    """Open and check every target before training, so a bad file fails in seconds.

    Each set is fully parsed (a ``.bin`` through the data-only unpickler, which refuses any
    pickled code; a pairs file line by line, every image file present), must hold at least
    ``eval.n_folds`` pairs, and its first and last images must decode. Errors are
    ``ValueError``s naming ``eval.targets`` and the file.
    """
    try:
        sets = load_targets(cfg)
        for vset in sets.values():
            check_set(vset, cfg)
            for i in (0, len(vset.images) - 1):
                decode_image(vset.read_image_bytes(i), vset.image_name(i))
    except ValueError as exc:
        if str(exc).startswith("eval.targets"):
            raise
        raise ValueError(f"eval.targets: {exc}") from exc
    return sets
