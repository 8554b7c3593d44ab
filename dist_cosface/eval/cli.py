"""The ``eval`` sub-command; the caller supplies how to load a trained backbone.

``load_backbone(checkpoint_or_run_dir) -> (backbone, image_size)`` comes from the engine so
that this package does not depend on the checkpoint format.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from dist_cosface.cliargs import (
    LoadBackbone,
    UsageError,
    device_arg,
    existing_path,
    float_in,
    int_in,
    output_folder,
)
from dist_cosface.configtools import from_mapping
from dist_cosface.eval.benchmarks import add_benchmark_arguments, run_benchmarks, write_results
from dist_cosface.eval.config import EvalConfig


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", type=existing_path, help="checkpoint folder or run directory")
    parser.add_argument(
        "--target",
        action="append",
        default=[],
        type=existing_path,
        help=".bin file, pairs file, or folder with pairs.txt (repeatable)",
    )
    add_benchmark_arguments(parser)
    parser.add_argument(
        "--out-dir",
        type=output_folder,
        default=None,
        help="eval.json and ROC PNGs go here (default: CHECKPOINT/eval)",
    )
    parser.add_argument("--batch-size", type=int_in(1), default=64)
    parser.add_argument(
        "--far",
        type=float_in(0, 1, low_open=True, high_open=True),
        action="append",
        help="repeatable; default 1e-3 1e-2",
    )
    parser.add_argument("--no-flip", action="store_true", help="skip the flip-test embedding")
    parser.add_argument("--no-roc", action="store_true", help="do not write ROC PNGs")
    parser.add_argument(
        "--device",
        type=device_arg,
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="cpu, cuda or cuda:N (under torchrun each rank uses its own device)",
    )


def run_eval_command(args: argparse.Namespace, load_backbone: LoadBackbone) -> int:
    """Pair verification, then the benchmarks, on all ranks (one process without torchrun)."""
    if not (args.target or args.megaface or args.ijb or args.ytf):
        raise UsageError("nothing to evaluate: give --target, --megaface, --ijb or --ytf")
    if args.ijb and not Path(args.ijb[0]).is_dir():
        raise UsageError(f"--ijb {args.ijb[0]}: not a folder (one holding meta/ and loose_crop/)")
    from dist_cosface.distributed import init_distributed, shutdown

    ctx = init_distributed()
    try:
        return _run_all(args, load_backbone, ctx)
    finally:
        shutdown(ctx)


def _run_all(args: argparse.Namespace, load_backbone: LoadBackbone, ctx) -> int:
    device = ctx.device if ctx.is_distributed else torch.device(args.device)
    backbone, image_size = load_backbone(args.checkpoint)
    backbone = backbone.to(device)
    out_dir = Path(args.out_dir) if args.out_dir else Path(args.checkpoint) / "eval"
    results = {}
    if args.target:
        results.update(_pair_targets(args, backbone, image_size, device, out_dir, ctx))
    results.update(run_benchmarks(args, backbone, image_size, device, ctx.group, out_dir))
    if ctx.is_main:
        write_results(out_dir / "eval.json", results)
        print(f"results: {out_dir / 'eval.json'}")
    return 0


def _pair_targets(args, backbone, image_size, device, out_dir, ctx) -> dict:
    """``--target`` pair sets, their images embedded over all ranks."""
    from dist_cosface.eval.pairs_dist import run_evaluation_all_ranks

    settings = {
        "targets": args.target,
        "batch_size": args.batch_size,
        "flip": not args.no_flip,
        "roc_png": not args.no_roc,
    }
    if args.far:
        settings["fars"] = args.far
    cfg = from_mapping(EvalConfig, settings, "eval")
    results = run_evaluation_all_ranks(backbone, cfg, device, image_size, out_dir, ctx.group)
    for name, r in results.items() if ctx.is_main else ():
        tars = ", ".join(f"TAR@FAR={far:g}: {tar:.4f}" for far, tar in r["tar_at_far"].items())
        print(
            f"{name}: accuracy {r['accuracy']:.4f} +- {r['accuracy_std']:.4f}, {tars}, "
            f"AUC {r['roc_auc']:.4f} ({r['num_pairs']} pairs)"
        )
    return results
