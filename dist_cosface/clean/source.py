"""The shard set being cleaned: its shards in manifest order and each sample's global index.

Sample ``i`` of the set is the ``i``-th sample listed by the index files taken in manifest
order; that index is the sample's identity in every finding and in the new shard set. Ranks
read contiguous runs of whole shards balanced by sample count (:func:`rank_shards`).
"""

from __future__ import annotations

import bisect
import json
from dataclasses import dataclass
from pathlib import Path

from dist_cosface.data.dataset import open_shards
from dist_cosface.data.shards import LABELS_NAME, MANIFEST_NAME, IndexEntry, Manifest, read_index


@dataclass
class SourceSet:
    folder: Path
    manifest: Manifest
    tars: list[Path]
    counts: list[int]  # samples per shard, manifest order
    firsts: list[int]  # global index of each shard's first sample, plus the total at the end

    @property
    def num_samples(self) -> int:
        return self.firsts[-1]

    @property
    def num_classes(self) -> int:
        return self.manifest.num_classes

    def index(self, shard: int) -> list[IndexEntry]:
        return read_index(self.tars[shard].with_suffix(".idx"))

    def shard_of(self, sample: int) -> int:
        return bisect.bisect_right(self.firsts, sample) - 1

    def label_names(self) -> dict[int, str]:
        """Class id -> the source label name of ``labels.json`` (empty when there is none)."""
        path = self.folder / self.manifest.label_map
        if not path.is_file():
            return {}
        try:
            mapping = json.loads(path.read_text())
            return {int(v): str(k) for k, v in mapping.items()}
        except (ValueError, TypeError, AttributeError) as exc:
            raise ValueError(f"{path}: not a JSON object of integer class ids ({exc})") from exc


def open_source(path: str | Path) -> SourceSet:
    """A local shard set, every shard and index checked (any problem is an error naming it)."""
    folder = Path(path)
    if str(path).startswith("pipe:") or "://" in str(path):
        raise ValueError(f"{path}: clean reads local shard sets only (it reads samples by offset)")
    if folder.is_file() and folder.name == MANIFEST_NAME:
        folder = folder.parent
    if not (folder / MANIFEST_NAME).is_file():
        raise ValueError(f"{folder / MANIFEST_NAME} not found: SHARDS must be a shard set folder")
    shards = open_shards(str(folder), "stop")  # strict: a damaged source is named, not skipped
    tars = [Path(u) for u in shards.urls]
    firsts = [0]
    for count in shards.counts:
        firsts.append(firsts[-1] + count)
    if firsts[-1] == 0:
        raise ValueError(f"{folder / MANIFEST_NAME}: the shard set holds no samples")
    return SourceSet(folder, shards.manifest, tars, list(shards.counts), firsts)


def rank_shards(counts: list[int], world_size: int, rank: int) -> tuple[int, int]:
    """``[first, stop)`` shards of ``rank``: contiguous runs, cut where the running sample count
    comes nearest to an equal share (some ranks get none when shards are fewer than ranks)."""
    cumulative = [0]
    for count in counts:
        cumulative.append(cumulative[-1] + count)
    total = cumulative[-1]

    def cut(r: int) -> int:
        target = total * r / world_size
        i = bisect.bisect_left(cumulative, target)
        if i > 0 and (i == len(cumulative) or target - cumulative[i - 1] < cumulative[i] - target):
            i -= 1
        return i

    first, stop = cut(rank), cut(rank + 1)
    if rank + 1 == world_size:
        stop = len(counts)
    return first, max(first, stop)


__all__ = ["LABELS_NAME", "SourceSet", "open_source", "rank_shards"]
