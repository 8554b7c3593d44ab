"""Open a converted dataset and check it against its shards before any rank starts reading.

Every rank runs the same checks on the same files, so every rank drops the same bad shards and
computes the same epoch length without talking to the others.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from dist_cosface.data.shards import MANIFEST_NAME, Manifest, read_index

IMAGE_EXT_SET = "jpg;jpeg;png;pgm;ppm;pbm;pnm;bmp;tif;webp"


@dataclass
class ShardSet:
    """The usable shards of a dataset with their usable sample counts."""

    manifest: Manifest
    urls: list[str]
    index_paths: list[str]  # empty for remote datasets (no index checks possible)
    counts: list[int]
    problems: list[str] = field(default_factory=list)
    skipped_samples: int = 0

    @property
    def num_samples(self) -> int:
        return sum(self.counts)


def _is_remote(path: str) -> bool:
    return path.startswith("pipe:") or "://" in path


def _read_manifest(path: str) -> tuple[Manifest, str]:
    """Returns the manifest and the location shard names are relative to."""
    if _is_remote(path):
        import webdataset as wds

        with wds.gopen(path) as stream:
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


def _check_local_shard(tar: Path, expected: int) -> tuple[int, int, str]:
    """(usable samples, samples missing a component, problem or '') for one local shard."""
    idx = tar.with_suffix(".idx")
    if not tar.is_file() or not idx.is_file():
        return 0, 0, f"{tar}: shard or its index {idx.name} is missing"
    entries = read_index(idx)
    end = max((o + s for e in entries for o, s in e.components.values()), default=0)
    if tar.stat().st_size < end:
        return 0, 0, f"{tar}: truncated tar ({tar.stat().st_size} bytes, index needs {end})"
    images = set(IMAGE_EXT_SET.split(";"))
    incomplete = [
        e.key for e in entries if "cls" not in e.components or not images & set(e.components)
    ]
    usable = len(entries) - len(incomplete)
    problem = ""
    if incomplete:
        problem = (
            f"{tar}: key {incomplete[0]}: sample without .cls or image ({len(incomplete)} such)"
        )
    if len(entries) != expected:
        problem = f"{tar}: manifest says {expected} samples, index lists {len(entries)}"
    return usable, len(entries) - usable, problem


def open_shards(path: str, on_bad: str) -> ShardSet:
    """Read the manifest and check each shard; bad shards stop the job or are dropped."""
    manifest, location = _read_manifest(path)
    remote = _is_remote(location)
    shards = ShardSet(manifest, [], [], [])
    for info in manifest.shards:
        url = _shard_url(location, info.name)
        if remote:
            usable, missing, problem = info.num_samples, 0, ""
        else:
            usable, missing, problem = _check_local_shard(Path(url), info.num_samples)
        if problem:
            if on_bad == "stop":
                raise ValueError(problem)
            shards.problems.append(problem)
        shards.skipped_samples += missing
        if usable == 0:
            shards.skipped_samples += info.num_samples if problem else 0
            continue
        shards.urls.append(url)
        shards.index_paths.append("" if remote else str(Path(url).with_suffix(".idx")))
        shards.counts.append(usable)
    if not shards.urls:
        raise ValueError(f"data.path={path!r}: no usable shards ({'; '.join(shards.problems)})")
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


def load_label_map(path: str) -> dict[str, int]:
    manifest, location = _read_manifest(path)
    return json.loads(Path(_shard_url(location, manifest.label_map)).read_text())
