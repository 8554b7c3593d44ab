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
``checkpoint.async_save`` is on); rank 0 checks that the disk has room for it; then every rank
writes its own file in parallel, into ``step_<N>.tmp-write``; the writers record sizes and
CRC32s of their files, and after they all finished rank 0 writes meta.json, fsyncs and renames
the folder (never over an existing one). A job killed at any point leaves no folder that
resume would take for complete. An asynchronous save runs the writing in a background thread
that coordinates on its own gloo group (``build_checkpoint_group``), one save in flight at a
time; :meth:`Checkpointer.close` joins that thread and destroys the group before the process
exits. A write that fails (a full disk) fails on every rank at once with one line naming the
folder (:class:`CheckpointWriteError`); an asynchronous failure is voted on at the next step.

Loading: DCP reads into the current layout: on another world size each rank reads just the rows
its ``class_range`` now owns (the rows are DTensor ``Shard(0)``). RNG and data positions are per
rank and are restored only on the same world size. Every file is verified before it is read,
and nothing in a checkpoint is unpickled beyond two allow-lists (``safe``).

One line of checkpoints per run folder: before training goes on from step S, checkpoints of
this run after S are refused or archived (``checkpoint.later_steps``, :meth:`Checkpointer.
keep_one_line`), so pruning and publishing never touch another line's checkpoints.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import threading
import time
import warnings
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

from dist_cosface.agreement import first_problem, gather_objects
from dist_cosface.distributed import DistContext, GroupMember, build_checkpoint_group
from dist_cosface.engine.checkpoint.contract import META_FILE
from dist_cosface.engine.checkpoint.files import (
    fsync_dir,
    merge_records,
    read_meta,
    select_verified,
    write_rank_records,
)
from dist_cosface.engine.checkpoint.safe import SafeLoadPlanner, SafeReader, fit_blobs
from dist_cosface.engine.checkpoint.train_state import TrainState
from dist_cosface.engine.config import CheckpointConfig

log = logging.getLogger(__name__)

FORMAT_VERSION = 4  # 4: non-tensor values as JSON (3: pickled by DCP; still read, safely)
_STEP_DIR = re.compile(r"^step_(\d+)$")
# DCP saves every tensor as its own small torch.save record: ~1.2 KB beyond the data (measured
# on torch 2.13), which dominates the size of small models' checkpoints
_BYTES_PER_ENTRY = 1280
_FULL_BELOW = 1 << 20  # bytes free after a failed write below which the disk counts as full


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (every rank raises it, with the same one line)."""


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under ``root`` (a checkpoints folder), oldest first."""
    return [path for path in _step_dirs(root) if (path / META_FILE).is_file()]


def _step_dirs(root: Path) -> list[Path]:
    """Every ``step_<N>`` folder under ``root``, complete or not, by step."""
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _STEP_DIR.match(child.name)
        if match and child.is_dir():
            found.append((int(match.group(1)), child))
    return [path for _, path in sorted(found)]


def _step_of(path: Path) -> int:
    return int(path.name.removeprefix("step_"))


def find_latest_checkpoint(path: str | Path) -> Path | None:
    """Latest complete checkpoint in a run folder, a checkpoints folder, or the folder itself."""
    path = Path(path)
    if (path / META_FILE).is_file():
        return path
    for root in (path / "checkpoints", path):
        found = complete_checkpoints(root)
        if found:
            return found[-1]
    return None


def safe_reader(ckpt: Path, meta: dict) -> SafeReader:
    """DCP's reader for ``ckpt`` with its index read through the allow-list (``safe``)."""
    return SafeReader(ckpt, meta["files"], allow_pickled=meta["format_version"] == 3)


def resolve_checkpoint(path: str | Path, member: GroupMember, only=None) -> Path | None:
    """The checkpoint to resume from ``path`` after verifying its files on all ranks of
    ``member``'s group (a ``DistContext``, or ``GroupMember()`` for one process).

    ``path`` is a checkpoint folder (it must be intact), or a run / checkpoints folder: the
    newest intact checkpoint there, skipping damaged ones with a warning. None: nothing there.
    ``only``: the files that must be intact (default: all).
    """
    path = Path(path)
    if (path / META_FILE).is_file():
        return select_verified([path], member, strict=True, only=only)
    root = path / "checkpoints" if complete_checkpoints(path / "checkpoints") else path
    return select_verified(complete_checkpoints(root), member, strict=False, only=only)


@dataclass(frozen=True)
class ResumePoint:
    """Where a run starts: the resumed checkpoint's step and epoch and this rank's data
    position (None on another world size), or step 0 of a fresh run (``source`` None)."""

    step: int = 0
    epoch: int = 0
    position: dict | None = None
    source: Path | None = None


class Checkpointer:
    """Saves and restores a run's checkpoints; every rank builds one at the same point.

    Built from the ``checkpoint`` config section (:meth:`from_config`). ``resume`` finds,
    verifies and loads the checkpoint to go on from; ``save`` returns once this rank's
    snapshot is taken (``async_save``) or written; ``wait`` finishes the save in flight
    (re-raising its error) and returns the published folder; ``failed`` says, without
    blocking, whether the save in flight has failed; ``close`` (every rank, on every path out
    of training) joins the writer thread and destroys the group.
    Every agreement between ranks runs on that gloo group: from the writer thread while a save
    is in flight, from the caller's thread otherwise (never both at once).
    """

    def __init__(
        self,
        cfg: CheckpointConfig,
        root: Path,
        ctx: DistContext,
        *,
        join_timeout_s: float = 600.0,
    ):
        self.cfg, self.root, self.ctx = cfg, Path(root), ctx
        self.join_timeout_s = join_timeout_s
        self.group = build_checkpoint_group(ctx)
        self.member = GroupMember.of(self.group)  # where the ranks agree (gloo)
        self.mesh = None
        if self.group is not None:
            self.mesh = DeviceMesh.from_group(self.group, "cpu")
        self._pending: Future | None = None
        self._writer: threading.Thread | None = None

    @classmethod
    def from_config(
        cls, cfg: CheckpointConfig, output_dir: str | Path, ctx: DistContext, *, timeout_s: float
    ) -> Checkpointer:
        """The checkpointer of the run in ``output_dir`` (checkpoints under ``checkpoints/``);
        ``timeout_s`` (``dist.timeout_s``): a writer still running after it waits on a dead
        peer, and the process exits without it."""
        return cls(cfg, Path(output_dir) / "checkpoints", ctx, join_timeout_s=timeout_s)

    # ---- saving ----------------------------------------------------------------------------

    def save(self, step: int, state: TrainState, meta: dict) -> float:
        """Checkpoint ``state`` as ``step_<step>``; returns the seconds the caller was blocked.

        Raises :class:`CheckpointWriteError` on every rank when it cannot start (no room on
        the disk, the folder exists) or, when synchronous, cannot be written.
        """
        t0 = time.perf_counter()
        self.wait()  # one save in flight: its folder is published before the next starts
        tree = state.snapshot()
        target = _Target(self.root, step, _estimate_bytes(tree, self.ctx.world_size))
        verdict = self._prepare(target) if self.ctx.is_main else None
        verdict = gather_objects(verdict, self.group)[0]  # rank 0's, on every rank (no writer runs)
        _raise_agreed(verdict["problem"])
        target.needed, target.free = verdict["needed"], verdict["free"]
        if state.native is not None:
            self._save_native(state, target)
        full_meta = dict(meta, format_version=FORMAT_VERSION, step=step, complete=True)
        full_meta["world_size"] = self.ctx.world_size
        if self.cfg.async_save:
            self._pending, self._writer = _in_background(self._write, target, tree, full_meta)
        else:
            self._write(target, tree, full_meta)
        return time.perf_counter() - t0

    def wait(self) -> Path | None:
        """Finish the save in flight, if any; its folder, or None when none was pending."""
        pending, self._pending = self._pending, None
        return pending.result() if pending is not None else None

    def failed(self) -> bool:
        """Whether the save in flight has finished with an error (does not block)."""
        pending = self._pending
        return pending is not None and pending.done() and pending.exception() is not None

    def close(self) -> None:
        """Join the writer thread, then destroy the checkpoint group; safe to call twice.

        Every rank calls it on every way out of training: a writer thread still running (or
        still freeing its snapshot) while the interpreter shuts down aborts the process.
        """
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.join(self.join_timeout_s)
            if writer.is_alive():  # a peer died mid-save: leave its group to the exit
                log.error(
                    "rank %d: the checkpoint writer is still running after %.0f s; exiting "
                    "without it (its step_*.tmp-write folder is cleaned up by the next save)",
                    self.ctx.rank,
                    self.join_timeout_s,
                )
                return
        self._pending = None
        if self.group is not None:
            dist.destroy_process_group(self.group)
            self.group, self.member, self.mesh = None, GroupMember(), None

    def _prepare(self, target: _Target) -> dict:
        """Rank 0, before anything is written: the folders, and room on the disk."""
        verdict = {"problem": None, "needed": target.needed, "free": 0}
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            for stale in self.root.glob("step_*.tmp-write"):  # left by a killed run
                shutil.rmtree(stale, ignore_errors=True)
            verdict["needed"] = target.needed = max(target.needed, self._latest_size())
            verdict["free"] = target.free = shutil.disk_usage(self.root).free
            if target.final.exists():
                verdict["problem"] = f"checkpoint {target.final} already exists; not replaced"
            else:
                verdict["problem"] = self._room_problem(target)
            if verdict["problem"] is None:
                target.tmp.mkdir()
        except OSError as exc:
            verdict["problem"] = target.failure(exc)
        return verdict

    def _room_problem(self, target: _Target) -> str | None:
        if target.free >= target.needed:
            return None
        return (
            f"checkpoint {target.final.name}: not enough space in {self.root}: needs about "
            f"{target.needed} bytes, {target.free} free; the previous checkpoints are kept "
            "(free space, lower checkpoint.keep_last, or move train.output_dir)"
        )

    def _latest_size(self) -> int:
        """Bytes of this run's newest checkpoint (the best guess for the next one), or 0."""
        latest = complete_checkpoints(self.root)
        try:
            files = read_meta(latest[-1])["files"] if latest else {}
            return sum(int(record["size"]) for record in files.values())
        except (OSError, ValueError, TypeError, KeyError):
            return 0

    def _save_native(self, state: TrainState, target: _Target) -> None:
        """The engine's own checkpoint (collective on the training group, on this thread)."""
        problem = None
        try:
            state.native.save(target.tmp)
        except Exception as exc:  # noqa: BLE001 - a full disk surfaces as several types
            problem = target.failure(exc)
        problem = first_problem(problem, self.group)
        if problem is not None:
            if self.ctx.is_main:
                shutil.rmtree(target.tmp, ignore_errors=True)
            raise CheckpointWriteError(problem)

    def _write(self, target: _Target, tree: dict, meta: dict) -> Path:
        """Every rank writes its part; rank 0 publishes. Outcomes are agreed on the group."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.api import CheckpointException

        problem, tmp = None, target.tmp
        try:
            run_dcp(dcp.save, tree, self.group, storage_writer=dcp.FileSystemWriter(str(tmp)))
            rank = self.ctx.rank
            write_rank_records(tmp, rank, sorted(p.name for p in tmp.glob(f"__{rank}_*.distcp")))
        except (Exception, CheckpointException) as exc:  # noqa: BLE001 - see _Target.failure
            problem = target.failure(exc)
        del tree  # this thread's reference to the snapshot
        problem = first_problem(problem, self.group)
        if problem is None and self.ctx.is_main:
            try:
                meta["files"] = merge_records(tmp, self.ctx.world_size)  # + .metadata, deepspeed/
                _publish(tmp, target.final, meta)
                self._prune(target.final)
            except OSError as exc:
                problem = target.failure(exc)
        problem = first_problem(problem, self.group)
        if problem is not None:
            if self.ctx.is_main:
                shutil.rmtree(tmp, ignore_errors=True)  # the space it took, back
            raise CheckpointWriteError(problem)
        return target.final

    def _prune(self, written: Path) -> None:
        """Keep ``written`` and the newest ``keep_last - 1`` checkpoints before it."""
        before = [c for c in complete_checkpoints(self.root) if _step_of(c) < _step_of(written)]
        for old in before[: max(len(before) - (self.cfg.keep_last - 1), 0)]:
            shutil.rmtree(old, ignore_errors=True)

    # ---- one line of checkpoints -----------------------------------------------------------

    def keep_one_line(self, start: int, resumed: Path | None, damaged: bool = False) -> list[Path]:
        """Before training goes on from ``start``: this run's checkpoints after it.

        They belong to another line of training, which the new checkpoints would mix with
        (and pruning by step would delete the new ones). ``checkpoint.later_steps`` "refuse"
        raises (every rank) naming them; "archive" moves them into ``superseded-<start>/``
        (returned).
        ``damaged``: they are known to be damaged (``resume: auto`` took the newest intact
        checkpoint before them): always archived. Every rank calls this at the same point.
        """
        problem, moved = None, []
        if self.ctx.is_main:
            later = [
                p
                for p in _step_dirs(self.root)
                if _step_of(p) >= start and (resumed is None or p.resolve() != resumed.resolve())
            ]
            if later and (damaged or self.cfg.later_steps == "archive"):
                moved = self._archive(later, start)
            elif later:
                names = ", ".join(p.name for p in later)
                what = f"resumes from step {start}" if resumed else "starts at step 0"
                problem = (
                    f"{self.root} holds checkpoints from step {start} on ({names}) while this "
                    f"run {what}; training on would mix two lines of checkpoints. Set "
                    f"checkpoint.later_steps=archive to move them into "
                    f"{self.root / f'superseded-{start}'} first, or use another "
                    "train.output_dir"
                )
        _raise_agreed(first_problem(problem, self.group), ValueError)
        return moved

    def _archive(self, later: list[Path], start: int) -> list[Path]:
        dest = self.root / f"superseded-{start}"
        n = 1
        while dest.exists():
            n += 1
            dest = self.root / f"superseded-{start}-{n}"
        dest.mkdir()
        moved = []
        for path in later:
            path.rename(dest / path.name)
            moved.append(dest / path.name)
        fsync_dir(dest)
        fsync_dir(self.root)
        log.warning(
            "moved %s (after step %d, the step this run goes on from) into %s; nothing deleted",
            ", ".join(p.name for p in later),
            start,
            dest,
        )
        return moved

    # ---- loading ---------------------------------------------------------------------------

    def resume(self, state: TrainState) -> ResumePoint:
        """Load the checkpoint ``checkpoint.resume`` names into ``state`` (all ranks agree).

        "auto": the newest intact checkpoint of this run, if any; "none": a fresh start; else
        that checkpoint (it must be intact). Checkpoints of this run after the step training
        goes on from are refused or archived first (``checkpoint.later_steps``): the run's
        checkpoints stay one line of training.
        """
        ckpt = self._checkpoint_to_resume()
        start = read_meta(ckpt)["step"] if ckpt is not None else 0
        # "auto" took the newest intact checkpoint: any later ones are damaged
        self.keep_one_line(start, ckpt, damaged=self.cfg.resume == "auto")
        if ckpt is None:
            return ResumePoint()
        meta, position = self.restore(ckpt, state)
        if self.ctx.is_main:
            log.info("resumed from %s at step %d", ckpt, meta["step"])
        return ResumePoint(meta["step"], meta["epoch"], position, ckpt)

    def _checkpoint_to_resume(self) -> Path | None:
        """The verified checkpoint to resume (all ranks agree), or None to start fresh."""
        resume = self.cfg.resume
        if resume == "none":
            return None
        if resume == "auto":
            return resolve_checkpoint(self.root, self.member)
        found = resolve_checkpoint(resume, self.member)
        if found is None:
            raise ValueError(f"checkpoint.resume={resume!r}: no complete checkpoint there")
        return found

    def restore(self, ckpt: Path, state: TrainState) -> tuple[dict, dict | None]:
        """Load ``ckpt`` (verified by ``resolve_checkpoint``) into ``state``; returns (meta,
        this rank's loader position or None)."""
        import torch.distributed.checkpoint as dcp

        meta = read_meta(ckpt)
        _check_classes(ckpt, meta, state)  # before anything is loaded
        reader = safe_reader(ckpt, meta)
        metadata = reader.read_metadata()  # refused here before any other file is opened
        same_world = meta["world_size"] == self.ctx.world_size
        if state.native is not None:
            state.native.load(ckpt)
        legacy = meta["format_version"] == 3
        tree = state.template(same_world, encoded=not legacy)
        if not legacy:
            tree = fit_blobs(tree, metadata)
        run_dcp(dcp.load, tree, self.group, storage_reader=reader, planner=SafeLoadPlanner(ckpt))
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


def run_dcp(fn, tree: dict, group, **kwargs):
    """``dcp.save`` / ``dcp.load`` on ``group``, or in this process alone when it is None.

    A refusal or I/O error on any rank comes out as that error (DCP wraps every rank's
    failure, with tracebacks, into one ``CheckpointException``).
    """
    from torch.distributed.checkpoint.api import CheckpointException

    if group is None:  # said on purpose: DCP's warning that it assumes so is noise here
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable")
    try:
        return fn(tree, process_group=group, no_dist=group is None, **kwargs)
    except CheckpointException as exc:
        for error, _ in exc.failures.values():
            if isinstance(error, ValueError):  # a refusal (checkpoint.safe)
                raise error from None
        raise


def _in_background(fn, *args) -> tuple[Future, threading.Thread]:
    """Run ``fn(*args)`` on a daemon thread (a dead peer must not keep this process from
    exiting); the future completes only after the thread dropped its arguments (the snapshot)
    so that freeing it never overlaps the interpreter's shutdown."""
    future: Future = Future()
    job = [fn, args]

    def run() -> None:
        call, call_args = job.pop(0), job.pop(0)
        try:
            result = call(*call_args)
        except BaseException as exc:  # handed to whoever waits
            del call, call_args
            future.set_exception(exc)
        else:
            del call, call_args
            future.set_result(result)

    thread = threading.Thread(target=run, name="checkpoint-writer", daemon=True)
    thread.start()
    return future, thread


def _raise_agreed(problem: str | None, kind: type[Exception] = CheckpointWriteError) -> None:
    if problem is not None:
        raise kind(problem)


@dataclass
class _Target:
    """Where a save goes, the bytes it needs and the bytes free when it started (rank 0's)."""

    root: Path
    step: int
    needed: int
    free: int = 0

    @property
    def final(self) -> Path:
        return self.root / f"step_{self.step}"

    @property
    def tmp(self) -> Path:
        return self.root / f"step_{self.step}.tmp-write"

    def failure(self, exc: BaseException) -> str:
        """One line for a failed write: the folder, the error, for a full disk the room.

        A full disk reaches us as an OSError (ENOSPC), as a RuntimeError from inside
        torch.save's writer ("unexpected pos"), or wrapped by DCP: a disk left with less than
        ``_FULL_BELOW`` bytes counts as full whatever the type.
        """
        cause = _os_error(exc)
        lines = str(exc).strip().splitlines()
        what = (cause.strerror or str(cause)) if cause else (lines[-1] if lines else repr(exc))
        try:
            free_now = shutil.disk_usage(self.root).free
        except OSError:
            free_now = None
        full = cause is not None and cause.errno in (errno.ENOSPC, errno.EDQUOT)
        if full or (free_now is not None and free_now < _FULL_BELOW):
            what = (
                f"{os.strerror(errno.ENOSPC)} (this checkpoint needs about {self.needed} "
                f"bytes; {self.free} were free when it started)"
            )
        where = (cause.filename if cause else None) or self.tmp
        return (
            f"checkpoint {self.final.name}: writing {where} failed: {what}; the previous "
            "checkpoints are kept"
        )


def _os_error(exc: BaseException) -> OSError | None:
    """The OSError behind ``exc`` (DCP wraps each rank's error in a CheckpointException)."""
    if isinstance(exc, OSError):
        return exc
    for error, _ in getattr(exc, "failures", {}).values():
        if isinstance(error, OSError):
            return error
    return None


def _estimate_bytes(tree: dict, world_size: int) -> int:
    """Bytes the whole save of ``tree`` writes, from rank 0's snapshot: sharded (DTensor) and
    per-rank entries times the ranks, replicated tensors once, plus DCP's per-entry records."""
    total = 0
    for name, section in tree.items():
        for tensor in _tensors(section):
            local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
            per_rank = hasattr(tensor, "to_local") or name.startswith("rank")
            size = local.numel() * local.element_size() + _BYTES_PER_ENTRY
            total += size * (world_size if per_rank else 1)
    return total


def _tensors(node) -> list[torch.Tensor]:
    if isinstance(node, torch.Tensor):
        return [node]
    if isinstance(node, dict):
        return [t for value in node.values() for t in _tensors(value)]
    return []


def _check_classes(ckpt: Path, meta: dict, state: TrainState) -> None:
    head = state.classifier.head
    if meta.get("num_classes") != head.num_classes:
        raise ValueError(
            f"{ckpt}: checkpoint has {meta.get('num_classes')} classes, "
            f"the run has {head.num_classes}"
        )


def _publish(tmp: Path, final: Path, meta: dict) -> None:
    """meta.json last, everything on disk, then the atomic rename (and its directory entry).

    An existing ``final`` is never replaced (``keep_one_line`` keeps other lines away).
    """
    meta_path = tmp / META_FILE
    with open(meta_path, "w") as handle:
        handle.write(json.dumps(meta, indent=1))
        handle.flush()
        os.fsync(handle.fileno())
    fsync_dir(tmp)
    if final.exists():
        raise FileExistsError(17, "a checkpoint of this step exists; not replaced", str(final))
    tmp.rename(final)
    fsync_dir(final.parent)
