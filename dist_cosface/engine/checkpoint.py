"""Atomic, sharded checkpoints through torch.distributed.checkpoint (DCP), sync or async.

Layout of ``<output_dir>/checkpoints/step_<N>/``::

    __<r>_0.distcp   rank r's part of the state tree (``train_state.TrainState``): its
                     classifier rows and their optimizer state, its share of the replicated
                     backbone (DCP writes each replicated tensor once), its RNG and data position
    .metadata        DCP's index: global shapes and which file holds which chunk
    deepspeed/       DeepSpeed's own engine checkpoint (``train.engine: deepspeed``)
    meta.json        step, epoch, world size, class layout, model config, and the size and
                     CRC32 of every other file; written LAST: its presence marks completeness

Saving: every rank takes a host snapshot of its state (the only part that blocks training when
``checkpoint.async_save`` is on), then writes its own file in parallel, into
``step_<N>.tmp-write``; the writers record sizes and CRC32s of their files, and after they all
finished rank 0 writes meta.json, fsyncs and renames the folder. A job killed at any point
leaves no folder that resume would take for complete. An asynchronous save runs the writing in
a background thread that coordinates on its own gloo group (``build_checkpoint_group``), one
save in flight at a time.

Loading: DCP reads into the current layout: on another world size each rank reads just the rows
its ``class_range`` now owns (the rows are DTensor ``Shard(0)``). RNG and data positions are per
rank and are restored only on the same world size.

DCP stores non-tensor values (loader positions, Python RNG state) pickled: resume only
checkpoints you trust, as with any pickle.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import threading
import time
import warnings
from concurrent.futures import Future
from pathlib import Path

import torch.distributed as dist

from dist_cosface.distributed import DistContext, build_checkpoint_group
from dist_cosface.engine.ckpt_files import (
    fsync_dir,
    merge_records,
    select_verified,
    write_rank_records,
)
from dist_cosface.engine.train_state import TrainState

log = logging.getLogger(__name__)

FORMAT_VERSION = 3  # 3: torch.distributed.checkpoint files
_READABLE_VERSIONS = (3,)
_STEP_DIR = re.compile(r"^step_(\d+)$")


def _barrier(ctx: DistContext) -> None:
    if ctx.is_distributed:
        dist.barrier(group=ctx.group)


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


class Checkpointer:
    """Saves and restores a run's checkpoints; every rank builds one at the same point.

    ``save`` returns once this rank's snapshot is taken (``async_save``) or written; ``wait``
    finishes the save in flight (re-raising its error) and returns the published folder.
    """

    def __init__(self, root: Path, ctx: DistContext, *, keep_last: int, async_save: bool):
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {keep_last}")
        self.root, self.ctx = Path(root), ctx
        self.keep_last, self.async_save = keep_last, async_save
        self.group = build_checkpoint_group(ctx)
        self.mesh = None
        if self.group is not None:
            from torch.distributed.device_mesh import DeviceMesh

            self.mesh = DeviceMesh.from_group(self.group, "cpu")
        self._pending: Future | None = None

    def save(self, step: int, state: TrainState, meta: dict) -> float:
        """Checkpoint ``state`` as ``step_<step>``; returns the seconds the caller was blocked."""
        t0 = time.perf_counter()
        self.wait()  # one save in flight: its folder is published before the next starts
        final, tmp = self.root / f"step_{step}", self.root / f"step_{step}.tmp-write"
        if self.ctx.is_main:
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)  # left over by a killed run
            tmp.mkdir()
        _barrier(self.ctx)
        if state.native is not None:
            state.native.save(tmp)  # collective on the training group: stays on this thread
        tree = state.snapshot()
        full_meta = dict(meta, format_version=FORMAT_VERSION, step=step, complete=True)
        full_meta["world_size"] = self.ctx.world_size
        if self.async_save:
            self._pending = _in_background(lambda: self._write(tmp, final, tree, full_meta))
        else:
            self._write(tmp, final, tree, full_meta)
        return time.perf_counter() - t0

    def wait(self) -> Path | None:
        """Finish the save in flight, if any; its folder, or None when none was pending."""
        pending, self._pending = self._pending, None
        return pending.result() if pending is not None else None

    def restore(self, ckpt: Path, state: TrainState) -> tuple[dict, dict | None]:
        """Load ``ckpt`` into ``state``; returns (meta, this rank's loader position or None)."""
        import torch.distributed.checkpoint as dcp

        meta = read_meta(ckpt)
        _check_classes(ckpt, meta, state)  # before anything is loaded
        same_world = meta["world_size"] == self.ctx.world_size
        if state.native is not None:
            state.native.load(ckpt, meta["world_size"])
        tree = state.template(same_world)
        run_dcp(dcp.load, tree, self.group, storage_reader=dcp.FileSystemReader(str(ckpt)))
        position = state.restore(tree, skip_backbone=state.native is not None)
        if not same_world:
            log.warning(
                "resuming %s (saved by %d ranks) on %d ranks: classifier re-sharded; data "
                "position and RNG restart at epoch %s",
                ckpt,
                meta["world_size"],
                self.ctx.world_size,
                meta.get("epoch"),
            )
        return meta, position

    def _write(self, tmp: Path, final: Path, tree: dict, meta: dict) -> Path:
        import torch.distributed.checkpoint as dcp

        run_dcp(dcp.save, tree, self.group, storage_writer=dcp.FileSystemWriter(str(tmp)))
        rank = self.ctx.rank
        write_rank_records(tmp, rank, sorted(p.name for p in tmp.glob(f"__{rank}_*.distcp")))
        self._barrier()
        if self.ctx.is_main:
            meta["files"] = merge_records(tmp, self.ctx.world_size)  # + .metadata, deepspeed/
            _publish(tmp, final, meta)
            for old in complete_checkpoints(self.root)[: -self.keep_last]:
                shutil.rmtree(old, ignore_errors=True)
            for stale in self.root.glob("step_*.tmp-write"):  # left by a run killed mid-write
                shutil.rmtree(stale, ignore_errors=True)
        self._barrier()
        return final

    def _barrier(self) -> None:
        if self.group is not None:
            dist.barrier(group=self.group)


def run_dcp(fn, tree: dict, group, **kwargs):
    """``dcp.save`` / ``dcp.load`` on ``group``, or in this process alone when it is None."""
    if group is None:  # said on purpose: DCP's warning that it assumes so is noise here
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable")
    return fn(tree, process_group=group, no_dist=group is None, **kwargs)


def _in_background(job) -> Future:
    """Run ``job`` on a daemon thread (a dead peer must not keep this process from exiting)."""
    future: Future = Future()

    def run() -> None:
        try:
            future.set_result(job())
        except BaseException as exc:  # handed to whoever waits
            future.set_exception(exc)

    threading.Thread(target=run, name="checkpoint-writer", daemon=True).start()
    return future


def _check_classes(ckpt: Path, meta: dict, state: TrainState) -> None:
    head = state.classifier.head
    if meta.get("num_classes") != head.num_classes:
        raise ValueError(
            f"{ckpt}: checkpoint has {meta.get('num_classes')} classes, "
            f"the run has {head.num_classes}"
        )


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
