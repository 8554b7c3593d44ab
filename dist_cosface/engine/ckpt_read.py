"""Reading a checkpoint in one process: the backbone (eval, export) or the full classifier.

Training never needs this (``Checkpointer.restore`` reads in the run's own layout); it is for
tools that want global tensors: ``read_tree`` loads any part of a checkpoint at full size,
whatever the number of ranks that wrote it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

from dist_cosface.configtools import from_mapping
from dist_cosface.distributed import DistContext
from dist_cosface.engine.checkpoint import read_meta, resolve_checkpoint, run_dcp


def _metadata(ckpt: Path):
    import torch.distributed.checkpoint as dcp

    try:
        return dcp.FileSystemReader(str(ckpt)).read_metadata()
    except Exception as exc:  # unpickling a damaged index raises many types
        raise ValueError(f"{ckpt / '.metadata'} cannot be read: {exc}") from exc


def read_tree(ckpt: Path, prefix: str) -> dict[str, Any]:
    """``{key: value}`` of every entry under ``prefix`` (dotted keys), tensors at full size."""
    return _load_entries(ckpt, _metadata(ckpt), prefix)


def _load_entries(ckpt: Path, metadata, prefix: str) -> dict[str, Any]:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    tree: dict[str, Any] = {}
    for key, item in metadata.state_dict_metadata.items():
        if key.startswith(prefix):
            is_tensor = isinstance(item, TensorStorageMetadata)
            tree[key] = torch.empty(item.size, dtype=item.properties.dtype) if is_tensor else None
    if not tree:
        raise ValueError(f"{ckpt}: no entries under {prefix!r}")
    run_dcp(dcp.load, tree, None, storage_reader=dcp.FileSystemReader(str(ckpt)))
    return tree


def _read_verified(path: str | Path, prefix: str) -> tuple[Path, dict[str, Any]]:
    """(checkpoint, its entries under ``prefix``) of a checkpoint or a run folder's latest,
    after verifying only the files that DCP's index says hold those entries."""
    from dist_cosface.engine.checkpoint import find_latest_checkpoint

    latest = find_latest_checkpoint(path)
    if latest is None:
        raise ValueError(f"no complete checkpoint found at {path}")
    metadata = _metadata(latest)
    holding = {
        info.relative_path
        for index, info in metadata.storage_data.items()
        if index.fqn.startswith(prefix)
    }
    ckpt = resolve_checkpoint(latest, DistContext(), only={".metadata"} | holding)
    return ckpt, _load_entries(ckpt, metadata, prefix)


def load_backbone(checkpoint_or_run_dir: str | Path) -> tuple[torch.nn.Module, int]:
    """(backbone in eval mode on CPU, input image size) from a checkpoint or a run folder.

    A run folder resolves to its latest complete checkpoint; only the files holding the
    backbone are verified and read. The model config comes from meta.json.
    """
    from dist_cosface.models import build_backbone
    from dist_cosface.models.config import ModelConfig

    prefix = "backbone.model."
    ckpt, tree = _read_verified(checkpoint_or_run_dir, prefix)
    meta = read_meta(ckpt)
    backbone = build_backbone(from_mapping(ModelConfig, meta["model"], "meta.model"))
    backbone.load_state_dict({k.removeprefix(prefix): v for k, v in tree.items()})
    return backbone.eval(), int(meta["image_size"])


def merge_classifier(checkpoint: str | Path) -> dict:
    """``{"weight": [C, D], "optim": {name: [C, ...]}, "num_classes": C}`` of a checkpoint."""
    _, tree = _read_verified(checkpoint, "classifier.")
    weight = tree["classifier.weight"]
    optim = {k.removeprefix("classifier.optim."): v for k, v in tree.items() if ".optim." in k}
    return {"weight": weight, "optim": optim, "num_classes": weight.shape[0]}


def add_merge_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="checkpoint folder (step_N) or a run folder")
    parser.add_argument("out", help=".pt file for the full classifier rows and their state")


def run_merge_command(args: argparse.Namespace) -> int:
    try:
        merged = merge_classifier(args.checkpoint)
    except ValueError as exc:
        print(f"dist-cosface merge-classifier: {exc}", file=sys.stderr)
        return 2
    torch.save(merged, args.out)
    print(f"wrote the merged classifier to {args.out}")
    return 0


def read_value(ckpt: Path, key: str) -> Any:
    """One entry of a checkpoint by its dotted key (``classifier.weight``, ``scaler.scale``)."""
    tree = read_tree(ckpt, key)
    if key not in tree:
        raise ValueError(f"{ckpt}: no entry {key!r} (found {sorted(tree)[:5]})")
    return tree[key]
