"""``dist-cosface clean RUN SHARDS OUT [--eval-set PATH ...] [--eval-ijb ROOT NAME ...]``.

Alone (one process) or under torchrun (every rank runs it). A failure is raised on every rank
(``agreement.run_agreed``) and leaves nothing behind; the command line renders it as one
``dist-cosface clean: error: ...`` line per rank: status 2 for an unusable argument (a path
that is missing or exists where it must not, a threshold out of range), 1 for a failure while
running (a damaged checkpoint or shard, a class count that disagrees, an empty result).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from dist_cosface.clean.config import SUBCENTER_ARCFACE_ANGLE, CleanConfig
from dist_cosface.clean.run import CleanJob, clean
from dist_cosface.cliargs import UsageError, existing_path, new_folder
from dist_cosface.configtools import ConfigError, from_mapping, parse_yaml
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
        "run",
        type=existing_path,
        help="run folder (its latest checkpoint, which must be intact) or a checkpoint",
    )
    parser.add_argument(
        "shards", type=existing_path, help="the shard set folder the run was trained on"
    )
    parser.add_argument(
        "out", type=new_folder, help="folder for the new shard set and its report (must not exist)"
    )
    parser.add_argument(
        "--eval-set",
        action="append",
        default=[],
        type=existing_path,
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
    """The flags as a :class:`CleanConfig`; a bad value is a :class:`UsageError` naming its flag."""
    data = {}
    for flag, (key, _) in _VALUES.items():
        raw = getattr(args, flag[2:].replace("-", "_"))
        if raw is not None:
            try:
                data[key] = parse_yaml(raw, flag) if raw.strip() else raw
            except ConfigError as exc:
                raise UsageError(str(exc)) from None
    for flag, (key, value) in _SWITCHES.items():
        if getattr(args, flag[2:].replace("-", "_")):
            data[key] = value
    try:
        return from_mapping(CleanConfig, data, "clean")
    except ConfigError as exc:  # names the key (clean.<key>): say which flag set it
        flags = [f for f, (key, _) in _VALUES.items() if f"clean.{key}" in str(exc)]
        raise UsageError(f"{flags[0]}: {exc}" if flags else str(exc)) from None


def run_clean_command(args: argparse.Namespace) -> int:
    """Every rank runs the whole command; failures are raised (the CLI prints one line)."""
    cfg = config_from_args(args)
    for root, _ in args.eval_ijb:
        if not Path(root).is_dir():
            raise UsageError(f"--eval-ijb {root}: not a folder (one holding meta/ and loose_crop/)")
    job = CleanJob(
        args.run, args.shards, args.out, list(args.eval_set), [tuple(x) for x in args.eval_ijb]
    )
    ctx = init_distributed()
    try:
        clean(job, cfg, ctx)
    finally:
        shutdown(ctx)
    return 0
