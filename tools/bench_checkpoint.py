"""What verified checkpoints cost: CRC32 + fsync at save, verification at resume.

(The blocking time of sync vs async DCP saves is tools/bench_checkpoint_async.py.)
Writes one realistic classifier shard (default: Glint360K's 360,232 identities over 8 ranks,
512-d fp32 weight + SGD momentum, ~184 MB) with ``torch.save`` and reports, against that save
in the same run:
  save + record   torch.save, then ``checkpoint.files.file_record`` (read back, CRC32, fsync)
  verify          ``file_record`` alone on the written file (what resume reads per file)
and the hashing speed of CRC32 and SHA-256 on the same bytes in memory.

  python tools/bench_checkpoint.py [--rows 45029] [--dim 512] [--repeats 3] [--dir /scratch]
"""

from __future__ import annotations

import argparse
import hashlib
import tempfile
import time
import zlib
from pathlib import Path

import torch

from dist_cosface.engine.checkpoint.files import file_record


def _best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=45029, help="classes on one rank")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where to write (default: a temp folder)")
    args = parser.parse_args()
    shard = {
        "weight": torch.randn(args.rows, args.dim),
        "optim": {"state": {0: {"momentum_buffer": torch.randn(args.rows, args.dim)}}},
    }
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        path = Path(tmp) / "shard.pt"
        save = _best(lambda: torch.save(shard, path), args.repeats)
        recorded = _best(lambda: (torch.save(shard, path), file_record(path)), args.repeats)
        verify = _best(lambda: file_record(path), args.repeats)
        data = path.read_bytes()
    mb = len(data) / 1e6
    crc = _best(lambda: zlib.crc32(data), args.repeats)
    sha = _best(lambda: hashlib.sha256(data).digest(), args.repeats)
    print(f"shard {mb:.0f} MB ({args.rows} rows x {args.dim}, weight + momentum)")
    print(f"torch.save               {save:7.3f} s   1.00x (baseline)")
    print(f"save + CRC32 + fsync     {recorded:7.3f} s   {recorded / save:.2f}x")
    print(f"verify (read + CRC32)    {verify:7.3f} s   {verify / save:.2f}x")
    print(f"CRC32 in memory          {mb / crc:7.0f} MB/s")
    print(f"SHA-256 in memory        {mb / sha:7.0f} MB/s ({sha / crc:.1f}x the CRC32 time)")


if __name__ == "__main__":
    main()
