"""Config of the backbone (``model.*`` in YAML)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass
class ModelConfig:
    name: Literal["iresnet18", "iresnet34", "iresnet50", "iresnet100", "mobilefacenet"] = (
        "mobilefacenet"
    )
    embedding_size: int = 512
    input_size: int = 112
    dropout: float = 0.0

    def validate(self) -> None:
        if self.embedding_size < 2:
            raise ValueError(f"embedding_size must be >= 2, got {self.embedding_size}")
        if self.input_size < 16:
            raise ValueError(f"input_size must be >= 16, got {self.input_size}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
