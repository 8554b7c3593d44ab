"""The multi-process test helpers: ``run_ranks`` on real gloo ranks and ``free_port``.

They live in ``tools/spawn.py`` (a non-test module), which the benchmarks share; a failing,
dying or hung rank fails the test with that rank's traceback or exit status.
"""

from __future__ import annotations

from tools.spawn import RanksFailed, free_port, run_ranks

__all__ = ["RanksFailed", "free_port", "run_ranks"]
