"""Config of verification during and after training (``eval.*`` in YAML)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class EvalConfig:
    targets: list[str] = field(default_factory=list)  # .bin files or pairs.txt folders
    every_steps: int = 0  # 0: only at the end
    flip: bool = True
    batch_size: int = 64
    fars: list[float] = field(default_factory=lambda: [1e-3, 1e-2])
    roc_png: bool = True

    def validate(self) -> None:
        if self.every_steps < 0:
            raise ValueError(f"every_steps must be >= 0, got {self.every_steps}")
        for far in self.fars:
            if not 0.0 < far < 1.0:
                raise ValueError(f"fars entries must be in (0, 1), got {far}")
