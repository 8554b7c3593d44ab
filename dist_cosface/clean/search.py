"""Exact neighbour search among class centers sharded over ranks, on ``eval/topk.py``.

Duplicates (every center against every other): each rank's centers are the queries, and the
center blocks travel around the ring of ranks, so after ``world`` steps every rank has scored
its queries against every block with ``local_topk`` while holding at most three blocks (its
own, the one it scores and the one arriving; two with two ranks). Overlap
(a few replicated queries): ``sharded_topk`` against each rank's own block. No ``[C, C]``
score matrix exists anywhere; a score block is at most ``query_rows x chunk_size``.

The search is exact for a threshold: a row whose k-th neighbour still scores above it may have
more, so such rows are searched again with four times the k until no list is full.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from dist_cosface.clean.comm import any_rank, pass_along_ring
from dist_cosface.eval.topk import TopK, local_topk, merge_topk, sharded_topk

SCORE_BLOCK = 1 << 24  # score-block elements (query rows x center rows) computed at once


def _ring_pass(
    queries: torch.Tensor,
    block: torch.Tensor,
    starts: list[int],
    k: int,
    chunk_size: int,
    group: dist.ProcessGroup | None,
) -> TopK:
    """Top-k of every query over all ranks' blocks (``block`` is this rank's)."""
    rank, world = (0, 1) if group is None else (dist.get_rank(group), dist.get_world_size(group))
    best = TopK(
        torch.full((len(queries), k), float("-inf"), dtype=queries.dtype),
        torch.full((len(queries), k), -1, dtype=torch.int64),
    )
    held, owner = block, rank
    for step in range(world):
        if step:  # the block of rank ``owner`` arrives from the previous rank
            owner = (owner - 1) % world
            held = pass_along_ring(held, starts[owner + 1] - starts[owner], group)
        found = _blockwise_topk(queries, held, k, starts[owner], chunk_size)
        best = merge_topk(
            torch.cat([best.scores, found.scores], 1),
            torch.cat([best.indices, found.indices], 1),
            k,
        )
    return best


def _blockwise_topk(
    queries: torch.Tensor, held: torch.Tensor, k: int, offset: int, chunk_size: int
) -> TopK:
    """``local_topk`` over query chunks sized so that a score block stays near SCORE_BLOCK."""
    chunk = max(1, min(chunk_size, held.shape[0]))
    rows = max(1, SCORE_BLOCK // chunk)
    parts = [
        local_topk(queries[i : i + rows], held, k, offset=offset, chunk_size=chunk)
        for i in range(0, len(queries), rows)
    ]
    if not parts:
        return local_topk(queries, held, k, offset=offset, chunk_size=chunk)
    return TopK(torch.cat([p.scores for p in parts]), torch.cat([p.indices for p in parts]))


def _drop_self(found: TopK, ids: torch.Tensor, k: int) -> TopK:
    own = found.indices == ids.unsqueeze(1)
    scores = found.scores.masked_fill(own, float("-inf"))
    return merge_topk(scores, found.indices.masked_fill(own, -1), k)


def center_neighbours(
    centers: torch.Tensor,
    starts: list[int],
    threshold: float,
    k: int,
    chunk_size: int,
    group: dist.ProcessGroup | None,
    *,
    query_rows: torch.Tensor | None = None,
) -> tuple[torch.Tensor, TopK]:
    """(query class ids, their neighbours among all other centers) with every neighbour above
    ``threshold`` listed (collective; ``centers``: this rank's ``[n, D]`` unit rows, classes
    from ``starts[rank]``). ``query_rows``: search for these local rows only (benchmarks).

    Scores are computed in ``centers``' dtype.
    """
    rank = 0 if group is None else dist.get_rank(group)
    rows = torch.arange(len(centers)) if query_rows is None else query_rows
    ids = rows + starts[rank]
    total = starts[-1]
    k = max(1, min(k, total - 1))
    queries = centers if query_rows is None else centers[rows]  # no copy of a whole block
    found = _drop_self(_ring_pass(queries, centers, starts, k + 1, chunk_size, group), ids, k)
    full = _full_rows(found, threshold, k, total)
    while any_rank(bool(full.any()), group):
        k = min(4 * k, total - 1)
        again = _ring_pass(centers[rows[full]], centers, starts, k + 1, chunk_size, group)
        again = _drop_self(again, ids[full], k)
        found = _widen(found, k)
        found.scores[full], found.indices[full] = again.scores, again.indices
        still = torch.zeros_like(full)
        still[full] = _full_rows(again, threshold, k, total)
        full = still
    return ids, found


def _full_rows(found: TopK, threshold: float, k: int, total: int) -> torch.Tensor:
    """Rows whose k-th neighbour is above the threshold, while more neighbours exist."""
    if k >= total - 1 or found.scores.shape[1] < k:
        return torch.zeros(len(found.scores), dtype=torch.bool)
    return found.scores[:, k - 1] > threshold


def _widen(found: TopK, k: int) -> TopK:
    """Pad lists to ``k`` columns (-inf, -1) so re-searched rows fit."""
    extra = k - found.scores.shape[1]
    if extra <= 0:
        return found
    q = len(found.scores)
    return TopK(
        torch.cat([found.scores, found.scores.new_full((q, extra), float("-inf"))], 1),
        torch.cat([found.indices, found.indices.new_full((q, extra), -1)], 1),
    )


def matches_above(
    queries: torch.Tensor,
    centers: torch.Tensor,
    class_start: int,
    total: int,
    threshold: float,
    k: int,
    chunk_size: int,
    group: dist.ProcessGroup | None,
) -> TopK:
    """Every center above ``threshold`` for each replicated query (collective), best first."""
    k = max(1, min(k, total))
    while True:
        found = sharded_topk(
            queries.to(centers.dtype),
            centers,
            k,
            offset=class_start,
            group=group,
            chunk_size=chunk_size,
        )
        # the same lists on every rank after the merge: every rank takes the same branch
        if k >= total or not bool((found.scores[:, k - 1] > threshold).any()):
            return found
        k = min(4 * k, total)
