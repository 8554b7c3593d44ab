"""Stand-alone shard converter; same as ``dist-cosface shards SRC OUT_DIR [options]``."""

from __future__ import annotations

import sys

from dist_cosface import cli


def main(argv: list[str] | None = None) -> int:
    """``dist-cosface shards`` itself: the same options, messages and exit statuses."""
    return cli.main(["shards", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
