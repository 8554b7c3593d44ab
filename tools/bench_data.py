"""Images/s of each data backend at 112x112, with ratios against webdataset in the same run.

Makes its own JPEG shards of synthetic faces (or converts --src FOLDER) first, e.g.
    python tools/bench_data.py --images 4096 --batches 30
    python tools/bench_data.py --images 51200 --batch-size 256 --workers 12 \
        --dali-device mixed --batches 150          # on a GPU machine
    python tools/bench_data.py --backends dali --baseline-ref main --repeat 3
        # the DALI loader of the working tree against the one of git revision main
    python tools/bench_data.py --backends webdataset,dali --augment --repeat 3
        # each loader with and without data.augment (RECIPE below, or --augment '{...}')
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
import types
from collections.abc import Callable
from pathlib import Path

import torch

from dist_cosface.configtools import from_mapping, parse_yaml
from dist_cosface.data import DataConfig, build_loader
from dist_cosface.data.config import AugmentConfig
from dist_cosface.data.convert import ConvertOptions, convert
from dist_cosface.data.synth_shards import write_synthetic_shards
from dist_cosface.distributed import DistContext

# --augment without a value: the probabilities of the strongest face recipes' augmentations
# (AdaFace: crop, low resolution, photometric at 0.2 each), the ranges left at their defaults
RECIPE = (
    "{crop_prob: 0.2, low_res_prob: 0.2, blur_prob: 0.1, grayscale_prob: 0.1, jitter_prob: 0.2}"
)


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
    p.add_argument(
        "--baseline-ref",
        default="",
        help="also time the DALI loader of this git revision (dist_cosface/data/dali_loader.py)",
    )
    p.add_argument("--repeat", type=int, default=1, help="rounds (interleaved); medians shown")
    p.add_argument(
        "--augment",
        nargs="?",
        const=RECIPE,
        default="",
        metavar="YAML",
        help="also time each file backend with data.augment set to this YAML mapping "
        f"(default: {RECIPE})",
    )
    return p.parse_args(argv)


def loader_at_ref(ref: str) -> type:
    """``DaliLoader`` of ``dist_cosface/data/dali_loader.py`` at git revision ``ref``, built on
    the working tree's other modules (a baseline in the same run, same machine load)."""
    repo = Path(__file__).resolve().parents[1]
    source = subprocess.run(
        ["git", "show", f"{ref}:dist_cosface/data/dali_loader.py"],
        cwd=repo,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    module = types.ModuleType(f"dali_loader_at_{ref}")
    sys.modules[module.__name__] = module  # dataclasses look their module up there
    exec(compile(source, f"{ref}:dali_loader.py", "exec"), module.__dict__)  # noqa: S102
    return module.DaliLoader


def prepare_shards(args: argparse.Namespace, tmp: str) -> str:
    if args.shards:
        return args.shards
    out = str(Path(tmp) / "shards")
    if args.src:
        opts = ConvertOptions(shard_size=args.shard_size, image_format="jpeg", workers=2)
        print(convert(args.src, out, opts).summary())
        return out
    t0 = time.perf_counter()
    write_synthetic_shards(out, args.images, shard_size=args.shard_size)
    print(f"wrote {args.images} synthetic JPEGs in {time.perf_counter() - t0:.1f}s")
    return out


def _sync(x: torch.Tensor) -> None:
    if x.is_cuda:  # GPU work is asynchronous: time only finished batches
        torch.cuda.synchronize(x.device)


def measure(
    make: Callable, cfg: DataConfig, ctx: DistContext, batches: int, warmup: int
) -> tuple[float, float]:
    """Images per second of wall time and per second of this process's CPU time (all its
    threads: DALI's, not webdataset's worker processes) over ``batches`` batches after the
    warm-up. On a shared machine the CPU figure moves less with the other jobs' load."""
    loader = make(cfg, ctx)
    seen, images, t0, cpu0 = 0, 0, 0.0, 0.0
    while seen < warmup + batches:
        for x, _ in loader:
            seen += 1
            if seen == warmup:
                _sync(x)
                t0, cpu0 = time.perf_counter(), time.process_time()
            elif seen > warmup:
                images += x.shape[0]
            if seen == warmup + batches:
                break
        loader.set_epoch(loader.epoch + 1)
    _sync(x)
    return images / (time.perf_counter() - t0), images / (time.process_time() - cpu0)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.warmup < 1 or args.batches < 1:
        raise ValueError("--warmup and --batches must be >= 1")
    gpu = args.dali_device == "mixed"
    ctx = DistContext(device=torch.device("cuda", 0) if gpu else torch.device("cpu"))
    plain = AugmentConfig()
    loaders = [(backend, backend, build_loader, plain) for backend in args.backends.split(",")]
    if args.augment:
        augment = from_mapping(AugmentConfig, parse_yaml(args.augment, "--augment"), "--augment")
        files = [backend for _, backend, _, _ in loaders if backend != "synthetic"]
        loaders += [(f"{backend}+aug", backend, build_loader, augment) for backend in files]
    if args.baseline_ref:
        name = f"dali@{args.baseline_ref}"
        loaders.append((name, "dali", loader_at_ref(args.baseline_ref), plain))
    rates: dict[str, list[float]] = {name: [] for name, *_ in loaders}
    cpu_rates: dict[str, list[float]] = {name: [] for name, *_ in loaders}
    with tempfile.TemporaryDirectory() as tmp:
        path = prepare_shards(args, tmp)
        for _ in range(args.repeat):  # interleaved rounds: a load change hits every loader
            for name, backend, make, augment in loaders:
                cfg = DataConfig(
                    backend=backend,
                    path=path,
                    batch_size=args.batch_size,
                    image_size=args.image_size,
                    num_workers=args.workers,
                    dali_device=args.dali_device,
                    shuffle_buffer=1024,
                    augment=augment,
                )
                rate, cpu_rate = measure(make, cfg, ctx, args.batches, args.warmup)
                rates[name].append(rate)
                cpu_rates[name].append(cpu_rate)
    rows = [(n, statistics.median(rates[n]), statistics.median(cpu_rates[n])) for n in rates]
    base_name = "webdataset" if "webdataset" in rates else rows[-1][0]
    base, cpu_base = next(row[1:] for row in rows if row[0] == base_name)
    by_name = {row[0]: row[1:] for row in rows}
    print(f"\n{'backend':<16}{'images/s':>10}{'vs ' + base_name:>16}{'img/CPU-s':>11}{'vs':>8}")
    for name, rate, cpu_rate in rows:
        label = name.replace("dali", f"dali-{args.dali_device}", 1)
        # an augmented loader also against itself without augmentation (wall, CPU time)
        own = by_name.get(name.removesuffix("+aug")) if name.endswith("+aug") else None
        versus = f"   vs no aug {rate / own[0]:.2f}x, CPU {cpu_rate / own[1]:.2f}x" if own else ""
        print(
            f"{label:<16}{rate:>10.0f}{rate / base:>15.2f}x{cpu_rate:>11.0f}"
            f"{cpu_rate / cpu_base:>7.2f}x   rounds: {' '.join(f'{r:.0f}' for r in rates[name])}"
            f"{versus}"
        )
    if args.augment:
        print(f"augment: {args.augment}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
