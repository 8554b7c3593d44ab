"""Config of the Prometheus exporter (``metrics.*`` in YAML)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Union

# Prometheus label values may be anything, but the job name also becomes a Pushgateway URL
# path segment, so keep it to a conservative character set.
_JOB_RE = re.compile(r"^[A-Za-z0-9_.:-]+$")


@dataclass
class MetricsConfig:
    enabled: bool = True
    host: str = "127.0.0.1"  # address /metrics binds to; 0.0.0.0 for remote scraping
    port: int = 9400  # base port; rank with local rank i serves port + i; 0 = ephemeral
    job: str = "dist_cosface"  # Pushgateway job (when scraped, Prometheus sets `job`)
    node: Union[str, None] = None  # `node` label; default: this host's name
    pushgateway: Union[str, None] = None  # push instead of serving (short jobs)
    push_every_s: float = 15.0
    # classifier margin statistics at log steps (metrics.jsonl, and Prometheus when enabled)
    margin_health: bool = True

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if self.push_every_s <= 0:
            raise ValueError(f"push_every_s must be positive, got {self.push_every_s}")
        if not self.host:
            raise ValueError("host must not be empty")
        if not _JOB_RE.match(self.job):
            raise ValueError(f"job must match {_JOB_RE.pattern}, got {self.job!r}")
        if self.node is not None and not self.node:
            raise ValueError("node must be null (use the host name) or a non-empty string")
        if self.pushgateway is not None and not self.pushgateway.startswith(
            ("http://", "https://")
        ):
            raise ValueError(f"pushgateway must be an http(s):// URL, got {self.pushgateway!r}")
