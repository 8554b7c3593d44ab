"""MegaFace-style identification against a distractor set sharded over ranks.

Protocol (MegaFace Challenge 1 with FaceScrub probes): for every ordered pair (p, g) of two
different images of one probe identity, the gallery is g plus the first ``n`` distractors; the
rank of g is 1 + the number of distractors scoring at least s(p, g) against p (a tie counts
against the genuine match). CMC(r) is the fraction of pairs with rank <= r. Verification
TAR@FAR: genuine pairs are those same (p, g) pairs, impostor pairs are all (probe image,
distractor) pairs; the threshold is the score of the impostor ranked ``floor(FAR * N_imp)``
(0-based, descending), a pair is accepted when strictly above it (as ``roc.tar_at_far``).

Distributed: every rank holds all probe embeddings but only its own slice of the distractor
embeddings; it keeps, per probe, the 10 best distractor scores and, over all probes, the
``floor(FAR * N_imp) + 1`` best impostor scores; both are merged across ranks. Nothing of size
``[probes, distractors]`` is ever held.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.distributed as dist

from dist_cosface.agreement import run_agreed
from dist_cosface.eval.embedding import embed_images
from dist_cosface.eval.images import list_distractors, list_identity_folders
from dist_cosface.eval.ranks import all_gather_tensor, gather_rows, rank_slice
from dist_cosface.eval.topk import local_topk

CMC_RANKS = 10
DISTRACTOR_COUNTS = (10, 100, 1_000, 10_000, 100_000, 1_000_000)


def counts_that_fit(total: int, counts: tuple[int, ...] = DISTRACTOR_COUNTS) -> list[int]:
    """The standard distractor counts not above ``total`` (``[total]`` if none fits)."""
    if total < 1:
        raise ValueError("empty distractor set: no distractors to identify against")
    fit = [n for n in counts if n <= total]
    return fit or [total]


class _TopValues:
    """Running largest ``m`` values of every score block seen (flattened)."""

    def __init__(self, m: int, dtype: torch.dtype):
        self.m = m
        self.values = torch.empty(0, dtype=dtype)  # stays empty on a rank with no rows

    def __call__(self, scores: torch.Tensor) -> None:
        # once m values are held, only scores above the smallest of them can enter: one
        # comparison pass instead of a top-m selection over the whole block
        full = self.values.numel() >= self.m
        candidates = scores[scores > self.values[-1]] if full else scores.flatten()
        flat = torch.cat([self.values.to(scores.device), candidates])
        self.values = torch.topk(flat, min(self.m, flat.numel())).values  # sorted, descending


def _gather_padded(values: torch.Tensor, width: int, group) -> torch.Tensor:
    """All ranks' 1-D (or row) values padded with -inf to ``width`` columns, concatenated."""
    pad_shape = (*values.shape[:-1], width - values.shape[-1])
    padded = torch.cat([values, values.new_full(pad_shape, float("-inf"))], dim=-1)
    if group is None:
        return padded
    return torch.cat(all_gather_tensor(padded, group), dim=-1)


def genuine_pairs(embeddings: torch.Tensor, labels: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """(probe row, genuine score) of every ordered pair of two images of one identity."""
    labels_t = torch.as_tensor(labels)
    rows, scores = [], []
    for label in torch.unique(labels_t).tolist():
        members = (labels_t == label).nonzero().squeeze(1)
        sims = embeddings[members] @ embeddings[members].T
        off_diagonal = ~torch.eye(len(members), dtype=torch.bool)
        rows.append(members.unsqueeze(1).expand(-1, len(members))[off_diagonal])
        scores.append(sims[off_diagonal])
    return torch.cat(rows).numpy(), torch.cat(scores).double().numpy()


def identification_metrics(
    probes: torch.Tensor,
    labels: list[int],
    distractor_shard: torch.Tensor,
    offset: int,
    num_distractors: int,
    counts: list[int],
    fars: list[float],
    group: dist.ProcessGroup | None,
    chunk_size: int = 65536,
) -> dict[int, dict]:
    """Metrics per distractor count; embeddings must be L2-normalised.

    Every rank passes all probes and its slice of the distractors, starting at global index
    ``offset``; the first ``n`` distractors (global order) form the set of count ``n``.
    """
    probes = probes.double()  # float64 scores: see local_topk
    # keep one float64 score block near 256 MiB whatever the number of probes
    chunk_size = max(1, min(chunk_size, (1 << 25) // max(1, probes.shape[0])))
    rows, genuine = genuine_pairs(probes, labels)
    if genuine.size == 0:
        raise ValueError("no probe identity has two images: no genuine pairs to identify")
    results = {}
    for n in counts:
        if not 1 <= n <= num_distractors:
            raise ValueError(f"distractor count {n} not in [1, {num_distractors}]")
        local = distractor_shard[: max(0, min(n - offset, distractor_shard.shape[0]))]
        num_impostors = probes.shape[0] * n
        top_m = max(int(math.floor(far * num_impostors)) + 1 for far in fars)
        impostors = _TopValues(top_m, probes.dtype)
        best = local_topk(probes, local, CMC_RANKS, chunk_size=chunk_size, on_block=impostors)
        per_probe = _gather_padded(best.scores, CMC_RANKS, group)
        per_probe = torch.sort(per_probe, dim=1, descending=True).values[:, :CMC_RANKS]
        flat = _gather_padded(impostors.values, top_m, group)
        flat = torch.sort(flat, descending=True).values[:top_m].double().numpy()
        results[n] = _score(per_probe.double().numpy(), flat, rows, genuine, num_impostors, fars)
    return results


def _score(per_probe, top_impostors, rows, genuine, num_impostors, fars) -> dict:
    # distractors at least as close as the genuine match: -inf padding never counts
    ahead = (per_probe[rows] >= genuine[:, None]).sum(axis=1)
    cmc = [float(np.mean(ahead < r)) for r in range(1, CMC_RANKS + 1)]
    tar = {}
    for far in fars:
        threshold = top_impostors[int(math.floor(far * num_impostors))]
        tar[far] = float(np.mean(genuine > threshold))
    return {
        "rank1": cmc[0],
        "cmc": cmc,
        "tar_at_far": tar,
        "num_genuine_pairs": int(genuine.size),
        "num_impostor_pairs": int(num_impostors),
    }


def run_megaface(
    backbone: torch.nn.Module,
    probes: str,
    distractors: str,
    image_size: int,
    device: torch.device | str,
    group: dist.ProcessGroup | None,
    *,
    batch_size: int = 64,
    flip: bool = True,
    counts: list[int] | None = None,
    fars: tuple[float, ...] = (1e-6,),
    chunk_size: int = 65536,
) -> dict:
    """Embed probes and distractors over all ranks, then score; same dict on every rank.

    Result: ``{"num_probe_images", "num_probe_identities", "num_distractors",
    "by_count": {n: metrics}}`` (see :func:`identification_metrics`).
    """
    probe_refs, labels, names = run_agreed(lambda: list_identity_folders(probes), group)
    distractor_refs = run_agreed(lambda: list_distractors(distractors), group)
    total = len(distractor_refs)
    counts = run_agreed(lambda: _check_counts(counts, total), group)

    def embed(refs):
        start, stop = rank_slice(len(refs), group, batch_size)
        local = embed_images(backbone, refs[start:stop], image_size, device, batch_size, flip)
        return start, torch.nn.functional.normalize(local, dim=1)

    _, local_probes = run_agreed(lambda: embed(probe_refs), group)
    probe_emb = gather_rows(local_probes, group)
    offset, local_distractors = run_agreed(lambda: embed(distractor_refs), group)
    by_count = identification_metrics(
        probe_emb, labels, local_distractors, offset, total, counts, list(fars), group, chunk_size
    )
    return {
        "num_probe_images": len(probe_refs),
        "num_probe_identities": len(names),
        "num_distractors": total,
        "by_count": by_count,
    }


def _check_counts(counts: list[int] | None, total: int) -> list[int]:
    if counts is None:
        return counts_that_fit(total)
    too_many = [n for n in counts if not 1 <= n <= total]
    if too_many:
        raise ValueError(f"distractor counts {too_many} not in [1, {total}] (the set's size)")
    return sorted(counts)
