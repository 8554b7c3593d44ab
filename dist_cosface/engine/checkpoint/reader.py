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
from dist_cosface.distributed import GroupMember
from dist_cosface.engine.checkpoint.contract import BACKBONE, CLASSIFIER, INDEX_FILE, MODEL
from dist_cosface.engine.checkpoint.files import read_meta
from dist_cosface.engine.checkpoint.manager import (
    find_latest_checkpoint,
    resolve_checkpoint,
    run_dcp,
    safe_reader,
)
from dist_cosface.engine.checkpoint.safe import JSON_KEY, SafeLoadPlanner, from_blob
from dist_cosface.models import build_backbone
from dist_cosface.models.config import ModelConfig


def read_tree(ckpt: Path, prefix: str) -> dict[str, Any]:
    """``{key: value}`` of every entry under ``prefix`` (dotted keys), tensors at full size.

    Non-tensor values (format 4 keeps them as JSON) come out under their own dotted keys.
    Verifies ``.metadata`` and the files holding those entries first.
    """
    ckpt = Path(ckpt)
    return _read_verified(ckpt, prefix, strict=True)[1]


def _read_verified(path: str | Path, prefix: str, strict=False) -> tuple[Path, dict[str, Any]]:
    """(checkpoint, its entries under ``prefix``) of a checkpoint or a run folder's latest.

    Order matters: meta.json (JSON) names the files and their CRC32s; ``.metadata`` is
    verified, then unpickled through the allow-list; then only the files that hold the wanted
    entries are verified and read (``safe``).
    """
    latest = Path(path) if strict else find_latest_checkpoint(path)
    if latest is None:
        raise ValueError(f"no complete checkpoint found at {path}")
    meta = read_meta(latest)
    resolve_checkpoint(latest, GroupMember(), only={INDEX_FILE})
    reader = safe_reader(latest, meta)
    metadata = reader.read_metadata()
    wanted = [k for k in metadata.state_dict_metadata if _wanted(k, prefix)]
    holding = {
        info.relative_path for index, info in metadata.storage_data.items() if index.fqn in wanted
    }
    ckpt = resolve_checkpoint(latest, GroupMember(), only={INDEX_FILE} | holding)
    return ckpt, _load_entries(ckpt, reader, wanted, prefix)


def _wanted(key: str, prefix: str) -> bool:
    """Entries under ``prefix``, and the JSON of sections that may hold some (its keys are
    known once decoded)."""
    if key.endswith(f".{JSON_KEY}"):
        section = key.removesuffix(f".{JSON_KEY}")
        return section.startswith(prefix) or prefix.startswith(f"{section}.")
    return key.startswith(prefix)


def _load_entries(ckpt: Path, reader, wanted: list[str], prefix: str) -> dict[str, Any]:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    stored = reader.read_metadata().state_dict_metadata
    tree: dict[str, Any] = {}
    for key in wanted:
        item = stored[key]
        is_tensor = isinstance(item, TensorStorageMetadata)
        tree[key] = torch.empty(item.size, dtype=item.properties.dtype) if is_tensor else None
    if tree:
        run_dcp(dcp.load, tree, None, storage_reader=reader, planner=SafeLoadPlanner(ckpt))
    entries = {}
    for key, value in tree.items():
        if key.endswith(f".{JSON_KEY}"):
            section = key.removesuffix(f".{JSON_KEY}")
            entries.update(_flatten(from_blob(value, section), section))
        else:
            entries[key] = value
    entries = {k: v for k, v in entries.items() if k.startswith(prefix)}
    if not entries:
        raise ValueError(f"{ckpt}: no entries under {prefix!r}")
    return entries


def _flatten(value: Any, key: str) -> dict[str, Any]:
    if isinstance(value, dict) and value and all(isinstance(k, str) for k in value):
        return {k2: v2 for k, v in value.items() for k2, v2 in _flatten(v, f"{key}.{k}").items()}
    return {key: value}


def load_backbone(checkpoint_or_run_dir: str | Path) -> tuple[torch.nn.Module, int]:
    """(backbone in eval mode on CPU, input image size) from a checkpoint or a run folder.

    A run folder resolves to its latest complete checkpoint; only the files holding the
    backbone are verified and read. The model config comes from meta.json.
    """
    prefix = f"{BACKBONE}.{MODEL}."
    ckpt, tree = _read_verified(checkpoint_or_run_dir, prefix)
    meta = read_meta(ckpt)
    backbone = build_backbone(from_mapping(ModelConfig, meta["model"], "meta.model"))
    backbone.load_state_dict({k.removeprefix(prefix): v for k, v in tree.items()})
    return backbone.eval(), int(meta["image_size"])


def merge_classifier(checkpoint: str | Path) -> dict:
    """``{"weight": [C, D] ([C, K, D] with K sub-centers), "optim": {name: [C, ...]},
    "num_classes": C}`` of a checkpoint."""
    _, tree = _read_verified(checkpoint, f"{CLASSIFIER}.")
    weight = tree[f"{CLASSIFIER}.weight"]  # ClassifierState's layout
    rows = f"{CLASSIFIER}.optim."
    optim = {k.removeprefix(rows): v for k, v in tree.items() if k.startswith(rows)}
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
