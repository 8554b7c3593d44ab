"""Sharded top-k search against a brute-force numpy reference, on 1, 2 and 3 gloo ranks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.distributed as dist

from dist_cosface.agreement import run_agreed
from dist_cosface.eval.ranks import gather_rows
from dist_cosface.eval.topk import local_topk, merge_topk, shard_range, sharded_topk
from tests.multiproc import on_subgroups, run_ranks


def numpy_topk(queries: np.ndarray, gallery: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Full score matrix; per row sort by (score descending, gallery index ascending)."""
    scores = queries.astype(np.float64) @ gallery.astype(np.float64).T
    idx = np.arange(gallery.shape[0])
    k = min(k, gallery.shape[0])
    top_i = np.stack([np.lexsort((idx, -row))[:k] for row in scores])
    return np.take_along_axis(scores, top_i, axis=1), top_i


def tied_data(seed: int = 0):
    """Small integer vectors: dot products are exact in float32 and ties are everywhere."""
    gen = np.random.default_rng(seed)
    queries = gen.integers(-2, 3, size=(7, 4)).astype(np.float32)
    gallery = gen.integers(-2, 3, size=(50, 4)).astype(np.float32)
    gallery[10] = gallery[40] = gallery[3]  # duplicate rows in different shards
    return queries, gallery


def random_data(seed: int = 1):
    gen = np.random.default_rng(seed)
    queries = gen.standard_normal((9, 8))
    gallery = gen.standard_normal((101, 8))
    return queries, gallery


def test_merge_topk_orders_ties_by_index():
    scores = torch.tensor([[0.5, 0.75, 0.5, 0.75, -1.0]])
    indices = torch.tensor([[7, 4, 2, 1, -1]])
    out = merge_topk(scores, indices, 4)
    assert out.indices.tolist() == [[1, 4, 2, 7]]
    assert out.scores.tolist() == [[0.75, 0.75, 0.5, 0.5]]


def test_shard_range_covers_everything_once():
    for n in (0, 1, 5, 23):
        for w in (1, 2, 3, 7):
            ranges = [shard_range(n, r, w) for r in range(w)]
            assert ranges[0][0] == 0 and ranges[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:], strict=False))


@pytest.mark.parametrize("chunk", [1, 3, 16, 1000])
@pytest.mark.parametrize("k", [1, 5, 50, 60])
def test_local_topk_matches_numpy_with_ties(chunk, k):
    queries, gallery = tied_data()
    ref_s, ref_i = numpy_topk(queries, gallery, k)
    out = local_topk(torch.from_numpy(queries), torch.from_numpy(gallery), k, chunk_size=chunk)
    kk = min(k, gallery.shape[0])
    assert out.indices[:, :kk].numpy().tolist() == ref_i.tolist()
    np.testing.assert_array_equal(out.scores[:, :kk].numpy(), ref_s.astype(np.float32))
    assert (out.indices[:, kk:] == -1).all()


def test_local_topk_rejects_bad_shapes():
    with pytest.raises(ValueError, match="queries"):
        local_topk(torch.zeros(2, 3), torch.zeros(4, 5), 2)
    with pytest.raises(ValueError, match="k must be"):
        local_topk(torch.zeros(2, 3), torch.zeros(4, 3), 0)


def _search_on_subgroups(rank, world_size, k, chunk):
    """Every world size 1..world_size in one spawn: a sub-group of the first ranks each time."""
    results = {}
    for name, (q, g) in {"tied": tied_data(), "random": random_data()}.items():

        def search(group, q=q, g=g):
            size = 1 if group is None else dist.get_world_size(group)
            start, stop = shard_range(g.shape[0], rank, size)
            out = sharded_topk(
                torch.from_numpy(q),
                torch.from_numpy(g[start:stop]),
                k,
                offset=start,
                group=group,
                chunk_size=chunk,
            )
            return out.scores, out.indices

        for size, found in on_subgroups(rank, world_size, search).items():
            results[(name, size)] = found
    return results


@pytest.mark.multiproc
def test_sharded_topk_equals_brute_force_on_1_2_3_ranks():
    k, chunk = 6, 4
    per_rank = run_ranks(3, _search_on_subgroups, k, chunk)
    for name, (q, g) in {"tied": tied_data(), "random": random_data()}.items():
        ref_s, ref_i = numpy_topk(q, g, k)
        one = per_rank[0][(name, 1)]
        for size in (1, 2, 3):
            for rank in range(size):
                scores, indices = per_rank[rank][(name, size)]
                assert indices.numpy().tolist() == ref_i.tolist(), (name, size, rank)
                np.testing.assert_allclose(scores.numpy(), ref_s, rtol=1e-6, atol=1e-6)
                # independent of the number of ranks: bit-identical to the 1-rank result
                assert torch.equal(indices, one[1]) and torch.equal(scores, one[0])


def _fail_on_rank_one(rank, world_size):
    def step():
        if rank == 1:
            raise ValueError("meta.txt line 3: 2 fields, expected 3")
        return torch.full((rank + 1, 2), float(rank))

    try:
        rows = run_agreed(step, dist.group.WORLD)
    except ValueError as exc:
        message = str(exc)
    else:
        message = None
    ok = run_agreed(lambda: torch.full((rank + 1, 2), float(rank)), dist.group.WORLD)
    return message, gather_rows(ok, dist.group.WORLD), rows if message is None else None


@pytest.mark.multiproc
def test_error_on_one_rank_stops_every_rank_with_its_message():
    out = run_ranks(3, _fail_on_rank_one, timeout_s=120)
    for message, gathered, _ in out:
        assert message is not None and "meta.txt line 3" in message
        expected = torch.cat([torch.full((r + 1, 2), float(r)) for r in range(3)])
        assert torch.equal(gathered, expected)
