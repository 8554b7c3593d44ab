"""``dist-cosface eval`` options of the distributed benchmarks (MegaFace-style, IJB, YTF).

Every rank runs these: images are split over ranks for embedding, results are identical on
every rank, and rank 0 writes them into ``eval.json`` beside the checkpoint.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.distributed as dist

from dist_cosface.cliargs import existing_path, int_in


def add_benchmark_arguments(parser: argparse.ArgumentParser) -> None:
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


def run_benchmarks(
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
        from dist_cosface.eval.megaface import run_megaface

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
        from dist_cosface.eval.ijb import run_ijb

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
        from dist_cosface.eval.ytf import run_ytf

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


def write_results(path: Path, results: dict) -> None:
    """Atomic write of the JSON results (float/int keys become strings)."""
    from dist_cosface.data.shards import atomic_write_text

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(results, indent=2))
