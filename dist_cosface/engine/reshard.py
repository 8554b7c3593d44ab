"""Offline merge / split of a checkpoint's classifier shards.

``merge_classifier`` joins every rank's rows (and row-aligned optimizer state) into one full
``[num_classes, D]`` payload; ``split_classifier`` cuts a full payload for a new world size
with the classifier's own layout; ``reshard_checkpoint`` writes a copy of a checkpoint laid out
for N ranks. Training does not need this (resume re-shards on the fly); it is for inspecting
the full matrix, or preparing a checkpoint for a different cluster ahead of time.

Per-rank RNG and data-loader positions cannot be mapped to another world size, so a resharded
checkpoint carries none: the resumed run restarts its current epoch. DeepSpeed checkpoints
with ZeRO stage >= 1 keep optimizer partitions per rank and are not resharded by this tool.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch

from dist_cosface.engine.checkpoint import (
    FORMAT_VERSION,
    find_latest_checkpoint,
    load_classifier_rows,
    read_meta,
)
from dist_cosface.engine.ckpt_files import merge_records
from dist_cosface.engine.rows import slice_payload


def _checkpoint(path: str | Path) -> Path:
    ckpt = find_latest_checkpoint(path)
    if ckpt is None:
        raise ValueError(f"no complete checkpoint at {path}")
    return ckpt


def merge_classifier(checkpoint: str | Path) -> dict:
    """``{"weight": [C, D], "optim": state_dict with [C, ...] row state, "num_classes": C}``."""
    ckpt = _checkpoint(checkpoint)
    meta = read_meta(ckpt)
    num_classes = sum(n for _, n in meta["class_layout"])
    full = load_classifier_rows(ckpt, meta, 0, num_classes)
    return dict(full, num_classes=num_classes)


def split_classifier(full: dict, world_size: int) -> list[dict]:
    """Shard files' contents for ``world_size`` ranks from a merged payload."""
    from dist_cosface.classifier import class_range

    num_classes = full["weight"].shape[0]
    if not 1 <= world_size <= num_classes:
        raise ValueError(f"world_size must be in [1, {num_classes}], got {world_size}")
    shards = []
    for rank in range(world_size):
        start, count = class_range(num_classes, world_size, rank)
        part = slice_payload(full, start, start + count)
        part.update(
            class_start=start, num_local=count, num_classes=num_classes, world_size=world_size
        )
        shards.append(part)
    return shards


def reshard_checkpoint(checkpoint: str | Path, out_dir: str | Path, world_size: int) -> Path:
    """Copy ``checkpoint`` to ``out_dir`` with its classifier laid out for ``world_size``."""
    src = _checkpoint(checkpoint)
    out = Path(out_dir)
    if out.exists():
        raise ValueError(f"output folder already exists: {out}")
    meta = read_meta(src)
    if (src / "deepspeed").is_dir() and meta["world_size"] != world_size:
        raise ValueError(f"{src}: DeepSpeed checkpoints cannot be resharded to another size")
    shards = split_classifier(merge_classifier(src), world_size)
    tmp = out.with_name(out.name + ".tmp-write")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(
        src, tmp, ignore=shutil.ignore_patterns("classifier_rank*", "trainer_rank*", "meta.json")
    )
    for rank, shard in enumerate(shards):
        torch.save(shard, tmp / f"classifier_rank{rank}.pt")
    meta.update(
        world_size=world_size,
        class_layout=[[s["class_start"], s["num_local"]] for s in shards],
        format_version=FORMAT_VERSION,
        files=merge_records(tmp, 0),  # the copy's own files, recorded afresh
    )
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))  # last: marks complete
    tmp.rename(out)
    return out


def add_reshard_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="checkpoint folder (step_N) or a run folder")
    parser.add_argument("--world-size", type=int, help="write a copy laid out for N ranks")
    parser.add_argument("--out", help="output checkpoint folder (with --world-size)")
    parser.add_argument("--merged", help="also write the full classifier matrix to this .pt file")


def run_reshard_command(args: argparse.Namespace) -> int:
    if args.world_size is None and args.merged is None:
        raise ValueError("reshard: give --world-size N --out DIR and/or --merged FILE")
    if args.merged:
        torch.save(merge_classifier(args.checkpoint), args.merged)
        print(f"wrote the merged classifier to {args.merged}")
    if args.world_size is not None:
        if not args.out:
            raise ValueError("reshard: --world-size needs --out DIR")
        out = reshard_checkpoint(args.checkpoint, args.out, args.world_size)
        print(f"wrote {out} for {args.world_size} ranks")
    return 0
