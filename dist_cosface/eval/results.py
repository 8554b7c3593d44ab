"""``eval.json``: the results of every evaluation command and of training's evaluation."""

from __future__ import annotations

import json
from pathlib import Path

from dist_cosface.data.shards import atomic_write_text


def write_results(path: Path, results: dict) -> None:
    """Atomic write of the JSON results (float/int keys become strings)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(results, indent=2))
