"""Open a converted dataset and check it against its shards before any rank starts reading.

Every rank runs the same checks on the same files, so every rank drops the same bad shards and
computes the same epoch length without talking to the others. Each local shard's index is
checked against its tar: the tar is long enough, spot-checked members sit where the index
says (a swapped or stale index names other members), and nothing follows the last indexed
member (an index cut short).
"""

from __future__ import annotations

import json
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

from dist_cosface.data.locations import open_stream
from dist_cosface.data.shards import MANIFEST_NAME, IndexEntry, Manifest, read_index
from dist_cosface.imageio import image_key


@dataclass
class ShardSet:
    """The usable shards of a dataset with their usable sample counts."""

    manifest: Manifest
    urls: list[str]
    index_paths: list[str]  # empty for remote datasets (no index checks possible)
    counts: list[int]
    problems: list[str] = field(default_factory=list)
    skipped_samples: int = 0
    bad_shards: int = 0

    @property
    def num_samples(self) -> int:
        return sum(self.counts)


def _is_remote(path: str) -> bool:
    return path.startswith("pipe:") or "://" in path


def _read_manifest(path: str) -> tuple[Manifest, str]:
    """Returns the manifest and the location shard names are relative to."""
    if _is_remote(path):
        with open_stream(path) as stream:
            text = stream.read().decode()
        return Manifest.from_json(text, path), path
    p = Path(path)
    manifest_path = p / MANIFEST_NAME if p.is_dir() else p
    if not manifest_path.is_file():
        raise ValueError(f"data.path={path!r}: {manifest_path} not found (run dist-cosface shards)")
    return Manifest.from_json(manifest_path.read_text(), str(manifest_path)), str(manifest_path)


def _shard_url(manifest_location: str, name: str) -> str:
    if manifest_location.startswith("pipe:"):
        if MANIFEST_NAME not in manifest_location:
            raise ValueError(f"pipe: data.path must mention {MANIFEST_NAME}: {manifest_location}")
        return manifest_location.replace(MANIFEST_NAME, name)
    if "://" in manifest_location:
        return manifest_location.rsplit("/", 1)[0] + "/" + name
    return str(Path(manifest_location).parent / name)


SPOT_CHECKS = 4  # index entries whose tar headers are read per shard (first, last, between)


def _header_at(f, offset: int) -> tarfile.TarInfo | None:
    """The tar header in the 512-byte block at ``offset`` (None: zero block or end of file)."""
    f.seek(offset)
    block = f.read(tarfile.BLOCKSIZE)
    if len(block) < tarfile.BLOCKSIZE or not block.strip(b"\0"):
        return None
    try:
        return tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")
    except tarfile.HeaderError:
        return None


def verify_index(tar: Path, entries: list[IndexEntry]) -> str:
    """'' when the index fits the tar, else the problem (naming the tar and the member)."""
    size = tar.stat().st_size
    end = max((o + s for e in entries for o, s in e.components.values()), default=0)
    if size < end:
        return f"{tar}: truncated tar ({size} bytes, index needs {end})"
    picks = sorted({round(i * (len(entries) - 1) / (SPOT_CHECKS - 1)) for i in range(SPOT_CHECKS)})
    with open(tar, "rb") as f:
        for entry in [entries[i] for i in picks if entries]:
            for ext, (offset, length) in entry.components.items():
                name = f"{entry.key}.{ext}"
                head = _header_at(f, offset - tarfile.BLOCKSIZE) if offset >= 512 else None
                # names over 100 bytes live in an extension header; compare what fits
                if head is None or head.size != length or not name.startswith(head.name):
                    found = "no valid header" if head is None else f"{head.name!r} ({head.size} B)"
                    return f"{tar}: index says {name} at byte {offset}, the tar has {found}"
        if end:
            after = -(-end // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
            extra = _header_at(f, after)
            if extra is not None:
                return (
                    f"{tar}: member {extra.name!r} follows the last indexed one (index cut short)"
                )
    return ""


def _check_local_shard(tar: Path, expected: int) -> tuple[int, int, int, str]:
    """(usable samples, indexed samples, incomplete samples, problem or '') for one shard."""
    idx = tar.with_suffix(".idx")
    if not tar.is_file() or not idx.is_file():
        return 0, 0, 0, f"{tar}: shard or its index {idx.name} is missing"
    try:
        entries = read_index(idx)
    except (ValueError, UnicodeDecodeError) as exc:
        return 0, 0, 0, f"{tar}: unreadable index: {exc}"
    problem = verify_index(tar, entries)
    if problem:
        return 0, 0, 0, problem
    # both loaders match components case-insensitively (webdataset lower-cases the keys,
    # DALI reads with case_sensitive_extensions=False), so the check must too
    components = [{c.lower() for c in e.components} for e in entries]
    incomplete = [
        e.key for e, c in zip(entries, components) if "cls" not in c or image_key(c) is None
    ]
    usable = len(entries) - len(incomplete)
    if incomplete:
        problem = (
            f"{tar}: key {incomplete[0]}: sample without .cls or image ({len(incomplete)} such)"
        )
    if len(entries) != expected:
        problem = f"{tar}: manifest says {expected} samples, index lists {len(entries)}"
    return usable, len(entries), len(incomplete), problem


def _check_labels(manifest: Manifest, location: str) -> None:
    """The label map's class ids must fit the manifest's num_classes (an edited manifest)."""
    if _is_remote(location):
        return
    path = Path(_shard_url(location, manifest.label_map))
    if not path.is_file():
        return  # datasets written by other tools may have none
    try:
        ids = [int(v) for v in json.loads(path.read_text()).values()]
    except (ValueError, TypeError, AttributeError) as exc:
        raise ValueError(f"{path}: not a JSON object of integer class ids ({exc})") from exc
    if ids and max(ids) >= manifest.num_classes:
        raise ValueError(
            f"{location}: num_classes={manifest.num_classes} but {path.name} maps labels to class "
            f"ids up to {max(ids)}: the manifest was edited or belongs to other shards"
        )


def open_shards(path: str, on_bad: str, max_skip_fraction: float = 1.0) -> ShardSet:
    """Read the manifest and check each shard; bad shards stop the job or are dropped.

    Dropped shards and incomplete samples count as lost; more than ``max_skip_fraction`` of
    the manifest's samples lost is an error listing the problems.
    """
    manifest, location = _read_manifest(path)
    _check_labels(manifest, location)
    remote = _is_remote(location)
    shards = ShardSet(manifest, [], [], [])
    for info in manifest.shards:
        url = _shard_url(location, info.name)
        if remote:
            usable, indexed, missing, problem = info.num_samples, info.num_samples, 0, ""
        else:
            usable, indexed, missing, problem = _check_local_shard(Path(url), info.num_samples)
        if problem:
            if on_bad == "stop":
                raise ValueError(problem)
            shards.problems.append(problem)
        # every sample the manifest promises and the shard cannot give is lost
        shards.skipped_samples += missing + max(0, info.num_samples - indexed)
        if usable == 0 or indexed < info.num_samples:
            shards.bad_shards += 1
        if usable == 0:
            continue
        shards.urls.append(url)
        shards.index_paths.append("" if remote else str(Path(url).with_suffix(".idx")))
        shards.counts.append(usable)
    if not shards.urls:
        raise ValueError(f"data.path={path!r}: no usable shards ({'; '.join(shards.problems)})")
    lost = shards.skipped_samples / max(1, manifest.num_samples)
    if lost > max_skip_fraction and max_skip_fraction < 1.0:
        raise ValueError(
            f"data.path={path!r}: {shards.skipped_samples} of {manifest.num_samples} samples "
            f"({lost:.1%}) are unusable, more than data.max_skip_fraction="
            f"{max_skip_fraction:g}: {'; '.join(shards.problems[:5])}"
        )
    return shards


def balanced_groups(counts: list[int], world_size: int) -> list[list[int]]:
    """Deterministic split of shard ids into ``world_size`` groups of similar sample counts."""
    if len(counts) < world_size:
        raise ValueError(
            f"{len(counts)} usable shards cannot feed {world_size} ranks; "
            "convert with a smaller --shard-size"
        )
    groups: list[list[int]] = [[] for _ in range(world_size)]
    totals = [0] * world_size
    for shard in sorted(range(len(counts)), key=lambda i: (-counts[i], i)):
        g = min(range(world_size), key=lambda k: (totals[k], k))
        groups[g].append(shard)
        totals[g] += counts[shard]
    return [sorted(g) for g in groups]
