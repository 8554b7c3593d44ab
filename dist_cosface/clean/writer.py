"""The new shard set: the source's samples in source order minus the removed ones, relabelled.

Which samples stay is a pure function of the sample (its global index and label) and the
plan, so every rank can count its own source shards' survivors, and the kept samples are
cut into new shards of ``shard_size`` by position; rank ``r`` writes new shards ``r, r + W,
...``, reading the bytes of each sample at the offsets its source index gives (images are
copied, never re-encoded). The result does not depend on the number of ranks.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dist_cosface.clean.embed import parse_label
from dist_cosface.clean.source import SourceSet
from dist_cosface.data.shards import ShardInfo, ShardWriter, shard_stem


@dataclass
class Plan:
    """What the new set keeps: ``new_label[c]`` (-1: class removed) and the dropped samples."""

    new_label: np.ndarray  # [C] int64
    dropped: np.ndarray  # sorted global indices of dropped samples

    def keep(self, indices: np.ndarray, labels: np.ndarray) -> np.ndarray:
        valid = (labels >= 0) & (labels < len(self.new_label))
        kept_class = np.zeros(len(labels), dtype=bool)
        kept_class[valid] = self.new_label[labels[valid]] >= 0
        if not len(self.dropped):
            return kept_class
        at = np.searchsorted(self.dropped, indices)
        dropped = (at < len(self.dropped)) & (
            self.dropped[np.minimum(at, len(self.dropped) - 1)] == indices
        )
        return kept_class & ~dropped


def kept_per_shard(
    source: SourceSet, plan: Plan, indices: torch.Tensor, labels: torch.Tensor, shards: range
) -> list[int]:
    """Kept samples of each of ``shards`` (this rank's), from the samples it read."""
    idx, lab = indices.numpy(), labels.numpy()
    keep = plan.keep(idx, lab)
    firsts = np.asarray(source.firsts)
    shard = np.searchsorted(firsts, idx[keep], side="right") - 1
    counts = np.bincount(shard - shards.start, minlength=len(shards)) if len(shards) else []
    return [int(c) for c in counts][: len(shards)]


def write_new_shards(
    source: SourceSet,
    plan: Plan,
    kept_counts: list[int],
    shard_size: int,
    out: Path,
    rank: int,
    world_size: int,
) -> list[tuple[int, ShardInfo]]:
    """Write this rank's new shards; returns ``(number, info)`` of each."""
    kept_before = np.concatenate([[0], np.cumsum(kept_counts)]).astype(np.int64)
    total = int(kept_before[-1])
    written = []
    for number in range(rank, -(-total // shard_size), world_size):
        lo, hi = number * shard_size, min((number + 1) * shard_size, total)
        writer = ShardWriter(out / f"{shard_stem(number)}.tar")
        try:
            for s in np.flatnonzero((kept_before[1:] > lo) & (kept_before[:-1] < hi)):
                _copy_kept(source, plan, int(s), int(kept_before[s]), lo, hi, writer)
        except BaseException:
            writer.abort()
            raise
        if writer.num_samples != hi - lo:
            writer.abort()
            raise ValueError(
                f"new shard {number}: {writer.num_samples} samples copied, {hi - lo} expected "
                "(the source shards changed while cleaning?)"
            )
        written.append(
            (number, ShardInfo(writer.tar_path.name, writer.num_samples, writer.close()))
        )
    return written


def _copy_kept(
    source: SourceSet, plan: Plan, shard: int, position: int, lo: int, hi: int, writer
) -> None:
    """Copy the kept samples of source ``shard`` whose kept position is in ``[lo, hi)``."""
    tar, entries = source.tars[shard], source.index(shard)
    with open(tar, "rb") as f:
        labels = [
            parse_label(_read(f, tar, e.components.get("cls")), source.num_classes)[0]
            for e in entries
        ]
        first = source.firsts[shard]
        keep = plan.keep(np.arange(first, first + len(entries)), np.asarray(labels, dtype=np.int64))
        for j in np.flatnonzero(keep):
            if position >= hi:
                return
            if position >= lo:
                entry = entries[j]
                components = {
                    ext: _read(f, tar, span)
                    for ext, span in entry.components.items()
                    if ext != "cls"
                }
                components["cls"] = str(int(plan.new_label[labels[j]])).encode()
                writer.write(entry.key, components)
            position += 1


def _read(f, tar: Path, span: tuple[int, int] | None) -> bytes | None:
    if span is None:
        return None
    offset, size = span
    f.seek(offset)
    data = f.read(size)
    if len(data) != size:
        raise ValueError(f"{tar}: truncated at byte {offset} (index says {size} bytes there)")
    return data
