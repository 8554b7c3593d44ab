"""Atomic, sharded training checkpoints and resume (also onto a different number of ranks).

Layout of ``<output_dir>/checkpoints/step_<N>/``::

    meta.json               step, epoch, world size, class layout, model config; written LAST,
                            so its presence marks the checkpoint complete
    backbone.pt             backbone state_dict (rank 0; replicated across ranks)
    backbone_optim.pt       backbone optimizer state (rank 0; ddp engine)
    deepspeed/              DeepSpeed engine checkpoint (deepspeed engine)
    classifier_rank<r>.pt   weight shard + row-aligned optimizer state + its class range
    trainer_rank<r>.pt      RNG states and the data loader position of rank r

Everything is written into ``step_<N>.tmp-write`` first; every rank fsyncs its files and
records their sizes and CRC32s; after a barrier rank 0 writes meta.json (with all the records
under ``files``), fsyncs the folder and renames it, so a job killed mid-write never leaves a
folder that looks complete, and resume verifies the files against the records
(``ckpt_files.select_verified``). Every file loads with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from dist_cosface.configtools import from_mapping
from dist_cosface.distributed import DistContext
from dist_cosface.engine.ckpt_files import (
    fsync_dir,
    merge_records,
    select_verified,
    write_rank_records,
)
from dist_cosface.engine.rows import gather_rows

log = logging.getLogger(__name__)

FORMAT_VERSION = 2  # 2: meta.json records every file's size and CRC32
_READABLE_VERSIONS = (1, 2)
_STEP_DIR = re.compile(r"^step_(\d+)$")


def _barrier(ctx: DistContext) -> None:
    if ctx.is_distributed:
        dist.barrier(group=ctx.group)


def _load(path: Path) -> dict:
    if not path.is_file():
        raise ValueError(f"checkpoint file missing: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (OSError, RuntimeError) as exc:  # a damaged file: name it
        raise ValueError(f"checkpoint file {path} cannot be read: {exc}") from exc


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under ``root`` (a checkpoints folder), oldest first."""
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _STEP_DIR.match(child.name)
        if match and (child / "meta.json").is_file():
            found.append((int(match.group(1)), child))
    return [path for _, path in sorted(found)]


def find_latest_checkpoint(path: str | Path) -> Path | None:
    """Latest complete checkpoint in a run folder, a checkpoints folder, or the folder itself."""
    path = Path(path)
    if (path / "meta.json").is_file():
        return path
    for root in (path / "checkpoints", path):
        found = complete_checkpoints(root)
        if found:
            return found[-1]
    return None


def read_meta(ckpt: Path) -> dict:
    meta_path = Path(ckpt) / "meta.json"
    if not meta_path.is_file():
        raise ValueError(f"{ckpt} is not a complete checkpoint (no meta.json)")
    try:
        meta = json.loads(meta_path.read_text())
    except ValueError as exc:
        raise ValueError(f"{meta_path}: not valid JSON ({exc})") from exc
    if meta.get("format_version") not in _READABLE_VERSIONS:
        raise ValueError(f"{meta_path}: unsupported format_version {meta.get('format_version')}")
    return meta


def resolve_checkpoint(path: str | Path, ctx: DistContext, only=None) -> Path | None:
    """The checkpoint to resume from ``path`` after verifying its files on all ranks.

    ``path`` is a checkpoint folder (it must be intact), or a run / checkpoints folder: the
    newest intact checkpoint there, skipping damaged ones with a warning. None: nothing there.
    ``only``: the files that must be intact (default: all).
    """
    path = Path(path)
    if (path / "meta.json").is_file():
        return select_verified([path], ctx, read_meta, strict=True, only=only)
    root = path / "checkpoints" if complete_checkpoints(path / "checkpoints") else path
    return select_verified(complete_checkpoints(root), ctx, read_meta, strict=False, only=only)


def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": int(np_state[2]),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    keys = state["numpy_keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, state["numpy_pos"], 0, 0.0))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _class_layout(head, ctx: DistContext) -> list[list[int]]:
    mine = torch.tensor(
        [head.class_start, head.num_local_classes], dtype=torch.int64, device=ctx.device
    )
    if not ctx.is_distributed:
        return [mine.tolist()]
    gathered = [torch.zeros_like(mine) for _ in range(ctx.world_size)]
    dist.all_gather(gathered, mine, group=ctx.group)
    return [t.tolist() for t in gathered]


def save_checkpoint(
    root: Path,
    step: int,
    ctx: DistContext,
    *,
    backbone: torch.nn.Module,
    backbone_optim: torch.optim.Optimizer | None,
    head,
    head_optim: torch.optim.Optimizer,
    loader_state: dict,
    meta: dict,
    keep_last: int,
    ds_engine=None,
) -> Path:
    """Write ``root/step_<step>`` collectively (every rank calls this) and prune old ones."""
    final = root / f"step_{step}"
    tmp = root / f"step_{step}.tmp-write"
    layout = _class_layout(head, ctx)
    if ctx.is_main:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # left over by a killed run
        tmp.mkdir()
    _barrier(ctx)
    torch.save(
        {
            "weight": head.weight.detach().cpu(),
            "optim": head_optim.state_dict(),
            "class_start": head.class_start,
            "num_local": head.num_local_classes,
            "num_classes": head.num_classes if hasattr(head, "num_classes") else None,
            "world_size": ctx.world_size,
        },
        tmp / f"classifier_rank{ctx.rank}.pt",
    )
    torch.save({"rng": rng_state(), "loader": loader_state}, tmp / f"trainer_rank{ctx.rank}.pt")
    mine = [f"classifier_rank{ctx.rank}.pt", f"trainer_rank{ctx.rank}.pt"]
    if ds_engine is not None:
        ds_engine.save_checkpoint(str(tmp / "deepspeed"), tag="state")
    if ctx.is_main:
        torch.save(backbone.state_dict(), tmp / "backbone.pt")
        mine.append("backbone.pt")
        if backbone_optim is not None:
            torch.save(backbone_optim.state_dict(), tmp / "backbone_optim.pt")
            mine.append("backbone_optim.pt")
    write_rank_records(tmp, ctx.rank, mine)  # each rank fsyncs and checksums its own files
    _barrier(ctx)
    if ctx.is_main:
        full_meta = dict(
            meta,
            format_version=FORMAT_VERSION,
            step=step,
            world_size=ctx.world_size,
            class_layout=layout,
            complete=True,
            files=merge_records(tmp, ctx.world_size),
        )
        _publish(tmp, final, full_meta)
        for old in complete_checkpoints(root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        for stale in root.glob("step_*.tmp-write"):  # left by a run killed while writing
            shutil.rmtree(stale, ignore_errors=True)
    _barrier(ctx)
    return final


def _publish(tmp: Path, final: Path, meta: dict) -> None:
    """meta.json last, everything on disk, then the atomic rename (and its directory entry)."""
    meta_path = tmp / "meta.json"
    with open(meta_path, "w") as handle:
        handle.write(json.dumps(meta, indent=1))
        handle.flush()
        os.fsync(handle.fileno())
    fsync_dir(tmp)
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    fsync_dir(final.parent)


def load_classifier_rows(ckpt: Path, meta: dict, start: int, count: int) -> dict:
    """Weight rows and row-aligned optimizer state for classes ``[start, start + count)``."""
    shards = [
        (s, n, (lambda r=r: _load(ckpt / f"classifier_rank{r}.pt")))
        for r, (s, n) in enumerate(meta["class_layout"])
    ]
    return gather_rows(shards, start, count)


def load_checkpoint(
    ckpt: Path,
    ctx: DistContext,
    *,
    backbone: torch.nn.Module,
    backbone_optim: torch.optim.Optimizer | None,
    head,
    head_optim: torch.optim.Optimizer,
    ds_engine=None,
) -> dict:
    """Restore model/optimizer state in place; returns meta plus this rank's trainer state.

    On a different world size the classifier rows are re-sharded; RNG and data position are
    per-rank and cannot carry over, so ``trainer`` is None and the caller restarts the epoch.
    """
    ckpt = Path(ckpt)
    meta = read_meta(ckpt)
    total = sum(n for _, n in meta["class_layout"])
    num_classes = getattr(head, "num_classes", total)
    if total != num_classes:
        raise ValueError(f"{ckpt}: checkpoint has {total} classes, the run has {num_classes}")
    if ds_engine is not None:
        ds_engine.load_checkpoint(str(ckpt / "deepspeed"), tag="state")
    else:
        backbone.load_state_dict(_load(ckpt / "backbone.pt"))
        if backbone_optim is not None and (ckpt / "backbone_optim.pt").is_file():
            backbone_optim.load_state_dict(_load(ckpt / "backbone_optim.pt"))
    rows = load_classifier_rows(ckpt, meta, head.class_start, head.num_local_classes)
    with torch.no_grad():
        head.weight.copy_(rows["weight"])
    head_optim.load_state_dict(rows["optim"])
    trainer = None
    trainer_file = ckpt / f"trainer_rank{ctx.rank}.pt"
    if meta["world_size"] == ctx.world_size and trainer_file.is_file():
        trainer = torch.load(trainer_file, map_location="cpu", weights_only=True)
    else:
        log.warning(
            "resuming %s (saved by %d ranks) on %d ranks: classifier re-sharded; data "
            "position and RNG restart at epoch %s",
            ckpt,
            meta["world_size"],
            ctx.world_size,
            meta.get("epoch"),
        )
    return {"meta": meta, "trainer": trainer}


def load_backbone(checkpoint_or_run_dir: str | Path) -> tuple[torch.nn.Module, int]:
    """(backbone in eval mode on CPU, input image size) from a checkpoint or a run folder.

    A run folder resolves to its latest complete checkpoint. The model config is read from
    the checkpoint's meta.json, so no run config is needed.
    """
    from dist_cosface.models import build_backbone
    from dist_cosface.models.config import ModelConfig

    # verified in this one process; the classifier shards (maybe GBs) are not needed here
    ckpt = resolve_checkpoint(checkpoint_or_run_dir, DistContext(), only={"backbone.pt"})
    if ckpt is None:
        raise ValueError(f"no complete checkpoint found at {checkpoint_or_run_dir}")
    meta = read_meta(ckpt)
    backbone = build_backbone(from_mapping(ModelConfig, meta["model"], "meta.model"))
    state = torch.load(ckpt / "backbone.pt", map_location="cpu", weights_only=True)
    backbone.load_state_dict(state)
    return backbone.eval(), int(meta["image_size"])
