"""``dist-cosface eval``: pair verification and the distributed benchmarks (MegaFace-style,
IJB, YTF) of a trained backbone; the caller supplies how to load it.

``load_backbone(checkpoint_or_run_dir) -> (backbone, image_size)`` comes from the engine so
that this package does not depend on the checkpoint format. Every rank runs the command:
images are split over ranks for embedding, results are identical on every rank, and rank 0
writes them into ``eval.json`` (beside the checkpoint unless ``--out-dir`` says otherwise).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.distributed as dist

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
from dist_cosface.distributed import init_distributed, shutdown
from dist_cosface.eval.config import EvalConfig
from dist_cosface.eval.ijb import run_ijb
from dist_cosface.eval.megaface import run_megaface
from dist_cosface.eval.pair_verification import run_evaluation_all_ranks
from dist_cosface.eval.results import write_results
from dist_cosface.eval.ytf import run_ytf


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", type=existing_path, help="checkpoint folder or run directory")
    parser.add_argument(
        "--target",
        action="append",
        default=[],
        type=existing_path,
        help=".bin file, pairs file, or folder with pairs.txt (repeatable)",
    )
    _add_benchmark_arguments(parser)
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


def _add_benchmark_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--megaface",
        nargs=2,
        type=existing_path,
        metavar=("PROBES", "DISTRACTORS"),
        help="identity-folder probe set and distractors (flat folder, file list or shard set)",
    )
    parser.add_argument(
        "--distractor-counts",
        type=int_in(1),
        nargs="+",
        help="distractor set sizes (default: those of 10, 100, ..., 1M that fit)",
    )
    parser.add_argument(
        "--ijb",
        nargs=2,
        metavar=("ROOT", "NAME"),
        help="IJB-B/C folder (meta/, loose_crop/) and set name, e.g. ijbc",
    )
    parser.add_argument(
        "--detector-score", action="store_true", help="IJB: weight images by detector score"
    )
    parser.add_argument(
        "--ytf",
        nargs=2,
        type=existing_path,
        metavar=("PAIRS", "FRAMES"),
        help="video pair list and frames root",
    )
    parser.add_argument(
        "--max-frames", type=int_in(1), default=100, help="YTF: frames per video (>= 1)"
    )
    parser.add_argument(
        "--chunk-size", type=int_in(1), default=65536, help="distractor rows scored at once"
    )


def run_eval_command(args: argparse.Namespace, load_backbone: LoadBackbone) -> int:
    """Pair verification, then the benchmarks, on all ranks (one process without torchrun)."""
    if not (args.target or args.megaface or args.ijb or args.ytf):
        raise UsageError("nothing to evaluate: give --target, --megaface, --ijb or --ytf")
    if args.ijb and not Path(args.ijb[0]).is_dir():
        raise UsageError(f"--ijb {args.ijb[0]}: not a folder (one holding meta/ and loose_crop/)")
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
    results.update(_run_benchmarks(args, backbone, image_size, device, ctx.group, out_dir))
    if ctx.is_main:
        write_results(out_dir / "eval.json", results)
        print(f"results: {out_dir / 'eval.json'}")
    return 0


def _pair_targets(args, backbone, image_size, device, out_dir, ctx) -> dict:
    """``--target`` pair sets, their images embedded over all ranks."""
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
        print(
            f"{name}: accuracy {r['accuracy']:.4f} +- {r['accuracy_std']:.4f}, {_tars(r)}, "
            f"AUC {r['roc_auc']:.4f} ({r['num_pairs']} pairs)"
        )
    return results


def _run_benchmarks(
    args: argparse.Namespace,
    backbone: torch.nn.Module,
    image_size: int,
    device: torch.device,
    group: dist.ProcessGroup | None,
    out_dir: Path,
) -> dict:
    """Every benchmark named in ``args``; prints one summary line each (rank 0)."""
    main = group is None or dist.get_rank(group) == 0
    common = {"batch_size": args.batch_size, "flip": not args.no_flip}
    results = {}
    if args.megaface:
        probes, distractors = args.megaface
        r = run_megaface(
            backbone,
            probes,
            distractors,
            image_size,
            device,
            group,
            counts=args.distractor_counts,
            chunk_size=args.chunk_size,
            **common,
        )
        results["megaface"] = r
        for n, m in r["by_count"].items():
            _say(main, f"megaface {n} distractors: rank-1 {m['rank1']:.4f}, " + _tars(m))
    if args.ijb:
        root, name = args.ijb
        roc = None if args.no_roc else out_dir / f"roc_{name}.png"
        r = run_ijb(
            backbone,
            root,
            name,
            image_size,
            device,
            group,
            detector_score=args.detector_score,
            roc_path=roc,
            **common,
        )
        results[name] = r
        _say(main, f"{name} 1:1: " + _tars(r["verification"]))
        for g, m in r.get("identification", {}).items():
            tpir = ", ".join(f"TPIR@FPIR={f:g}: {v:.4f}" for f, v in m["tpir_at_fpir"].items())
            cmc = ", ".join(f"rank-{k}: {v:.4f}" for k, v in m["cmc"].items())
            _say(main, f"{name} 1:N {g}: {cmc}, {tpir}")
    if args.ytf:
        pairs, frames = args.ytf
        r = run_ytf(
            backbone, pairs, frames, image_size, device, group, max_frames=args.max_frames, **common
        )
        results["ytf"] = r
        _say(main, f"ytf: accuracy {r['accuracy']:.4f} +- {r['accuracy_std']:.4f}")
    return results


def _tars(metrics: dict) -> str:
    return ", ".join(f"TAR@FAR={f:g}: {t:.4f}" for f, t in metrics["tar_at_far"].items())


def _say(main: bool, line: str) -> None:
    if main:
        print(line)  # user-facing CLI output
