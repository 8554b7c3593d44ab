"""Benchmark the duplicate-identity search of ``dist-cosface clean`` against faiss-cpu
``IndexFlatIP`` on the same centers, in the same run.

``--classes`` x ``--dim`` unit centers are drawn block by block from a seed (every rank draws
only its own slice, as ``tools/bench_eval.py`` does), with ``--planted`` duplicate pairs: a
query center's noisy copy put in another rank's slice. The search finds every pair of centers
whose cosine exceeds ``--threshold``:

* dist_cosface: ``--ranks`` spawned gloo ranks, each holding only its slice, the slices passed
  around the ring (``dist_cosface.clean.search.center_neighbours``), ``cores // ranks``
  threads each;
* faiss: one process, ``IndexFlatIP`` over all centers (exact), all cores, top-(k+1) per query
  (the same first k as ours), pairs above the threshold.

The full search scores every center against every other (C^2 D multiply-adds: hours for
C = 1M on two CPU cores), so ``--queries`` limits the query centers to the first
``queries / ranks`` of each rank's slice for BOTH searches; the time of a full search is
then about ``time * classes / queries`` for both (for ours, plus the ring transfers, which do
not grow with the queries). Memory growth: peak resident memory during the search minus the
resident memory with the centers already held, the largest over ranks, against the size of
the centers that process holds.

Example (the figures in docs/cleaning.md; faiss only for this benchmark: pip install faiss-cpu):
  python tools/bench_clean.py --classes 1000000 --dim 512 --ranks 2 --queries 2000
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # runnable as a plain script from a checkout (tools.spawn)
    sys.path.insert(0, str(REPO))

from dist_cosface.classifier.head import shard_chunk  # noqa: E402
from dist_cosface.clean.centers import class_starts  # noqa: E402
from dist_cosface.clean.search import center_neighbours  # noqa: E402
from tools.bench_eval import BLOCK, draw_rows, peak_bytes, reset_peak  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--classes", type=int, default=1_000_000, help="centers C")
    p.add_argument("--dim", type=int, default=512, help="center width D")
    p.add_argument("--ranks", type=int, default=2, help="gloo ranks of the sharded search")
    p.add_argument("--queries", type=int, default=0, help="query centers (0: all, the full search)")
    p.add_argument("--k", type=int, default=8, help="first neighbours kept (grown where needed)")
    p.add_argument("--threshold", type=float, default=0.7, help="duplicate cosine threshold")
    p.add_argument("--planted", type=int, default=20, help="planted duplicate pairs")
    p.add_argument("--chunk", type=int, default=16384, help="center rows scored at once")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-faiss", action="store_true", help="skip the faiss baseline")
    return p.parse_args(argv)


def slices(args) -> list[tuple[int, int]]:
    return [shard_chunk(args.classes, args.ranks, r) for r in range(args.ranks)]


def query_rows(args) -> list[int]:
    """Global ids of the query centers: the first queries/ranks of every rank's slice."""
    per_rank = args.queries // args.ranks if args.queries else None
    out = []
    for start, stop in slices(args):
        out.extend(range(start, stop if per_rank is None else min(stop, start + per_rank)))
    return out


def planted_pairs(args) -> list[tuple[int, int]]:
    """(query center, its copy in the next rank's slice beyond the query rows)."""
    queries = query_rows(args)
    bounds = slices(args)
    pairs = []
    for n in range(args.planted):
        a = queries[(n * 7919) % len(queries)]
        owner = next(r for r, (s, e) in enumerate(bounds) if s <= a < e)
        s, e = bounds[(owner + 1) % args.ranks]
        b = e - 1 - n  # the end of the next slice: never a query row at these sizes
        pairs.append((a, b))
    return pairs


def draw_centers(start: int, stop: int, args) -> torch.Tensor:
    """Rows ``[start, stop)`` of the seeded centers with the planted copies in place."""
    rows = draw_rows(start, stop, args.dim, args.seed)
    sources = {}
    for a, b in planted_pairs(args):
        if start <= b < stop:
            sources.setdefault(a // BLOCK, []).append((a, b))
    for block, pairs in sorted(sources.items()):
        lo = block * BLOCK
        drawn = draw_rows(lo, min(lo + BLOCK, args.classes), args.dim, args.seed)
        gen = torch.Generator().manual_seed(args.seed + block)
        for a, b in pairs:
            noisy = drawn[a - lo] + 0.02 * torch.randn(args.dim, generator=gen)
            rows[b - start] = torch.nn.functional.normalize(noisy, dim=0)
    return rows


def _rank_main(rank: int, world_size: int, args) -> tuple:
    """(seconds, memory growth, bytes held, pairs found) of this rank's search."""
    group = dist.group.WORLD
    start, stop = slices(args)[rank]
    centers = draw_centers(start, stop, args)
    mine = torch.tensor([q - start for q in query_rows(args) if start <= q < stop])
    starts = class_starts(args.classes, world_size)
    held = reset_peak()
    dist.barrier(group=group)
    t0 = time.perf_counter()
    ids, found = center_neighbours(
        centers, starts, args.threshold, args.k, args.chunk, group, query_rows=mine
    )
    dist.barrier(group=group)
    seconds = time.perf_counter() - t0
    grow = peak_bytes() - held
    above = (found.scores > args.threshold) & (found.indices >= 0)
    pairs = {
        (min(int(ids[i]), int(found.indices[i, j])), max(int(ids[i]), int(found.indices[i, j])))
        for i, j in above.nonzero().tolist()
    }
    return seconds, grow, centers.numel() * 4, pairs


def run_sharded(args) -> dict:
    from tools.spawn import RanksFailed, run_ranks

    threads = max(1, (os.cpu_count() or 1) // args.ranks)
    limits = {"timeout_s": 7200.0, "collective_timeout_s": 7200.0}
    try:  # a rank that dies fails the run instead of hanging it
        per_rank = run_ranks(args.ranks, _rank_main, args, threads=threads, **limits)
    except RanksFailed as exc:
        raise SystemExit(str(exc)) from None
    seconds, growth, held, pairs = zip(*per_rank)
    worst = max(range(args.ranks), key=lambda r: growth[r] / held[r])
    return {
        "seconds": max(seconds),
        "growth": growth[worst],
        "held": held[worst],
        "pairs": set().union(*pairs),
        "threads": threads,
    }


def run_faiss(args) -> dict | None:
    try:
        import faiss
    except ImportError:
        print("faiss not installed (pip install faiss-cpu): baseline skipped")
        return None
    faiss.omp_set_num_threads(os.cpu_count() or 1)
    centers = draw_centers(0, args.classes, args).numpy()
    ids = query_rows(args)
    queries = centers[ids]
    held = reset_peak()
    t0 = time.perf_counter()
    index = faiss.IndexFlatIP(args.dim)
    index.add(centers)
    t1 = time.perf_counter()
    scores, found = index.search(queries, args.k + 1)
    seconds = time.perf_counter() - t1
    pairs = {
        (min(q, int(j)), max(q, int(j)))
        for q, row_s, row_j in zip(ids, scores, found)
        for s, j in zip(row_s, row_j)
        if s > args.threshold and j != q and j >= 0
    }
    return {
        "seconds": seconds,
        "add_seconds": t1 - t0,
        "growth": peak_bytes() - held,
        "held": centers.nbytes,
        "pairs": pairs,
        "full": bool((scores[:, -1] > args.threshold).any()),
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    gib = 2.0**30
    nq = len(query_rows(args))
    print(
        f"centers {args.classes} x {args.dim} float32 ({args.classes * args.dim * 4 / gib:.2f} "
        f"GiB), {nq} query centers, {args.planted} planted duplicates, cosine > "
        f"{args.threshold}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}"
    )
    ours = run_sharded(args)
    planted = {(min(a, b), max(a, b)) for a, b in planted_pairs(args)}
    print(
        f"dist_cosface ring, {args.ranks} ranks x {ours['threads']} threads, chunk "
        f"{args.chunk}: {ours['seconds']:.2f} s ({nq / ours['seconds']:.1f} centers/s; full "
        f"search ~{ours['seconds'] * args.classes / nq / 3600:.2f} h), peak memory growth "
        f"{ours['growth'] / gib:.3f} GiB = {ours['growth'] / ours['held']:.2f}x the rank's "
        f"slice ({ours['held'] / gib:.2f} GiB); {len(ours['pairs'])} pairs, planted found "
        f"{len(planted & ours['pairs'])}/{len(planted)}"
    )
    if args.no_faiss:
        return
    base = run_faiss(args)
    if base is None:
        return
    print(
        f"faiss IndexFlatIP, 1 process x {os.cpu_count()} threads: {base['seconds']:.2f} s "
        f"(+{base['add_seconds']:.2f} s add; full search ~"
        f"{base['seconds'] * args.classes / nq / 3600:.2f} h), peak memory growth "
        f"{base['growth'] / gib:.3f} GiB = {base['growth'] / base['held']:.2f}x the centers; "
        f"{len(base['pairs'])} pairs{' (some top-k lists full)' if base['full'] else ''}"
    )
    print(
        f"time ratio dist_cosface / faiss: {ours['seconds'] / base['seconds']:.2f}x; same "
        f"pairs: {ours['pairs'] == base['pairs']}; load average {os.getloadavg()[0]:.1f}"
    )


if __name__ == "__main__":
    main()
