"""Merge a checkpoint's classifier shards into one matrix, or re-lay them out for N ranks.

    python tools/reshard_checkpoint.py runs/x/checkpoints/step_1000 --merged full.pt
    python tools/reshard_checkpoint.py runs/x --world-size 16 --out runs/x16/checkpoints/step_1000

The same as ``dist-cosface reshard``; the work is done by ``dist_cosface.engine.reshard``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a source checkout

from dist_cosface.engine.reshard import add_reshard_arguments, run_reshard_command  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_reshard_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run_reshard_command(args)
    except ValueError as exc:
        parser.exit(2, f"reshard_checkpoint: {exc}\n")


if __name__ == "__main__":
    sys.exit(main())
