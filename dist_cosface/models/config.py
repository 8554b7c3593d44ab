"""Config of the backbone (``model.*`` in YAML)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from dist_cosface.configtools import check_minimums


@dataclass
class ModelConfig:
    name: Literal["iresnet18", "iresnet34", "iresnet50", "iresnet100", "mobilefacenet"] = (
        "mobilefacenet"
    )
    embedding_size: int = 512
    input_size: int = 112
    dropout: float = 0.0

    def __post_init__(self) -> None:
        check_minimums(self, {"embedding_size": 2, "input_size": 16})
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
