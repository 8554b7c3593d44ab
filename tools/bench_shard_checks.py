"""Start-up cost of checking each shard's index against its tar, as a ratio.

Times ``open_shards`` on the same folder twice in one run: with the tar-header spot checks of
``verify_index`` and with only the length check made before them, e.g.
    python tools/bench_shard_checks.py --shards 8 --shard-size 5000
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

from dist_cosface.data import dataset
from dist_cosface.data.shards import Manifest, ShardInfo, ShardWriter, publish_shard_set


def _write(out: Path, shards: int, shard_size: int) -> None:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (112, 112), (90, 120, 150)).save(buf, "JPEG")
    infos = []
    for s in range(shards):
        writer = ShardWriter(out / f"shard-{s:06d}.tar")
        for i in range(shard_size):
            writer.write(f"{s * shard_size + i:09d}", {"jpg": buf.getvalue(), "cls": b"0"})
        infos.append(ShardInfo(writer.tar_path.name, writer.num_samples, writer.close()))
    publish_shard_set(out, Manifest(1, shards * shard_size, infos))


def _length_check_only(tar: Path, entries) -> str:
    end = max((o + s for e in entries for o, s in e.components.values()), default=0)
    return "" if tar.stat().st_size >= end else f"{tar}: truncated"


def _best_seconds(path: str, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        dataset.open_shards(path, "stop")
        best = min(best, time.perf_counter() - t0)
    return best


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--shards", type=int, default=8)
    p.add_argument("--shard-size", type=int, default=5000)
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        _write(Path(tmp), args.shards, args.shard_size)
        checked = _best_seconds(tmp, args.repeats)
        with mock.patch.object(dataset, "verify_index", _length_check_only):
            base = _best_seconds(tmp, args.repeats)
    print(f"open_shards, {args.shards} shards x {args.shard_size} samples (best of {args.repeats})")
    print(f"length check only     {base * 1000:8.1f} ms   1.00x")
    print(f"+ header spot checks  {checked * 1000:8.1f} ms   {checked / base:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
