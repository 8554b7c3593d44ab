"""Rank 0's part of the output: the report, ``labels.json``, the manifest, then the rename."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from dist_cosface.clean.report import REPORT_DIR, Finding, Histogram, write_report
from dist_cosface.configtools import to_mapping
from dist_cosface.data.shards import LABELS_NAME, Manifest, ShardInfo, atomic_write_text
from dist_cosface.engine.checkpoint.files import fsync_dir

if TYPE_CHECKING:
    from dist_cosface.clean.run import Outcome


def _round(x: float) -> float:
    return round(float(x), 6)


def _sample_places(source, samples: list[int]) -> dict[int, tuple[str, str]]:
    """(shard file, key) of each listed sample, reading only the indexes that hold them."""
    places: dict[int, tuple[str, str]] = {}
    by_shard: dict[int, list[int]] = {}
    for s in samples:
        by_shard.setdefault(source.shard_of(s), []).append(s)
    for shard, members in sorted(by_shard.items()):
        entries = source.index(shard)
        for s in members:
            places[s] = (source.tars[shard].name, entries[s - source.firsts[shard]].key)
    return places


def findings_tables(source, sets, f, plan) -> list[Finding]:
    names = source.label_names()
    name = lambda c: names.get(c, str(c))  # noqa: E731
    places = _sample_places(source, [s for s, *_ in f.noisy] + [s for s, _ in f.unreadable])
    set_of = {c: n for n, group in enumerate(f.merge_sets) for c in group}
    return [
        Finding(
            "noisy_samples",
            ["sample", "shard", "key", "class", "label", "cos", "angle_deg"],
            [
                {
                    "sample": s,
                    "shard": places[s][0],
                    "key": places[s][1],
                    "class": c,
                    "label": name(c),
                    "cos": _round(cos),
                    "angle_deg": _round(angle),
                }
                for s, c, cos, angle in f.noisy
            ],
            "samples whose angle to their class's dominant sub-center exceeds max_angle",
        ),
        Finding(
            "unreadable_samples",
            ["sample", "shard", "key", "problem"],
            [
                {"sample": s, "shard": places[s][0], "key": places[s][1], "problem": problem}
                for s, problem in f.unreadable
            ],
            "samples whose image or label could not be read (always dropped)",
        ),
        Finding(
            "low_share_classes",
            ["class", "label", "samples", "dominant_subcenter", "share"],
            [
                {
                    "class": c,
                    "label": name(c),
                    "samples": n,
                    "dominant_subcenter": k,
                    "share": _round(share),
                }
                for c, n, k, share in f.low_share
            ],
            "classes whose dominant sub-center holds less than min_dominant_share of samples",
        ),
        Finding(
            "duplicate_pairs",
            ["class_a", "class_b", "label_a", "label_b", "cos", "merge_set"],
            [
                {
                    "class_a": a,
                    "class_b": b,
                    "label_a": name(a),
                    "label_b": name(b),
                    "cos": _round(cos),
                    "merge_set": set_of[a],
                }
                for a, b, cos in f.pairs
            ],
            "pairs of classes whose dominant centers' cosine exceeds duplicate_cos",
        ),
        Finding(
            "merge_sets",
            ["merge_set", "classes", "labels", "new_class"],
            [
                {
                    "merge_set": n,
                    "classes": group,
                    "labels": [name(c) for c in group],
                    "new_class": int(plan.new_label[group[0]]),
                }
                for n, group in enumerate(f.merge_sets)
            ],
            "connected groups of duplicate pairs: one identity each (new_class -1: removed)",
        ),
        Finding(
            "overlap",
            ["eval_set", "identity", "class", "label", "cos"],
            [
                {
                    "eval_set": sets[s].name,
                    "identity": sets[s].identities[i],
                    "class": c,
                    "label": name(c),
                    "cos": _round(cos),
                }
                for s, i, c, cos in f.overlap
            ],
            "evaluation identities whose mean embedding matches a training class above overlap_cos",
        ),
    ]


# name -> (title, unit, value range, the threshold drawn on it: a CleanConfig key)
_HISTOGRAMS = {
    "angles": (
        "samples: angle to their class's dominant sub-center",
        "degrees",
        (0, 180),
        "max_angle",
    ),
    "nearest_center": (
        "classes: cosine to the nearest other class center",
        "cosine",
        (-1, 1),
        "duplicate_cos",
    ),
    "overlap": (
        "evaluation identities: cosine to the best training class",
        "cosine",
        (-1, 1),
        "overlap_cos",
    ),
    "dominant_share": (
        "classes: share of samples at the dominant sub-center",
        "share",
        (0, 1),
        "min_dominant_share",
    ),
}


def _histograms(cfg, f) -> list[Histogram]:
    def edges(lo, hi, n):
        return [_round(e) for e in np.linspace(lo, hi, n + 1)]

    h = f.histograms
    return [
        Histogram(
            name,
            title,
            unit,
            edges(lo, hi, len(h[name])),
            h[name].tolist(),
            {threshold: getattr(cfg, threshold)},
        )
        for name, (title, unit, (lo, hi), threshold) in _HISTOGRAMS.items()
    ]


def _counts(o: Outcome, infos: list[ShardInfo]) -> dict:
    f, new_label = o.findings, o.plan.new_label
    kept_samples = sum(i.num_samples for i in infos)
    return {
        "samples": o.source.num_samples,
        "classes": o.source.num_classes,
        "empty_classes": int((f.class_samples == 0).sum()),
        "unreadable_samples": len(f.unreadable),
        "noisy_samples": len(f.noisy),
        "low_share_classes": len(f.low_share),
        "duplicate_pairs": len(f.pairs),
        "merge_sets": len(f.merge_sets),
        "classes_in_merge_sets": sum(len(g) for g in f.merge_sets),
        "eval_identities": sum(len(s.identities) for s in o.sets),
        "overlapping_identities": len({(s, i) for s, i, _, _ in f.overlap}),
        "overlapping_classes": len({c for _, _, c, _ in f.overlap}),
        "kept_samples": kept_samples,
        "kept_classes": int(len(np.unique(new_label[new_label >= 0]))),
        "removed_samples": o.source.num_samples - kept_samples,
        "removed_classes": int((new_label < 0).sum()),
    }


def _origin(o: Outcome) -> dict:
    """Where the new set comes from: in the summary and in the manifest's provenance."""
    return {
        "tool": "dist-cosface clean",
        "source": str(o.source.folder.resolve()),
        "run": str(Path(o.job.run).resolve()),
        "checkpoint": str(Path(o.ckpt).resolve()),
        "step": o.meta.get("step"),
        "num_subcenters": int(o.meta.get("num_subcenters", 1)),
        "eval_sets": [
            {
                "name": s.name,
                "source": str(Path(s.source).resolve()),
                "identities": len(s.identities),
                "images": len(s.images),
            }
            for s in o.sets
        ],
        "thresholds": {k: getattr(o.cfg, k) for k in THRESHOLDS},
    }


THRESHOLDS = ("max_angle", "min_dominant_share", "duplicate_cos", "overlap_cos")
ACTIONS = ("drop_noisy", "merge_duplicates", "remove_overlap", "drop_low_share")


def _removed(cfg, counts: dict) -> dict:
    """What the plan removed, by cause (0 where the action was off)."""
    merged = counts["classes_in_merge_sets"] - counts["merge_sets"]
    return {
        "unreadable_samples": counts["unreadable_samples"],
        "noisy_samples": counts["noisy_samples"] if cfg.drop_noisy else 0,
        "merged_classes": merged if cfg.merge_duplicates else 0,
        "overlapping_classes": counts["overlapping_classes"] if cfg.remove_overlap else 0,
        "low_share_classes": counts["low_share_classes"] if cfg.drop_low_share else 0,
        "removed_samples": counts["removed_samples"],
        "removed_classes": counts["removed_classes"],
    }


def publish(o: Outcome, infos: list[ShardInfo], tmp: Path, out: Path) -> dict:
    """Write report, labels and manifest into ``tmp``, then rename it to ``out``."""
    counts, origin = _counts(o, infos), _origin(o)
    summary = dict(origin, settings=to_mapping(o.cfg), counts=counts)
    tables = findings_tables(o.source, o.sets, o.findings, o.plan)
    write_report(tmp / REPORT_DIR, summary, tables, _histograms(o.cfg, o.findings))
    names = o.source.label_names()
    labels = {names.get(c, str(c)): new for c, new in enumerate(o.plan.new_label.tolist())}
    labels = {name: new for name, new in labels.items() if new >= 0}
    atomic_write_text(tmp / LABELS_NAME, json.dumps(labels, indent=0))
    provenance = dict(
        origin,
        actions={k: getattr(o.cfg, k) for k in ACTIONS},
        removed=_removed(o.cfg, counts),
        report=f"{REPORT_DIR}/summary.json",
    )
    manifest = Manifest(
        num_classes=counts["kept_classes"],
        num_samples=counts["kept_samples"],
        shards=infos,
        image_ext=o.source.manifest.image_ext,
        source=origin["source"],
        label_map=LABELS_NAME,
        provenance=provenance,
    )
    atomic_write_text(tmp / "manifest.json", manifest.to_json())
    _fsync_tree(tmp)
    if out.exists() or out.is_symlink():  # rename would replace an empty folder made meanwhile
        raise ValueError(f"{out} appeared while cleaning: nothing written there")
    os.rename(tmp, out)
    print(
        f"wrote {counts['kept_samples']} samples of {counts['kept_classes']} classes in "
        f"{len(infos)} shards to {out} (removed {counts['removed_samples']} samples, "
        f"{counts['removed_classes']} classes); report: {out / REPORT_DIR / 'summary.json'}"
    )
    return summary


def _fsync_tree(folder: Path) -> None:
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
        else:
            fsync_dir(path)
    fsync_dir(folder)
