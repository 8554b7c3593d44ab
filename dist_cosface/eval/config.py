"""Config of verification during and after training (``eval.*`` in YAML)."""

from __future__ import annotations

from dataclasses import dataclass, field

from dist_cosface.configtools import check_minimums


@dataclass
class EvalConfig:
    targets: list[str] = field(default_factory=list)  # .bin files, pairs files or folders
    every_steps: int = 0  # 0: only at the end
    flip: bool = True  # embedding of image + embedding of its mirror image
    batch_size: int = 64
    fars: list[float] = field(default_factory=lambda: [1e-3, 1e-2])
    n_folds: int = 10
    roc_png: bool = True

    def __post_init__(self) -> None:
        check_minimums(self, {"every_steps": 0, "batch_size": 1, "n_folds": 2})
        for far in self.fars:
            if not 0.0 < far < 1.0:
                raise ValueError(f"fars entries must be in (0, 1), got {far}")
