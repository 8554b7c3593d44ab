"""``dist-cosface shards SRC OUT_DIR``: image folder or ``.rec`` pack -> WebDataset shards."""

from __future__ import annotations

import argparse

from dist_cosface.cliargs import UsageError
from dist_cosface.data.convert import MAX_IMAGE_BYTES, ConvertOptions, convert


def add_shards_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", help="identity-folder tree (SRC/<identity>/<image>) or a .rec file")
    parser.add_argument("out_dir", help="output folder for shards, indexes and manifest.json")
    parser.add_argument("--shard-size", type=int, default=10_000, help="samples per shard")
    parser.add_argument(
        "--max-shard-bytes", type=int, default=0, help="also cut shards at this many bytes"
    )
    parser.add_argument(
        "--image-format",
        choices=["keep", "jpeg"],
        default="keep",
        help="keep the source's encoded bytes, or re-encode every image as JPEG",
    )
    parser.add_argument("--jpeg-quality", type=int, default=95)
    parser.add_argument("--seed", type=int, default=0, help="seed of the global shuffle")
    parser.add_argument("--workers", type=int, default=1, help="parallel writer processes")
    parser.add_argument(
        "--on-bad",
        choices=["skip", "stop"],
        default="skip",
        help="skip and count bad inputs, or stop at the first one",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="start clean instead of resuming: deletes the files of a previous output in "
        "OUT_DIR (refused if OUT_DIR holds anything else or overlaps SRC)",
    )
    parser.add_argument(
        "--max-image-bytes",
        type=int,
        default=MAX_IMAGE_BYTES,
        help="larger source images or records are bad inputs, never read (default 64 MiB)",
    )
    parser.add_argument(
        "--num-classes",
        type=int,
        default=0,
        help=".rec only: labels must be below this (default: largest label + 1)",
    )
    parser.add_argument("--no-progress", action="store_true", help="never show a progress bar")
    parser.add_argument(
        "--landmarks",
        default="",
        help="align while converting: file of 'relative/path x1 y1 ... x5 y5' lines (folder SRC)",
    )
    parser.add_argument("--align-size", type=int, default=112, help="side of the aligned crops")


def options_from_args(args: argparse.Namespace) -> ConvertOptions:
    """The options; a value out of range is a ``UsageError`` naming it."""
    try:
        return _options(args)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc


def _options(args: argparse.Namespace) -> ConvertOptions:
    return ConvertOptions(
        shard_size=args.shard_size,
        max_shard_bytes=args.max_shard_bytes,
        image_format=args.image_format,
        jpeg_quality=args.jpeg_quality,
        seed=args.seed,
        workers=args.workers,
        on_bad=args.on_bad,
        overwrite=args.overwrite,
        max_image_bytes=args.max_image_bytes,
        num_classes=args.num_classes,
        progress=False if args.no_progress else None,
        landmarks=args.landmarks,
        align_size=args.align_size,
    )


def run_shards(args: argparse.Namespace) -> int:
    """Run the conversion and print the summary; returns 0.

    An argument that cannot be used raises ``UsageError`` (exit status 2), a failure while
    converting ``ValueError`` or ``OSError`` (status 1): ``dist_cosface.cli.main`` turns
    either into one ``dist-cosface shards: error: ...`` line.
    """
    result = convert(args.src, args.out_dir, options_from_args(args))
    print(result.summary())
    return 0
