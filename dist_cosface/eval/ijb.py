"""IJB-B / IJB-C template-based 1:1 verification and 1:N identification.

The files are read by :mod:`dist_cosface.eval.ijb_meta` (their layout is described there and
in docs/evaluation.md).

Template feature: each image is aligned with its landmarks and embedded (+ its mirror image),
L2-normalised, optionally weighted by its detector score, averaged within its media id, the
media averages are averaged, and the result L2-normalised. Pair score: cosine of the two
template features.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from dist_cosface.agreement import run_agreed
from dist_cosface.distributed import GroupMember
from dist_cosface.eval.embedding import embed_images
from dist_cosface.eval.ijb_meta import IJBSet, read_ijb
from dist_cosface.eval.ranks import gather_rows, rank_slice
from dist_cosface.eval.roc import roc_auc, save_roc_png, tar_at_far

VERIFICATION_FARS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
IDENTIFICATION_FPIRS = (1e-2, 1e-1)
CMC_RANKS = (1, 5, 10)


@dataclass
class TemplateFeatures:
    ids: np.ndarray  # [T] template ids, ascending
    features: torch.Tensor  # [T, D] float64, L2-normalised

    def rows(self, templates) -> np.ndarray:
        return np.searchsorted(self.ids, np.asarray(templates))


def template_features(
    embeddings: torch.Tensor, ijb: IJBSet, usable: np.ndarray, detector_score: bool
) -> TemplateFeatures:
    """Media pooling of the usable images (group sums, no per-template loop over images)."""
    emb = torch.nn.functional.normalize(embeddings.double(), dim=1)
    if detector_score:
        emb = emb * torch.from_numpy(ijb.scores).double().unsqueeze(1)
    ids, first = np.unique(ijb.templates, return_index=True)
    keep = np.flatnonzero(usable)
    empty = np.setdiff1d(ids, ijb.templates[keep])
    if empty.size:
        t = int(empty[0])
        raise ValueError(f"{ijb.image_lines[first[ids == t][0]]}: template {t} has no usable image")
    # one group per (template, media): its mean, then the mean of the template's groups
    pairs = np.stack([ijb.templates[keep], ijb.media[keep]], axis=1)
    groups, group_of = np.unique(pairs, axis=0, return_inverse=True)
    group_of = torch.from_numpy(group_of.reshape(-1))
    sums = torch.zeros((len(groups), emb.shape[1]), dtype=emb.dtype)
    sums.index_add_(0, group_of, emb[torch.from_numpy(keep)])
    counts = torch.bincount(group_of, minlength=len(groups)).unsqueeze(1)
    media_means = sums / counts
    template_of = torch.from_numpy(np.searchsorted(ids, groups[:, 0]))
    pooled = torch.zeros((len(ids), emb.shape[1]), dtype=emb.dtype)
    pooled.index_add_(0, template_of, media_means)
    pooled /= torch.bincount(template_of, minlength=len(ids)).unsqueeze(1)
    zero = np.flatnonzero((pooled.norm(dim=1) == 0).numpy())
    if detector_score and zero.size:  # every usable image weighted 0: no direction to compare
        t = int(ids[zero[0]])
        line = ijb.image_lines[first[zero[0]]]
        raise ValueError(f"{line}: template {t}: every usable image has detector score 0")
    return TemplateFeatures(ids, torch.nn.functional.normalize(pooled, dim=1))


def template_pair_scores(
    feats: TemplateFeatures,
    pairs: np.ndarray,
    rank: int = 0,
    world_size: int = 1,
    block: int = 2048,
) -> tuple[np.ndarray, np.ndarray]:
    """(pair positions, cosines) of the pairs whose first template falls in this rank's blocks.

    IJB-C has 15.7M pairs over 23k templates: one ``[block, T]`` Gram block per ``block``
    first templates, read at the pairs' positions, costs far less memory traffic than
    gathering two feature rows per pair. Blocks go round-robin to ranks; fixed block
    boundaries give every score the same rounding whatever the number of ranks.
    """
    a, b = feats.rows(pairs[:, 0]), feats.rows(pairs[:, 1])
    order = np.argsort(a, kind="stable")
    a_sorted = a[order]
    positions, scores = [np.empty(0, dtype=np.int64)], [np.empty(0)]
    for k, start in enumerate(range(0, len(feats.ids), block)):
        lo, hi = np.searchsorted(a_sorted, [start, start + block])
        if k % world_size != rank or lo == hi:
            continue
        chosen = order[lo:hi]
        gram = feats.features[start : start + block] @ feats.features.T
        positions.append(chosen)
        scores.append(gram[a[chosen] - start, b[chosen]].numpy())
    return np.concatenate(positions), np.concatenate(scores)


def verification(scores: np.ndarray, labels: np.ndarray, fars=VERIFICATION_FARS) -> dict:
    return {
        "tar_at_far": {far: tar_at_far(scores, labels, far) for far in fars},
        "roc_auc": roc_auc(scores, labels),
        "num_pairs": int(scores.size),
        "num_genuine": int(labels.sum()),
    }


def _best_per_subject(sims: torch.Tensor, subject_of: torch.Tensor, num: int) -> torch.Tensor:
    """``[probes, gallery templates]`` scores -> ``[probes, subjects]`` best template score."""
    out = torch.full((sims.shape[0], num), float("-inf"), dtype=sims.dtype)
    return out.scatter_reduce(1, subject_of.expand(sims.shape[0], -1), sims, reduce="amax")


def identification(
    feats: TemplateFeatures,
    gallery: dict[int, int],
    probes: dict[int, int],
    fpirs=IDENTIFICATION_FPIRS,
) -> dict:
    """Closed-set CMC over mated probes, open-set TPIR at FPIR over all probes.

    A subject's score is its best gallery template's. Rank of the true subject: 1 + subjects
    scoring at least as high (ties count against). TPIR(FPIR): the threshold is the
    ``floor(FPIR * N_nonmated)``-th (0-based, descending) best score of non-mated probes; a
    mated probe counts when its true subject is rank 1 and scores above the threshold.
    """
    subjects = sorted(set(gallery.values()))
    col = {s: i for i, s in enumerate(subjects)}
    g_ids = sorted(gallery)
    g_feat = feats.features[feats.rows(g_ids)]
    g_subject = torch.tensor([col[gallery[t]] for t in g_ids])
    p_ids = sorted(probes)
    mated = np.array([probes[t] in col for t in p_ids])
    if not mated.any() or mated.all():
        raise ValueError("1:N needs both mated and non-mated probe templates")
    p_rows = feats.rows(p_ids)
    per_subject = torch.cat(
        [
            _best_per_subject(feats.features[rows] @ g_feat.T, g_subject, len(subjects))
            for rows in np.array_split(p_rows, max(1, len(p_rows) // 4096))
        ]
    )
    true_col = torch.tensor([col.get(probes[t], 0) for t in p_ids])
    true_score = per_subject.gather(1, true_col.unsqueeze(1)).squeeze(1)
    ahead = (per_subject >= true_score.unsqueeze(1)).sum(1).numpy() - 1
    ranks, true_np = ahead[mated] + 1, true_score.numpy()[mated]
    best = per_subject.max(dim=1).values.numpy()
    nonmated = np.sort(best[~mated])[::-1]
    tpir = {}
    for fpir in fpirs:
        threshold = nonmated[int(math.floor(fpir * nonmated.size))]
        tpir[fpir] = float(np.mean((ranks == 1) & (true_np > threshold)))
    return {
        "cmc": {r: float(np.mean(ranks <= r)) for r in CMC_RANKS},
        "tpir_at_fpir": tpir,
        "num_mated": int(mated.sum()),
        "num_nonmated": int((~mated).sum()),
    }


def run_ijb(
    backbone: torch.nn.Module,
    root: str | Path,
    name: str,
    image_size: int,
    device: torch.device | str,
    group: dist.ProcessGroup | None,
    *,
    batch_size: int = 64,
    flip: bool = True,
    detector_score: bool = False,
    fars=VERIFICATION_FARS,
    roc_path: str | Path | None = None,
) -> dict:
    """Images embedded over all ranks, then scored (same result on every rank)."""
    ijb = run_agreed(lambda: read_ijb(root, name), group)
    start, stop = rank_slice(len(ijb.images), group, batch_size)
    skipped: list[int] = []
    local = run_agreed(
        lambda: embed_images(
            backbone, ijb.images[start:stop], image_size, device, batch_size, flip, skipped
        ),
        group,
    )
    usable_local = torch.ones(stop - start, dtype=torch.bool)
    usable_local[skipped] = False
    embeddings = gather_rows(local, group)
    usable = gather_rows(usable_local, group).numpy()
    features = template_features(embeddings, ijb, usable, detector_score)
    member = GroupMember.of(group)  # pairs are scored over the ranks too
    positions, local_scores = template_pair_scores(
        features, ijb.pairs, member.rank, member.world_size
    )
    scores = np.empty(len(ijb.pairs))
    scores[gather_rows(torch.from_numpy(positions), group).numpy()] = gather_rows(
        torch.from_numpy(local_scores), group
    ).numpy()
    result = {
        "num_images": len(ijb.images),
        "skipped_images": int((~usable).sum()),
        "num_templates": len(features.ids),
        "verification": verification(scores, ijb.labels, fars),
    }
    if roc_path is not None:
        if group is None or dist.get_rank(group) == 0:
            save_roc_png(scores, ijb.labels, roc_path, f"{name} 1:1")
        result["roc_png"] = str(roc_path)
    if ijb.galleries:
        result["identification"] = {
            g: identification(features, gallery, ijb.probes) for g, gallery in ijb.galleries.items()
        }
    return result
