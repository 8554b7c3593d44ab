"""Config of the Prometheus exporter (``metrics.*`` in YAML)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union


@dataclass
class MetricsConfig:
    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = 9400  # base port; rank with local rank i serves port + i
    job: str = "dist_cosface"
    pushgateway: Union[str, None] = None  # push instead of serving (short jobs)
    push_every_s: float = 15.0

    def validate(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if self.push_every_s <= 0:
            raise ValueError(f"push_every_s must be positive, got {self.push_every_s}")
