"""Checkpoint file records (size + CRC32), durable writes, and verified checkpoint selection.

At save every rank records the size and CRC32 of the files it wrote and fsyncs them; rank 0
merges the records into meta.json and fsyncs the folder before the atomic rename. At resume
the ranks verify the candidate's files between them (each rank reads a share) and agree on the
newest checkpoint whose files all match; a damaged one is skipped with a warning naming the
file. CRC32 is enough against truncation and bit rot (this is not a defence against
tampering) and hashes about twice as fast as SHA-256 (tools/bench_checkpoint.py).
"""

from __future__ import annotations

import json
import logging
import os
import zlib
from pathlib import Path

from dist_cosface.agreement import gather_objects
from dist_cosface.distributed import GroupMember
from dist_cosface.engine.checkpoint.contract import META_FILE

log = logging.getLogger(__name__)

_CHUNK = 8 << 20
RANK_RECORDS = "files_rank{rank}.json"
READABLE_VERSIONS = (3, 4)  # meta.json format_version: 4 writes non-tensors as JSON, 3 pickled


def read_meta(ckpt: Path) -> dict:
    """A checkpoint's meta.json, refused (naming the format) unless this version reads it."""
    meta_path = Path(ckpt) / META_FILE
    if not meta_path.is_file():
        raise ValueError(f"{ckpt} is not a complete checkpoint (no {META_FILE})")
    try:
        meta = json.loads(meta_path.read_text())
    except ValueError as exc:
        raise ValueError(f"{meta_path}: not valid JSON ({exc})") from exc
    if not isinstance(meta, dict) or meta.get("format_version") not in READABLE_VERSIONS:
        version = meta.get("format_version") if isinstance(meta, dict) else None
        raise ValueError(
            f"{meta_path}: unsupported format_version {version} (this version reads "
            f"{', '.join(map(str, READABLE_VERSIONS))})"
        )
    if not isinstance(meta.get("files"), dict):
        raise ValueError(f"{meta_path}: no 'files' records to verify the checkpoint against")
    return meta


def file_record(path: Path) -> dict:
    """``{"size", "crc32"}`` of ``path``, after forcing its data to disk."""
    crc, size = 0, 0
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
            size += len(chunk)
        os.fsync(handle.fileno())
    return {"size": size, "crc32": f"{crc:08x}"}


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_rank_records(folder: Path, rank: int, names: list[str]) -> None:
    """Record this rank's files into ``folder/files_rank<r>.json`` (merged by rank 0)."""
    records = {name: file_record(folder / name) for name in names}
    path = folder / RANK_RECORDS.format(rank=rank)
    path.write_text(json.dumps(records))
    file_record(path)  # fsync


def merge_records(folder: Path, world_size: int) -> dict:
    """Rank 0: every rank's records plus any other file (DeepSpeed's); fsyncs the folders."""
    records: dict = {}
    for rank in range(world_size):
        path = folder / RANK_RECORDS.format(rank=rank)
        records.update(json.loads(path.read_text()))
        path.unlink()
    for path in sorted(folder.rglob("*")):
        name = path.relative_to(folder).as_posix()
        if path.is_file() and name not in records and name != META_FILE:
            records[name] = file_record(path)
        elif path.is_dir():
            fsync_dir(path)
    return records


def first_mismatch(ckpt: Path, files: dict, names: list[str]) -> str | None:
    """The first of ``names`` that is missing or does not match its record, described."""
    for name in names:
        path = ckpt / name
        want = files[name]
        if not path.is_file():
            return f"{path}: missing"
        size = path.stat().st_size
        if size != want["size"]:
            return f"{path}: {size} bytes, {want['size']} recorded (truncated?)"
        got = file_record(path)["crc32"]
        if got != want["crc32"]:
            return f"{path}: CRC32 {got}, {want['crc32']} recorded (corrupted)"
    return None


def _check_my_share(ckpt: Path, member: GroupMember, only) -> str | None:
    """This rank's share of ``ckpt``'s recorded files (every world_size-th), verified: the
    first problem, or None. An unreadable meta.json is a problem on every rank."""
    try:
        files = read_meta(ckpt)["files"]
    except (OSError, ValueError) as exc:  # JSONDecodeError is a ValueError
        return f"{ckpt / META_FILE}: unreadable ({exc})"
    names = sorted(n for n in files if only is None or n in only)[member.rank :: member.world_size]
    return first_mismatch(ckpt, files, names)


def select_verified(
    candidates: list[Path], member: GroupMember, strict: bool, only=None
) -> Path | None:
    """Newest intact checkpoint of ``candidates`` (oldest first), agreed by all ranks.

    Rank 0's candidate list is the one used, so ranks that see the folder differently still
    pick the same step. ``strict`` (an explicitly named checkpoint): damage is an error.
    ``only``: verify just these files (a reader that needs only the backbone).
    """
    order = [str(c) for c in reversed(candidates)]
    order = [Path(c) for c in gather_objects(order, member.group)[0]]
    for ckpt in order:
        mine = _check_my_share(ckpt, member, only)
        problems = [p for p in gather_objects(mine, member.group) if p]
        if not problems:
            return ckpt
        if strict:
            raise ValueError(f"checkpoint {ckpt} is damaged: {'; '.join(problems)}")
        if member.is_main:
            log.warning(
                "checkpoint %s is damaged (%s); falling back to the previous complete checkpoint",
                ckpt,
                "; ".join(problems),
            )
    if order:
        raise ValueError(
            f"no intact checkpoint among {[c.name for c in order]} in {order[0].parent}: all "
            "are damaged (see the warnings); set checkpoint.resume=none and "
            "checkpoint.later_steps=archive to start fresh (they are kept under superseded-0)"
        )
    return None
