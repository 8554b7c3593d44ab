"""``dist-cosface clean RUN SHARDS OUT [--eval-set PATH ...] [--eval-ijb ROOT NAME ...]``.

Alone (one process) or under torchrun (every rank runs it). Errors are one line on rank 0
(``dist-cosface clean: error: ...``, exit 2) and leave nothing behind.
"""

from __future__ import annotations

import argparse
import sys

import yaml

from dist_cosface.clean.config import SUBCENTER_ARCFACE_ANGLE, CleanConfig
from dist_cosface.clean.run import CleanJob, clean
from dist_cosface.configtools import from_mapping
from dist_cosface.distributed import init_distributed, shutdown

# flag -> (config key, help); values are checked by CleanConfig.__post_init__
_VALUES = {
    "--max-angle": (
        "max_angle",
        f"degrees; noisy sample above (default {SUBCENTER_ARCFACE_ANGLE:g})",
    ),
    "--min-dominant-share": ("min_dominant_share", "flag classes below this (default 0.5)"),
    "--duplicate-cos": ("duplicate_cos", "class centers above this are one identity (default 0.4)"),
    "--overlap-cos": (
        "overlap_cos",
        "evaluation identity matches a class above this (default 0.7)",
    ),
    "--backend": ("backend", "auto (dali when it imports), webdataset or dali"),
    "--batch-size": ("batch_size", "images embedded at once (default 128)"),
    "--workers": ("num_workers", "webdataset: DataLoader workers; dali: threads (default 2)"),
    "--device": ("device", "one process alone: auto, cpu or cuda"),
    "--search-k": ("search_k", "first neighbours per center (grown where needed; default 8)"),
    "--chunk-size": ("chunk_size", "center rows scored at once (default 65536)"),
    "--search-dtype": ("search_dtype", "float32 (default) or float64 center scores"),
    "--shard-size": ("shard_size", "samples per new shard (default: the source's largest)"),
}
# flag -> (config key, value it sets)
_SWITCHES = {
    "--keep-noisy": ("drop_noisy", False),
    "--no-merge": ("merge_duplicates", False),
    "--keep-overlap": ("remove_overlap", False),
    "--drop-low-share": ("drop_low_share", True),
    "--flip": ("flip", True),
}


def add_clean_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "run", help="run folder (its latest checkpoint, which must be intact) or a checkpoint"
    )
    parser.add_argument("shards", help="the shard set folder the run was trained on")
    parser.add_argument("out", help="folder for the new shard set and its report (must not exist)")
    parser.add_argument(
        "--eval-set",
        action="append",
        default=[],
        metavar="PATH",
        help=".bin, pairs file, folder with pairs.txt, or identity folders (repeatable)",
    )
    parser.add_argument(
        "--eval-ijb",
        nargs=2,
        action="append",
        default=[],
        metavar=("ROOT", "NAME"),
        help="IJB-B/C release folder and set name, e.g. ijbc (repeatable)",
    )
    for flag, (_, text) in _VALUES.items():
        parser.add_argument(flag, default=None, help=text)
    for flag, (key, value) in _SWITCHES.items():
        parser.add_argument(flag, action="store_true", help=f"sets {key}={value}")


def config_from_args(args: argparse.Namespace) -> CleanConfig:
    data = {}
    for flag, (key, _) in _VALUES.items():
        raw = getattr(args, flag[2:].replace("-", "_"))
        if raw is not None:
            data[key] = yaml.safe_load(raw)
    for flag, (key, value) in _SWITCHES.items():
        if getattr(args, flag[2:].replace("-", "_")):
            data[key] = value
    return from_mapping(CleanConfig, data, "clean")


def run_clean_command(args: argparse.Namespace) -> int:
    ctx = None
    try:
        cfg = config_from_args(args)
        job = CleanJob(
            args.run, args.shards, args.out, list(args.eval_set), [tuple(x) for x in args.eval_ijb]
        )
        ctx = init_distributed()
        clean(job, cfg, ctx)
    except ValueError as exc:  # ConfigError included: one line, on rank 0
        if ctx is None or ctx.is_main:
            print(f"dist-cosface clean: error: {exc}", file=sys.stderr)
        return 2
    finally:
        if ctx is not None:
            shutdown(ctx)
    return 0
