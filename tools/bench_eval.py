"""Benchmark sharded exact identification against faiss-cpu ``IndexFlatIP`` (same data, same run).

A synthetic gallery of ``--gallery`` x ``--dim`` L2-normalised float32 embeddings and
``--queries`` query embeddings are drawn block by block from a seed, so every rank can draw
its own slice without the others. Two searches of the same top-``--k``:

* dist_cosface: ``--ranks`` spawned gloo ranks, each holding only its gallery slice, scoring
  all queries against it in chunks of ``--chunk`` rows with a running top-k, then merging the
  per-rank lists (``dist_cosface.eval.topk.sharded_topk``). Each rank uses
  ``cores // ranks`` threads.
* faiss: one process, ``IndexFlatIP`` over the whole gallery (exact search), all cores.

Speed: queries/s of the search alone (the gallery already in memory). Memory growth: peak
resident memory during index build + search minus the resident memory with the gallery
already held (VmHWM reset through /proc/self/clear_refs), the largest over ranks, compared
with the size of the gallery part that process holds. Results of the two are compared:
top-1 agreement and the largest top-k score difference.

Example (the figures in docs/evaluation.md):
  python tools/bench_eval.py --gallery 1000000 --dim 512 --queries 1000 --ranks 2
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

from dist_cosface.eval.ijb import (  # noqa: E402
    identification,
    template_features,
    template_pair_scores,
)
from dist_cosface.eval.ijb_meta import IJBSet  # noqa: E402
from dist_cosface.eval.megaface import identification_metrics  # noqa: E402
from dist_cosface.eval.topk import local_topk, shard_range, sharded_topk  # noqa: E402

BLOCK = 65536  # rows drawn per generator seed: slices do not depend on the number of ranks


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--gallery", type=int, default=1_000_000, help="gallery rows G")
    p.add_argument("--dim", type=int, default=512, help="embedding width D")
    p.add_argument("--queries", type=int, default=1000, help="queries Q")
    p.add_argument("--k", type=int, default=10, help="top-k kept per query")
    p.add_argument("--ranks", type=int, default=2, help="gloo ranks of the sharded search")
    p.add_argument("--chunk", type=int, default=16384, help="gallery rows scored at once")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-faiss", action="store_true", help="skip the faiss baseline")
    p.add_argument(
        "--protocols",
        action="store_true",
        help="instead: time the MegaFace and IJB scoring steps in this process",
    )
    return p.parse_args(argv)


def draw_rows(start: int, stop: int, dim: int, seed: int) -> torch.Tensor:
    """Rows ``[start, stop)`` of the seeded gallery, L2-normalised float32."""
    out = torch.empty((stop - start, dim), dtype=torch.float32)
    for block in range(start // BLOCK, (stop + BLOCK - 1) // BLOCK if stop > start else 0):
        lo, hi = block * BLOCK, (block + 1) * BLOCK
        gen = torch.Generator().manual_seed(seed * 1_000_003 + block)
        rows = torch.randn((BLOCK, dim), generator=gen)
        a, b = max(lo, start), min(hi, stop)
        out[a - start : b - start] = rows[a - lo : b - lo]
    return torch.nn.functional.normalize(out, dim=1)


def draw_queries(args) -> torch.Tensor:
    """Queries near gallery rows (noisy copies), so the top-1 is meaningful."""
    gen = torch.Generator().manual_seed(args.seed + 7)
    targets = torch.randint(0, args.gallery, (args.queries,), generator=gen)
    rows = torch.empty((args.queries, args.dim))
    for block in torch.unique(targets // BLOCK).tolist():  # draw each needed block once
        lo = block * BLOCK
        rows_in = draw_rows(lo, min(lo + BLOCK, args.gallery), args.dim, args.seed)
        mine = (targets // BLOCK == block).nonzero().squeeze(1)
        rows[mine] = rows_in[targets[mine] - lo]
    noisy = rows + 0.05 * torch.randn(rows.shape, generator=gen)
    return torch.nn.functional.normalize(noisy, dim=1)


def _status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status")


def reset_peak() -> int:
    """Make the peak resident size equal to the current one; returns the current bytes."""
    Path("/proc/self/clear_refs").write_text("5")
    return _status_kib("VmRSS") * 1024


def peak_bytes() -> int:
    return _status_kib("VmHWM") * 1024


def _rank_main(rank: int, world_size: int, args) -> tuple:
    """(seconds, memory growth, bytes held, top-k scores, top-k indices) of this rank's search."""
    group = dist.group.WORLD
    start, stop = shard_range(args.gallery, rank, world_size)
    shard = draw_rows(start, stop, args.dim, args.seed)
    queries = draw_queries(args)
    held = reset_peak()
    dist.barrier(group=group)
    t0 = time.perf_counter()
    top = sharded_topk(queries, shard, args.k, offset=start, group=group, chunk_size=args.chunk)
    dist.barrier(group=group)
    seconds = time.perf_counter() - t0
    grow = peak_bytes() - held
    return seconds, grow, shard.numel() * 4, top.scores, top.indices


def run_sharded(args) -> dict:
    from tools.spawn import RanksFailed, run_ranks

    threads = max(1, (os.cpu_count() or 1) // args.ranks)
    try:  # a rank that dies fails the run instead of hanging it
        per_rank = run_ranks(
            args.ranks,
            _rank_main,
            args,
            timeout_s=1800.0,
            threads=threads,
            collective_timeout_s=1800.0,
        )
    except RanksFailed as exc:
        raise SystemExit(str(exc)) from None
    worst = max(per_rank, key=lambda r: r[1] / r[2])
    return {
        "seconds": max(r[0] for r in per_rank),
        "growth": worst[1],
        "held": worst[2],
        "scores": per_rank[0][3],
        "indices": per_rank[0][4],
        "threads": threads,
    }


def run_faiss(args) -> dict:
    import faiss

    faiss.omp_set_num_threads(os.cpu_count() or 1)
    gallery = draw_rows(0, args.gallery, args.dim, args.seed).numpy()
    queries = draw_queries(args).numpy()
    held = reset_peak()
    t0 = time.perf_counter()
    index = faiss.IndexFlatIP(args.dim)
    index.add(gallery)
    t1 = time.perf_counter()
    scores, indices = index.search(queries, args.k)
    seconds = time.perf_counter() - t1
    return {
        "seconds": seconds,
        "add_seconds": t1 - t0,
        "growth": peak_bytes() - held,
        "held": gallery.nbytes,
        "scores": torch.from_numpy(scores),
        "indices": torch.from_numpy(indices),
    }


def time_protocols(args) -> None:
    """MegaFace metrics (--queries probes x --gallery distractors) and IJB scoring steps."""
    import numpy as np

    probes, labels = draw_queries(args), [i // 10 for i in range(args.queries)]
    gallery = draw_rows(0, args.gallery, args.dim, args.seed)
    for name, fn in [
        (
            "MegaFace identification_metrics (float64)",
            lambda: identification_metrics(
                probes,
                labels,
                gallery,
                0,
                args.gallery,
                [args.gallery],
                [1e-6, 1e-3],
                None,
                args.chunk,
            ),
        ),
        ("local_topk float32", lambda: local_topk(probes, gallery, 10, chunk_size=args.chunk)),
        (
            "local_topk float64",
            lambda: local_topk(probes.double(), gallery, 10, chunk_size=args.chunk),
        ),
    ]:
        t0 = time.perf_counter()
        fn()
        print(f"{name}: {args.queries} x {args.gallery}: {time.perf_counter() - t0:.1f} s")
    rng = np.random.default_rng(args.seed)
    n, t, p = 100_000, 5_000, 2_000_000
    templates = np.sort(rng.integers(0, t, n))
    pairs = np.stack([rng.integers(0, t, p), rng.integers(0, t, p)], axis=1)
    ijb = IJBSet(
        "synthetic",
        [],
        templates,
        templates * 10 + rng.integers(0, 3, n),
        rng.random(n),
        ["-"] * n,
        pairs,
        rng.random(p) < 0.01,
    )
    t0 = time.perf_counter()
    feats = template_features(torch.randn(n, args.dim), ijb, np.ones(n, bool), True)
    t1 = time.perf_counter()
    template_pair_scores(feats, pairs)
    t2 = time.perf_counter()
    gallery_t = {g: g for g in range(0, t, 3)}
    probes_t = {q: (q - 1 if q % 2 else 10**6 + q) for q in range(1, t, 3)}
    identification(feats, gallery_t, probes_t)
    t3 = time.perf_counter()
    print(f"IJB media pooling, {n} images / {t} templates: {t1 - t0:.1f} s")
    print(f"IJB pair scores, {p} pairs: {t2 - t1:.1f} s")
    print(f"IJB 1:N, {len(probes_t)} probes x {len(gallery_t)} gallery templates: {t3 - t2:.1f} s")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.protocols:
        time_protocols(args)
        return
    gib = 2.0**30
    print(
        f"gallery {args.gallery} x {args.dim} float32 ({args.gallery * args.dim * 4 / gib:.2f} "
        f"GiB), {args.queries} queries, top-{args.k}, {os.cpu_count()} cores"
    )
    ours = run_sharded(args)
    qps = args.queries / ours["seconds"]
    print(
        f"dist_cosface sharded, {args.ranks} ranks x {ours['threads']} threads, chunk "
        f"{args.chunk}: {ours['seconds']:.2f} s, {qps:.1f} queries/s, peak memory growth "
        f"{ours['growth'] / gib:.3f} GiB = {ours['growth'] / ours['held']:.2f}x the rank's "
        f"gallery slice ({ours['held'] / gib:.2f} GiB)"
    )
    if args.no_faiss:
        return
    base = run_faiss(args)
    base_qps = args.queries / base["seconds"]
    print(
        f"faiss IndexFlatIP, 1 process x {os.cpu_count()} threads: {base['seconds']:.2f} s "
        f"(+{base['add_seconds']:.2f} s add), {base_qps:.1f} queries/s, peak memory growth "
        f"{base['growth'] / gib:.3f} GiB = {base['growth'] / base['held']:.2f}x the gallery"
    )
    same_top1 = float((ours["indices"][:, 0] == base["indices"][:, 0]).float().mean())
    diff = float((ours["scores"] - base["scores"]).abs().max())
    print(
        f"speed ratio dist_cosface / faiss: {qps / base_qps:.2f}x; top-1 agreement "
        f"{same_top1:.4f}, largest top-{args.k} score difference {diff:.2e}"
    )


if __name__ == "__main__":
    main()
