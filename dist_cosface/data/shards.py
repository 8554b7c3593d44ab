"""On-disk shard layout: tar writer with its DALI index, the manifest, and index parsing.

A dataset folder holds ``shard-NNNNNN.tar`` (WebDataset: ``<key>.<img ext>`` + ``<key>.cls``
per sample), one DALI index ``shard-NNNNNN.idx`` per tar (the ``v1.2`` text format that DALI's
``wds2idx`` writes: a ``v1.2 <samples>`` line, then per sample ``ext offset size name`` for each
component, where offset is the member's data offset in bytes), ``labels.json`` (source label ->
class id) and ``manifest.json``. Files are written under a temporary name and renamed when
complete, so a half-written shard never looks complete.
"""

from __future__ import annotations

import io
import json
import os
import re
import tarfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

MANIFEST_NAME = "manifest.json"
LABELS_NAME = "labels.json"
MANIFEST_FORMAT = "dist_cosface.shards/v1"
INDEX_VERSION = "v1.2"
# A file a manifest names (shard, label map) is a plain file name beside the manifest: it is
# joined to paths, URLs and ``pipe:`` commands, so anything that could leave the folder or mean
# something to a shell (separators, "..", spaces, quotes, ; | & $ ...) is refused.
PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")
DIGITS = re.compile(r"[0-9]+")  # an index's offsets and sizes
PLAIN_NAME_RULE = "1-200 of A-Z a-z 0-9 . _ -, starting with a letter or digit, no '..'"


def check_plain_name(name: object, what: str, where: str, suffix: str = "") -> str:
    """``name`` if it is a plain file name (ending in ``suffix``), else ValueError naming it."""
    if (
        not isinstance(name, str)
        or not PLAIN_NAME.fullmatch(name)
        or ".." in name
        or not name.endswith(suffix)
    ):
        rule = PLAIN_NAME_RULE + (f", ending in {suffix}" if suffix else "")
        raise ValueError(f"{where}: {what} {name!r} is not a plain file name ({rule})")
    return name


def shard_stem(index: int) -> str:
    return f"shard-{index:06d}"


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class ShardWriter:
    """Writes one tar and its DALI index in a single pass; ``close()`` publishes both."""

    def __init__(self, tar_path: Path):
        self.tar_path = Path(tar_path)
        self.idx_path = self.tar_path.with_suffix(".idx")
        self._tmp_tar = self.tar_path.with_name(self.tar_path.name + ".tmp")
        self._tar = tarfile.open(self._tmp_tar, "w", format=tarfile.USTAR_FORMAT)
        self._index_lines: list[str] = []
        self.num_samples = 0

    def _add_member(self, name: str, data: bytes) -> tuple[int, int]:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mode = 0o444
        start = self._tar.offset
        self._tar.addfile(info, io.BytesIO(data))
        padded = -(-len(data) // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
        header_bytes = self._tar.offset - start - padded
        return start + header_bytes, len(data)

    def write(self, key: str, components: dict[str, bytes]) -> None:
        """Add one sample; ``components`` maps extension -> bytes, written in order."""
        parts = []
        for ext, data in components.items():
            name = f"{key}.{ext}"
            offset, size = self._add_member(name, data)
            parts.append(f"{ext} {offset} {size} {name}")
        self._index_lines.append(" ".join(parts))
        self.num_samples += 1

    def close(self) -> int:
        """Finish the tar, then publish tar and index; returns the tar size in bytes."""
        self._tar.close()
        idx_tmp = self.idx_path.with_name(self.idx_path.name + ".tmp")
        header = f"{INDEX_VERSION} {self.num_samples}\n"
        idx_tmp.write_text(header + "".join(line + "\n" for line in self._index_lines))
        os.replace(self._tmp_tar, self.tar_path)
        os.replace(idx_tmp, self.idx_path)
        return self.tar_path.stat().st_size

    def abort(self) -> None:
        self._tar.close()
        self._tmp_tar.unlink(missing_ok=True)


@dataclass
class IndexEntry:
    key: str
    components: dict[str, tuple[int, int]]  # ext -> (data offset, size)


def read_index(idx_path: Path) -> list[IndexEntry]:
    """Parse a DALI ``v1.2`` webdataset index, raising ValueError naming the file (and line)."""
    try:
        lines = Path(idx_path).read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{idx_path}: unreadable index: {exc}") from exc
    if not lines:
        raise ValueError(f"{idx_path}: empty index file")
    head = lines[0].split()
    if len(head) != 2 or head[0] != INDEX_VERSION or not head[1].isdigit():
        raise ValueError(f"{idx_path}: first line {lines[0]!r} is not '{INDEX_VERSION} <count>'")
    entries = []
    for lineno, line in enumerate(lines[1:], start=2):
        fields = line.split()
        if not fields or len(fields) % 4:
            raise ValueError(f"{idx_path}:{lineno}: malformed index line {line!r}")
        comps, key = {}, None
        for i in range(0, len(fields), 4):
            ext, offset, size, name = fields[i : i + 4]
            numbers = DIGITS.fullmatch(offset) and DIGITS.fullmatch(size)
            if not (numbers and name.endswith("." + ext)):
                raise ValueError(
                    f"{idx_path}:{lineno}: entry {' '.join(fields[i : i + 4])!r} is not "
                    "'<ext> <offset> <size> <key>.<ext>' with non-negative integers"
                )
            key = name[: -len(ext) - 1]
            comps[ext] = (int(offset), int(size))
        entries.append(IndexEntry(key, comps))
    if len(entries) != int(head[1]):
        raise ValueError(f"{idx_path}: header says {head[1]} samples, lists {len(entries)}")
    return entries


@dataclass
class ShardInfo:
    name: str  # tar file name, relative to the manifest
    num_samples: int
    bytes: int = 0

    @property
    def index_name(self) -> str:
        return self.name[: -len(".tar")] + ".idx" if self.name.endswith(".tar") else ""


@dataclass
class Manifest:
    num_classes: int
    num_samples: int
    shards: list[ShardInfo]
    image_ext: str = "jpg"
    source: str = ""
    label_map: str = LABELS_NAME
    skipped: dict[str, int] = field(default_factory=dict)
    format: str = MANIFEST_FORMAT
    # how the set was derived from another (``dist-cosface clean``: source, run, thresholds,
    # removals); empty for a converted set
    provenance: dict = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str, where: str) -> Manifest:
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{where}: not valid JSON: {exc}") from exc
        if not isinstance(raw, dict) or raw.get("format") != MANIFEST_FORMAT:
            raise ValueError(f"{where}: not a {MANIFEST_FORMAT} manifest")
        try:
            shards = [ShardInfo(**s) for s in raw.pop("shards")]
            manifest = cls(shards=shards, **raw)
        except (KeyError, TypeError) as exc:
            raise ValueError(f"{where}: malformed manifest: {exc}") from exc
        for shard in manifest.shards:
            check_plain_name(shard.name, "shard name", where, suffix=".tar")
            if not isinstance(shard.num_samples, int) or shard.num_samples < 0:
                raise ValueError(f"{where}: shard {shard.name}: num_samples {shard.num_samples!r}")
        check_plain_name(manifest.label_map, "label_map", where)
        if not isinstance(manifest.provenance, dict):
            raise ValueError(f"{where}: provenance must be a JSON object")
        total = sum(s.num_samples for s in manifest.shards)
        if total != manifest.num_samples:
            raise ValueError(f"{where}: num_samples={manifest.num_samples} but shards hold {total}")
        if manifest.num_classes < 1 or not manifest.shards:
            raise ValueError(f"{where}: needs num_classes >= 1 and at least one shard")
        return manifest


def publish_shard_set(out_dir: Path, manifest: Manifest, label_map: dict | None = None) -> None:
    """Write ``labels.json`` then ``manifest.json`` (atomically) beside the finished shards.

    The manifest comes last: a folder whose manifest exists is a complete shard set.
    """
    atomic_write_text(Path(out_dir) / LABELS_NAME, json.dumps(label_map or {}, indent=0))
    atomic_write_text(Path(out_dir) / MANIFEST_NAME, manifest.to_json())
