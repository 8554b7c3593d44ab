"""``dist-cosface clean RUN SHARDS OUT``: find label noise, duplicate identities and
train/evaluation overlap with a trained run, then write a report and a cleaned shard set.

Every rank runs :func:`clean`. Phases (each a collective; a failure on any rank stops all):

1. checks: OUT must not exist; SHARDS opened strictly; RUN's checkpoint verified (CRC32 of
   every file, shared over the ranks) and its class count compared with SHARDS;
2. the backbone (``load_backbone``) and this rank's class centers (a DCP read of its own rows);
3. every training sample embedded, each rank its run of shards (``embed.py``), and scored on
   the rank owning its class (``samples.py``): noisy samples, dominant sub-center shares;
4. duplicates: the dominant centers searched rank against rank (``search.py``), merged into
   sets by union-find; overlap: evaluation identities' mean embeddings against all centers;
5. the plan (every rank derives the same), the new shards written by all ranks into a
   temporary folder beside OUT, then rank 0 writes the report, ``labels.json`` and the
   manifest and renames the folder to OUT. Nothing is written in place, and OUT appears
   complete or not at all.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from dist_cosface.agreement import gather_objects, run_agreed
from dist_cosface.clean.centers import Centers, load_centers
from dist_cosface.clean.comm import all_reduce_
from dist_cosface.clean.config import CleanConfig
from dist_cosface.clean.embed import embed_samples, resolve_backend
from dist_cosface.clean.evalsets import identity_means, load_eval_set, load_ijb_identities
from dist_cosface.clean.outputs import publish
from dist_cosface.clean.samples import OwnerScores, score_samples
from dist_cosface.clean.search import center_neighbours, matches_above
from dist_cosface.clean.source import SourceSet, open_source, rank_shards
from dist_cosface.clean.unionfind import groups_of_pairs
from dist_cosface.clean.writer import Plan, kept_per_shard, write_new_shards
from dist_cosface.data.shards import MANIFEST_NAME
from dist_cosface.distributed import DistContext
from dist_cosface.engine.checkpoint import find_latest_checkpoint, read_meta, resolve_checkpoint
from dist_cosface.engine.checkpoint.reader import load_backbone
from dist_cosface.eval.ranks import gather_rows

log = logging.getLogger(__name__)

SEARCH_DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclass
class CleanJob:
    run: str  # run folder or checkpoint folder
    shards: str  # the shard set the run was trained on
    out: str  # the new shard set (must not exist)
    eval_sets: list[str] = field(default_factory=list)
    ijb: list[tuple[str, str]] = field(default_factory=list)  # (root, name)


@dataclass
class Findings:
    """Every finding, the same on every rank (gathered)."""

    noisy: list[tuple[int, int, float, float]]  # (sample, class, cos, angle)
    unreadable: list[tuple[int, str]]  # (sample, problem)
    low_share: list[tuple[int, int, int, float]]  # (class, samples, dominant, share)
    pairs: list[tuple[int, int, float]]  # (class a < class b, cos)
    merge_sets: list[list[int]]
    overlap: list[tuple[int, int, int, float]]  # (eval set, identity, class, cos)
    class_samples: np.ndarray  # [C] readable samples per class
    histograms: dict[str, np.ndarray]


def _check_out(out: Path) -> None:
    if out.exists() or out.is_symlink():
        raise ValueError(f"{out} exists: clean writes a new shard set and never overwrites")
    if out.parent.exists() and not out.parent.is_dir():
        raise ValueError(f"{out.parent} is not a folder")


def _checkpoint(run: str, source: SourceSet, ctx: DistContext) -> tuple[Path, dict]:
    latest = run_agreed(lambda: find_latest_checkpoint(run), ctx.group)
    if latest is None:
        raise ValueError(f"no complete checkpoint found at {run}")
    # strict: the latest checkpoint or an error naming the damaged file (an older one would
    # be another model); every file's CRC32, the reading shared over the ranks
    ckpt = resolve_checkpoint(latest, ctx)
    meta = run_agreed(lambda: read_meta(ckpt), ctx.group)
    if meta.get("num_classes") != source.num_classes:
        raise ValueError(
            f"{ckpt / 'meta.json'}: the run has {meta.get('num_classes')} classes, "
            f"{source.folder / MANIFEST_NAME} has {source.num_classes}: RUN was not trained on "
            "SHARDS"
        )
    return ckpt, meta


def _device(cfg: CleanConfig, ctx: DistContext) -> torch.device:
    if ctx.is_distributed or cfg.device == "cpu":
        return ctx.device if ctx.is_distributed else torch.device("cpu")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' but no CUDA device is available")
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _eval_sets(job: CleanJob) -> list:
    sets = [load_eval_set(p) for p in job.eval_sets]
    sets += [load_ijb_identities(root, name) for root, name in job.ijb]
    seen: dict[str, str] = {}
    for s in sets:
        if s.name in seen:
            raise ValueError(
                f"two evaluation sets are named {s.name!r}: {seen[s.name]}, {s.source}"
            )
        seen[s.name] = s.source
    return sets


def clean(job: CleanJob, cfg: CleanConfig, ctx: DistContext) -> dict:
    """Run the whole command on this rank (collective); returns the summary."""
    group, started = ctx.group, time.perf_counter()
    out = Path(job.out)
    run_agreed(lambda: _check_out(out), group)
    source = run_agreed(lambda: open_source(job.shards), group)
    ckpt, meta = _checkpoint(job.run, source, ctx)
    backbone, image_size = run_agreed(lambda: load_backbone(ckpt), group)
    device = run_agreed(lambda: _device(cfg, ctx), group)
    backbone = backbone.to(device)
    dim = int(meta["model"]["embedding_size"])
    centers = load_centers(ckpt, meta, dim, ctx)
    sets = run_agreed(lambda: _eval_sets(job), group)
    _phase(ctx, "checks and reading", started)
    embedded = run_agreed(
        lambda: embed_samples(backbone, source, cfg, image_size, device, ctx.rank, ctx.world_size),
        group,
    )
    _phase(ctx, f"embedding ({resolve_backend(cfg.backend)})", started)
    scores = score_samples(embedded, centers, group)
    model = _Model(backbone, image_size, device)
    findings = _find(cfg, centers, scores, embedded.unreadable, sets, model, group)
    _phase(ctx, "findings", started)
    plan = _plan(cfg, centers.num_classes, findings)
    outcome = Outcome(job, cfg, source, ckpt, meta, sets, findings, plan)
    summary = _write(outcome, ctx, embedded)
    _phase(ctx, "writing", started)
    return summary


def _phase(ctx: DistContext, what: str, started: float) -> None:
    if ctx.is_main:
        log.info("clean: %s done at %.1f s", what, time.perf_counter() - started)


@dataclass
class Outcome:
    """What the output is written from (the same on every rank)."""

    job: CleanJob
    cfg: CleanConfig
    source: SourceSet
    ckpt: Path
    meta: dict
    sets: list  # evalsets.EvalIdentities
    findings: Findings
    plan: Plan


@dataclass
class _Model:
    """The backbone and where it embeds (evaluation images)."""

    backbone: torch.nn.Module
    image_size: int
    device: torch.device


def _find(cfg, centers: Centers, scores: OwnerScores, unreadable, sets, model, group):
    """Collective: every finding, gathered so that every rank holds the same."""
    local_noisy, local_low = _sample_findings(cfg, centers, scores)
    dominant = centers.rows[torch.arange(centers.num_local), scores.dominant]  # [n, D]
    dominant = dominant.to(SEARCH_DTYPES[cfg.search_dtype])
    local_pairs, nearest = _local_pairs(cfg, centers, dominant, group)
    local = _local_histograms(scores.angles, nearest, scores.share)
    hists = {name: _sum_over_ranks(counts, group) for name, counts in local.items()}
    noisy, unread, low, found = zip(
        *gather_objects((local_noisy, unreadable, local_low, local_pairs), group)
    )
    pairs = _symmetric_pairs([p for part in found for p in part])
    overlap, hists["overlap"] = _overlap(cfg, centers, dominant, sets, model, group)
    return Findings(
        noisy=sorted(p for part in noisy for p in part),
        unreadable=sorted(p for part in unread for p in part),
        low_share=sorted(p for part in low for p in part),
        pairs=pairs,
        merge_sets=groups_of_pairs([(a, b) for a, b, _ in pairs]),
        overlap=overlap,
        class_samples=gather_rows(scores.class_counts, group).numpy(),
        histograms=hists,
    )


def _sample_findings(cfg, centers: Centers, scores: OwnerScores) -> tuple[list, list]:
    """This rank's noisy samples and low-share classes."""
    angles = scores.angles
    noisy = [
        (int(scores.indices[i]), int(scores.labels[i]), float(scores.cos[i]), float(angles[i]))
        for i in (angles > cfg.max_angle).nonzero().squeeze(1).tolist()
    ]
    low = (scores.share < cfg.min_dominant_share) & (scores.class_counts > 0)
    classes = [
        (
            centers.class_start + c,
            int(scores.class_counts[c]),
            int(scores.dominant[c]),
            float(scores.share[c]),
        )
        for c in low.nonzero().squeeze(1).tolist()
    ]
    return noisy, classes


def _local_pairs(cfg, centers: Centers, dominant, group) -> tuple[list, torch.Tensor]:
    """(this rank's classes' pairs above the threshold, each class's nearest other score)."""
    ids, near = center_neighbours(
        dominant, centers.starts, cfg.duplicate_cos, cfg.search_k, cfg.chunk_size, group
    )
    above = (near.scores > cfg.duplicate_cos) & (near.indices >= 0)
    pairs = [
        (int(ids[i]), int(near.indices[i, j]), float(near.scores[i, j]))
        for i, j in above.nonzero().tolist()
    ]
    return pairs, near.scores[:, 0] if near.scores.numel() else torch.zeros(0)


ANGLE_BINS, COS_BINS, SHARE_BINS = 180, 200, 20


def _local_histograms(angles, nearest, share) -> dict[str, np.ndarray]:
    share = share[~torch.isnan(share)]
    nearest = nearest[torch.isfinite(nearest)]
    return {
        "angles": np.histogram(angles.numpy(), ANGLE_BINS, (0.0, 180.0))[0],
        "nearest_center": np.histogram(
            nearest.double().clamp(-1, 1).numpy(), COS_BINS, (-1.0, 1.0)
        )[0],
        "dominant_share": np.histogram(share.numpy(), SHARE_BINS, (0.0, 1.0))[0],
    }


def _sum_over_ranks(counts: np.ndarray, group) -> np.ndarray:
    return all_reduce_(torch.from_numpy(counts.astype(np.int64)), group).numpy()


def _symmetric_pairs(found: list[tuple[int, int, float]]) -> list[tuple[int, int, float]]:
    """One entry per unordered pair; the score as the lower class's search found it."""
    best: dict[tuple[int, int], tuple[int, float]] = {}
    for query, other, score in found:
        key = (min(query, other), max(query, other))
        rank = 0 if query == key[0] else 1
        if key not in best or rank < best[key][0]:
            best[key] = (rank, score)
    return [(a, b, best[(a, b)][1]) for a, b in sorted(best)]


def _overlap(cfg, centers, dominant, sets, model: _Model, group) -> tuple[list, np.ndarray]:
    """(evaluation identities matching a class above the threshold, the best-match histogram)."""
    if not sets:
        return [], np.zeros(COS_BINS, dtype=np.int64)
    means = identity_means(
        model.backbone, sets, model.image_size, model.device, cfg.batch_size, cfg.flip, group
    )
    found = matches_above(
        means,
        dominant,
        centers.class_start,
        centers.num_classes,
        cfg.overlap_cos,
        cfg.search_k,
        cfg.chunk_size,
        group,
    )
    best = found.scores[:, 0].double().clamp(-1, 1).numpy()
    owner = [(s, i) for s, es in enumerate(sets) for i in range(len(es.identities))]
    rows = (found.scores > cfg.overlap_cos) & (found.indices >= 0)
    matches = [
        (*owner[q], int(found.indices[q, j]), float(found.scores[q, j]))
        for q, j in rows.nonzero().tolist()
    ]
    return matches, np.histogram(best, COS_BINS, (-1.0, 1.0))[0]


def _plan(cfg: CleanConfig, num_classes: int, f: Findings) -> Plan:
    rep = np.arange(num_classes)
    if cfg.merge_duplicates:
        for group in f.merge_sets:
            rep[group] = group[0]
    removed = np.zeros(num_classes, dtype=bool)
    if cfg.remove_overlap and f.overlap:
        hit = np.unique([c for _, _, c, _ in f.overlap])
        removed |= np.isin(rep, rep[hit])  # the whole merge set: one identity
    if cfg.drop_low_share and f.low_share:
        removed[[c for c, _, _, _ in f.low_share]] = True
    kept = f.class_samples.astype(np.int64).copy()
    if cfg.drop_noisy:
        np.subtract.at(kept, [c for _, c, _, _ in f.noisy], 1)
    alive = ~removed & (kept > 0)
    reps = np.unique(rep[alive])
    new_label = np.full(num_classes, -1, dtype=np.int64)
    new_label[alive] = np.searchsorted(reps, rep[alive])
    dropped = [s for s, _ in f.unreadable] + (
        [s for s, _, _, _ in f.noisy] if cfg.drop_noisy else []
    )
    return Plan(new_label, np.unique(np.asarray(dropped, dtype=np.int64)))


def _write(o: Outcome, ctx: DistContext, embedded) -> dict:
    """Collective: the new shards by every rank, then rank 0's files and the rename."""
    group = ctx.group
    first, stop = rank_shards(o.source.counts, ctx.world_size, ctx.rank)
    mine = kept_per_shard(o.source, o.plan, embedded.indices, embedded.labels, range(first, stop))
    kept_counts = [c for part in gather_objects(mine, group) for c in part]
    if sum(kept_counts) == 0:
        raise ValueError(
            f"{o.job.shards}: every sample would be removed (see the thresholds); nothing written"
        )
    shard_size = o.cfg.shard_size or max(o.source.counts)
    out = Path(o.job.out)
    token = gather_objects(_new_token() if ctx.is_main else None, group)[0]
    tmp = out.parent / f".{out.name}.partial-{token}"
    try:
        run_agreed(lambda: tmp.mkdir(parents=True) if ctx.is_main else None, group)
        written = run_agreed(
            lambda: write_new_shards(
                o.source, o.plan, kept_counts, shard_size, tmp, ctx.rank, ctx.world_size
            ),
            group,
        )
        infos = [
            info for _, info in sorted(w for part in gather_objects(written, group) for w in part)
        ]
        summary = run_agreed(lambda: publish(o, infos, tmp, out) if ctx.is_main else None, group)
    except BaseException:
        if ctx.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return summary or {}


def _new_token() -> str:
    import secrets

    return secrets.token_hex(6)
