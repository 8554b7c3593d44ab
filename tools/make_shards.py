"""Stand-alone shard converter; same as ``dist-cosface shards SRC OUT_DIR [options]``."""

from __future__ import annotations

import argparse
import sys

from dist_cosface.data.cli import add_shards_arguments, run_shards


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    add_shards_arguments(parser)
    return run_shards(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
