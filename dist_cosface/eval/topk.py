"""Exact top-k search of queries against a gallery sharded over ranks.

The classifier's pattern applied to identification: every rank holds one contiguous slice of
the gallery, scores all queries against it chunk by chunk while keeping a running top-k, and
the per-rank lists are merged across ranks. No rank ever holds the whole gallery or a full
``[queries, gallery]`` score matrix; peak extra memory is ``queries x chunk_size`` scores.

Order contract (what makes results independent of the number of ranks): higher score first,
equal scores by lower global gallery index.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

# shard_range is part of this module's interface: the gallery split sharded_topk expects
from dist_cosface.eval.ranks import all_gather_tensor
from dist_cosface.eval.ranks import shard_range as shard_range


@dataclass
class TopK:
    scores: torch.Tensor  # [Q, k], descending per row
    indices: torch.Tensor  # [Q, k] int64 global gallery indices; -1 marks "no entry"


def merge_topk(scores: torch.Tensor, indices: torch.Tensor, k: int) -> TopK:
    """The best ``k`` of each row of candidate lists, ties broken by lower index.

    Candidates with index -1 (padding) sort last. Two stable sorts give the lexicographic
    order (score descending, index ascending) exactly, whatever order the candidates came in.
    """
    keys = torch.where(indices < 0, torch.iinfo(torch.int64).max, indices)
    by_index = torch.argsort(keys, dim=1, stable=True)
    scores, indices = scores.gather(1, by_index), indices.gather(1, by_index)
    ranked = torch.where(indices < 0, float("-inf"), scores)
    by_score = torch.argsort(ranked, dim=1, descending=True, stable=True)[:, :k]
    return TopK(scores.gather(1, by_score), indices.gather(1, by_score))


def _chunk_topk(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k columns of one score block with exact index tie-breaking.

    ``torch.topk`` picks arbitrarily among values equal to the k-th one; that only matters
    when some value outside the chosen k equals the k-th, i.e. when the (k+1)-th largest
    equals the k-th (one extra column of ``topk`` tells, no pass over the block). Such rows
    (rare with real embeddings) are redone: everything above the k-th value plus the
    lowest-index ties.
    """
    extra = 1 if scores.shape[1] > k else 0
    values, cols = torch.topk(scores, k + extra, dim=1)
    if not extra:
        return values, cols
    ambiguous = values[:, k] == values[:, k - 1]
    values, cols = values[:, :k].contiguous(), cols[:, :k].contiguous()
    if bool(ambiguous.any()):
        rows = ambiguous.nonzero().squeeze(1)
        block, kth = scores[rows], values[rows, k - 1 :]
        above, tied = block > kth, block == kth
        need = k - above.sum(dim=1, keepdim=True)
        take = above | (tied & (tied.cumsum(dim=1) <= need))
        # exactly k True per row: nonzero lists them row by row, columns ascending
        fixed = take.nonzero()[:, 1].view(len(rows), k)
        cols[rows] = fixed
        values[rows] = block.gather(1, fixed)
    return values, cols


def local_topk(
    queries: torch.Tensor,
    gallery: torch.Tensor,
    k: int,
    *,
    offset: int = 0,
    chunk_size: int = 65536,
    on_block: Callable[[torch.Tensor], None] | None = None,
) -> TopK:
    """Top-k of ``queries @ gallery.T`` over this rank's gallery slice (global index offset).

    ``on_block`` sees every ``[Q, chunk]`` score block, for statistics taken in the same pass.
    Scores are computed in the queries' dtype: float64 queries over a float32 gallery keep
    the gallery's memory and make the scores' rounding negligible, so results hold even for
    near-equal scores (which float32 sums may order differently for other chunk shapes).
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if queries.dim() != 2 or gallery.dim() != 2 or queries.shape[1] != gallery.shape[1]:
        raise ValueError(f"queries {tuple(queries.shape)} vs gallery {tuple(gallery.shape)}")
    q = queries.shape[0]
    best = TopK(
        torch.full((q, k), float("-inf"), dtype=queries.dtype, device=queries.device),
        torch.full((q, k), -1, dtype=torch.int64, device=queries.device),
    )
    for start in range(0, gallery.shape[0], chunk_size):
        block = gallery[start : start + chunk_size].to(queries.dtype)  # scores in queries' dtype
        scores = queries @ block.T
        if on_block is not None:
            on_block(scores)
        values, cols = _chunk_topk(scores, min(k, block.shape[0]))
        best = merge_topk(
            torch.cat([best.scores, values], dim=1),
            torch.cat([best.indices, cols + (offset + start)], dim=1),
            k,
        )
    return best


def gather_topk(local: TopK, k: int, group: dist.ProcessGroup | None) -> TopK:
    """Merge every rank's top-k lists into the global top-k (same result on every rank)."""
    if group is None:
        return merge_topk(local.scores, local.indices, k)
    scores = all_gather_tensor(local.scores, group)
    indices = all_gather_tensor(local.indices, group)
    return merge_topk(torch.cat(scores, dim=1), torch.cat(indices, dim=1), k)


def sharded_topk(
    queries: torch.Tensor,
    gallery_shard: torch.Tensor,
    k: int,
    *,
    offset: int,
    group: dist.ProcessGroup | None,
    chunk_size: int = 65536,
) -> TopK:
    """Global top-k when each rank passes the same queries and its own gallery slice.

    ``offset`` is the global index of the slice's first row (see :func:`shard_range`).
    """
    local = local_topk(queries, gallery_shard, k, offset=offset, chunk_size=chunk_size)
    return gather_topk(local, k, group)
