"""Images/s of each data backend at 112x112, with ratios against webdataset in the same run.

Makes its own JPEG shards of synthetic faces (or converts --src FOLDER) first, e.g.
    python tools/bench_data.py --images 4096 --batches 30
    python tools/bench_data.py --images 51200 --batch-size 256 --workers 12 \
        --dali-device mixed --batches 150          # on a GPU machine
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

from dist_cosface.data import DataConfig, build_loader
from dist_cosface.distributed import DistContext


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--shards", default="", help="existing shard folder (skips generation)")
    p.add_argument("--src", default="", help="image folder to convert (JPEG re-encoded)")
    p.add_argument("--images", type=int, default=4096, help="synthetic JPEGs to generate")
    p.add_argument("--shard-size", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--image-size", type=int, default=112)
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers / DALI threads")
    p.add_argument("--batches", type=int, default=30, help="timed batches per backend")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--backends", default="webdataset,dali,synthetic")
    p.add_argument("--dali-device", choices=["cpu", "mixed"], default="cpu")
    return p.parse_args(argv)


def prepare_shards(args: argparse.Namespace, tmp: str) -> str:
    if args.shards:
        return args.shards
    out = str(Path(tmp) / "shards")
    if args.src:
        from dist_cosface.data.convert import ConvertOptions, convert

        opts = ConvertOptions(shard_size=args.shard_size, image_format="jpeg", workers=2)
        print(convert(args.src, out, opts).summary())
        return out
    from dist_cosface.data.synth_shards import write_synthetic_shards

    t0 = time.perf_counter()
    write_synthetic_shards(out, args.images, shard_size=args.shard_size)
    print(f"wrote {args.images} synthetic JPEGs in {time.perf_counter() - t0:.1f}s")
    return out


def _sync(x: torch.Tensor) -> None:
    if x.is_cuda:  # GPU work is asynchronous: time only finished batches
        torch.cuda.synchronize(x.device)


def measure(cfg: DataConfig, ctx: DistContext, batches: int, warmup: int) -> float:
    """Images/s over ``batches`` batches, timed from the end of the warm-up batches."""
    loader = build_loader(cfg, ctx)
    seen, images, t0 = 0, 0, 0.0
    while seen < warmup + batches:
        for x, _ in loader:
            seen += 1
            if seen == warmup:
                _sync(x)
                t0 = time.perf_counter()
            elif seen > warmup:
                images += x.shape[0]
            if seen == warmup + batches:
                break
        loader.set_epoch(loader.epoch + 1)
    _sync(x)
    return images / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.warmup < 1 or args.batches < 1:
        raise ValueError("--warmup and --batches must be >= 1")
    gpu = args.dali_device == "mixed"
    ctx = DistContext(device=torch.device("cuda", 0) if gpu else torch.device("cpu"))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = prepare_shards(args, tmp)
        for backend in args.backends.split(","):
            cfg = DataConfig(
                backend=backend,
                path=path,
                batch_size=args.batch_size,
                image_size=args.image_size,
                num_workers=args.workers,
                dali_device=args.dali_device,
                shuffle_buffer=1024,
            )
            rows.append((backend, measure(cfg, ctx, args.batches, args.warmup)))
    base = dict(rows).get("webdataset")
    print(f"\n{'backend':<12}{'images/s':>12}{'vs webdataset':>16}")
    for backend, rate in rows:
        ratio = f"{rate / base:.2f}x" if base else "-"
        name = f"dali-{args.dali_device}" if backend == "dali" else backend
        print(f"{name:<12}{rate:>12.0f}{ratio:>16}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
