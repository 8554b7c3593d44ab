"""Benchmark the sharded classifier head (torch and Triton kernels) against a naive one.

Implementations (``--impls``, default ``torch,naive``): ``torch`` is the head with
``kernel="torch"`` (chunked), ``triton`` the head with ``kernel="triton"`` (fused kernels,
CUDA only), ``naive`` plain autograd. All compute the same distributed CosFace loss over
``--world-size`` ranks (gloo on CPU, NCCL with one GPU per rank on CUDA). The naive one
keeps the full local ``[global_batch, num_local_classes]`` logits, softmax statistics
all-reduced over the group.

Each implementation runs in its own freshly spawned ranks. Per rank: one warm-up
forward+backward, ``--iters`` timed ones (default allocator settings), then one measured
for memory.
Memory growth = peak during the measured forward+backward minus memory held just before it
(weight, inputs and optimizer-free state are "held"; the weight gradient counts as growth):
  CPU:  peak RSS from /proc/self/status (VmHWM, reset through /proc/self/clear_refs) minus
        VmRSS. For the memory step (after the timed ones) glibc's mmap threshold is pinned
        to 64 KiB (mallopt + malloc_trim, then one more warm-up step), so every tensor is its
        own mapping, returned to the OS when freed: RSS then follows live memory and its
        peak is the real high-water mark. Timing uses glibc's default behaviour.
  CUDA: torch.cuda.max_memory_allocated() minus memory_allocated(), after a peak reset.
The largest value over ranks is reported.

FLOP counts, both printed: 6*N*K*D for the three GEMMs of the maths (logits, dX, dW) and
8*N*K*D counting the backward's recompute of the logits; on CUDA also the percentage of a
bf16 GEMM peak measured in the same run. ``--json PATH`` writes every figure as JSON.

``--margins cosface,arcface,...`` measures the torch head once per margin type (``--impls``
ignored) and prints time and memory-growth ratios against the first one (plain CosFace by
default); a name ending in ``-kN`` adds N sub-centers per class (``cosface-k3``). Memory: each
variant in its own fresh ranks, as above. Time: all variants in one set of ranks, one step of
each per round for ``--iters`` rounds (each round starting one variant later), the median per
variant (on a shared machine a load change then hits every variant alike). The weight's size
is reported too: K sub-centers hold K times the rows.

Examples:
  python tools/bench_classifier.py --world-size 2 --num-classes 400000 --dim 128 --batch 256
  python tools/bench_classifier.py --world-size 2 --num-classes 400000 --dim 128 --batch 256 \\
      --margins cosface,arcface,combined,curricularface,adaface,magface,cosface-k3
  python tools/bench_classifier.py --device cuda --world-size 1 --num-classes 2000000 \\
      --dim 512 --batch 1024 --dtype bfloat16 --impls torch,triton --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from unittest import mock

import torch
import torch.distributed as dist

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # runnable as a plain script from a checkout (tools.spawn)
    sys.path.insert(0, str(REPO))

from dist_cosface.classifier import ClassifierConfig, ShardedClassifier  # noqa: E402
from dist_cosface.classifier.comm import GatherBatch, gather_labels  # noqa: E402
from dist_cosface.configtools import from_mapping  # noqa: E402

H100_H200_BF16_DENSE_TFLOPS = 989.0  # NVIDIA datasheet, SXM, dense (no sparsity)
IMPLS = ("torch", "triton", "naive")
# --margins: name -> ClassifierConfig fields (paper defaults; combined = ArcFace + CosFace)
MARGIN_VARIANTS = {
    "cosface": {"margin_type": "cosface", "margin": 0.35},
    "arcface": {"margin_type": "arcface", "margin": 0.5},
    "combined": {"margin_type": "combined", "combined": {"m1": 1.0, "m2": 0.3, "m3": 0.2}},
    "curricularface": {"margin_type": "curricularface", "margin": 0.5},
    "adaface": {"margin_type": "adaface", "margin": 0.4},
    "magface": {"margin_type": "magface"},
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        default="cpu",
        help="cpu: gloo ranks; cuda: NCCL, one GPU per rank (default cpu)",
    )
    p.add_argument("--world-size", type=int, default=2, help="number of ranks (default 2)")
    p.add_argument("--num-classes", type=int, default=400_000, help="C, all ranks together")
    p.add_argument("--dim", type=int, default=128, help="embedding width D")
    p.add_argument("--batch", type=int, default=256, help="local batch B per rank")
    p.add_argument(
        "--dtype",
        choices=sorted(DTYPES),
        default="float32",
        help="embedding/matmul dtype; softmax statistics stay fp32",
    )
    p.add_argument(
        "--chunk-size",
        type=int,
        default=None,
        help="classes per chunk for the head (default: automatic)",
    )
    p.add_argument("--iters", type=int, default=3, help="timed iterations (default 3)")
    p.add_argument(
        "--impls",
        default="torch,naive",
        help="comma-separated: torch, triton, naive (default torch,naive)",
    )
    p.add_argument(
        "--margins",
        default=None,
        help="comma-separated margin types (optionally -kN for N sub-centers) for the torch "
        f"head, ratios against the first; known: {', '.join(MARGIN_VARIANTS)}",
    )
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads per rank (default: cores // world size)",
    )
    args = p.parse_args(argv)
    if args.device == "cuda" and torch.cuda.device_count() < args.world_size:
        p.error(
            f"--world-size {args.world_size} needs that many GPUs, "
            f"found {torch.cuda.device_count()}"
        )
    if min(args.world_size, args.num_classes, args.dim, args.batch, args.iters) < 1:
        p.error("sizes and --iters must be positive")
    args.impls = [name.strip() for name in args.impls.split(",") if name.strip()]
    unknown = sorted(set(args.impls) - set(IMPLS))
    if unknown or not args.impls:
        p.error(f"--impls must name some of {list(IMPLS)}, got {unknown or 'nothing'}")
    if args.margins is not None:
        args.margins = [name.strip() for name in args.margins.split(",") if name.strip()]
        try:
            for name in args.margins:
                margin_fields(name)
        except ValueError as exc:
            p.error(str(exc))
    return args


def margin_fields(variant: str | None) -> dict:
    """ClassifierConfig fields of a ``--margins`` entry (``cosface-k3``: 3 sub-centers)."""
    if variant is None:
        return {}
    name, _, sub = variant.partition("-k")
    if name not in MARGIN_VARIANTS or (sub and not sub.isdigit()):
        raise ValueError(f"--margins: unknown entry {variant!r} (known: {list(MARGIN_VARIANTS)})")
    return {**MARGIN_VARIANTS[name], "subcenters": int(sub) if sub else 1}


class _SumIdentityBackward(torch.autograd.Function):
    """All-reduce SUM whose backward is the identity: every rank holds the same loss."""

    @staticmethod
    def forward(ctx, tensor, group):
        tensor = tensor.clone()
        dist.all_reduce(tensor, group=group)
        return tensor

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def naive_loss(head, embeddings, labels):
    """The baseline: full local logits through plain autograd (same maths as the head)."""
    comm = head.comm
    sizes = [embeddings.shape[0]] * comm.world_size
    x = GatherBatch.apply(embeddings, sizes, comm)
    y = gather_labels(labels, sizes, comm) - head.class_start
    owned = (y >= 0) & (y < head.num_local_classes)
    w = torch.nn.functional.normalize(head.weight, dim=1).to(x.dtype)
    cos = (torch.nn.functional.normalize(x, dim=1) @ w.t()).float()
    is_target = torch.zeros_like(cos, dtype=torch.bool)
    is_target[owned.nonzero().squeeze(1), y[owned]] = True
    logits = head.scale * (cos - head.spec.margin * is_target)
    row_max = logits.detach().amax(dim=1)
    dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=comm.group)
    sum_exp = torch.exp(logits - row_max[:, None]).sum(dim=1)
    target = (logits * is_target).sum(dim=1)
    stats = _SumIdentityBackward.apply(torch.stack([sum_exp, target]), comm.group)
    return (row_max + stats[0].log() - stats[1]).mean()


def _memory_now(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    return _proc_status_kib("VmRSS") * 1024


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS


def _peak(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return _proc_status_kib("VmHWM") * 1024


def _proc_status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {key}")


def _malloc_mmap_threshold(device: torch.device, nbytes: int) -> None:
    """Pin glibc's mmap threshold (and trim threshold) for CPU tensors; no-op on CUDA."""
    if device.type != "cpu":
        return
    import ctypes

    libc = ctypes.CDLL("libc.so.6")
    m_trim_threshold, m_mmap_threshold = -1, -3  # from malloc.h
    if not (libc.mallopt(m_mmap_threshold, nbytes) and libc.mallopt(m_trim_threshold, nbytes)):
        raise RuntimeError("mallopt failed: cannot control glibc's mmap threshold")
    libc.malloc_trim(0)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _head_on_gpu(cfg, dim: int, group, device: torch.device, rank: int):
    """The head built on the GPU, rows drawn there (same in every implementation's process).

    The head's own initialization draws every row on the CPU, 65,536 rows at a time: at
    C = 10M (5.1G numbers, twice: at construction and for the fixed seed) that alone would take
    minutes of a GPU slot. The benchmark skips it and draws N(0, 0.01) rows on the device from
    a generator seeded by the rank; the weights' values play no part in the timing.
    """
    skip_init = mock.patch.object(ShardedClassifier, "reset_parameters", lambda self: None)
    with skip_init, torch.device(device):
        head = ShardedClassifier(cfg, dim, group)
    gen = torch.Generator(device=device).manual_seed(rank)
    with torch.no_grad():
        head.weight.normal_(0.0, 0.01, generator=gen)
    return head


def _stepper(args, impl: str, rank: int, device: torch.device, group, variant=None):
    """(head, step): one forward+backward of ``impl`` (a ``--margins`` ``variant`` for the
    torch head) on this rank's fixed batch; ``step()`` returns the loss, ``step.clear()``
    drops the gradients."""
    fields = {
        "num_classes": args.num_classes,
        "chunk_size": args.chunk_size,
        "kernel": "triton" if impl == "triton" else "torch",
        **margin_fields(variant),
    }
    cfg = from_mapping(ClassifierConfig, fields)
    if device.type == "cuda":
        head = _head_on_gpu(cfg, args.dim, group, device, rank)
    else:
        head = ShardedClassifier(cfg, args.dim, group)
        head.reset_parameters(seed=0)  # same weights in the head's and the baseline's processes
    dtype = DTYPES[args.dtype]
    gen = torch.Generator().manual_seed(rank)
    emb = torch.randn(args.batch, args.dim, generator=gen).to(device, dtype).requires_grad_()
    labels = torch.randint(0, args.num_classes, (args.batch,), generator=gen).to(device)
    run = (lambda e, y: naive_loss(head, e, y)) if impl == "naive" else head

    def clear() -> None:  # drop the gradients (so that they count as growth)
        head.weight.grad, emb.grad = None, None

    def step() -> float:
        clear()
        loss = run(emb, labels)
        loss.backward()
        return loss.item()

    step.clear = clear
    return head, step


def _measure(
    args, impl: str, rank: int, device: torch.device, group, variant=None, timed=True
) -> dict:
    """Time (unless ``timed`` is off: ``--margins`` times in one interleaved spawn) and
    memory growth of one implementation in these fresh ranks."""
    head, step = _stepper(args, impl, rank, device, group, variant)
    step()  # warm-up: one-time allocations (communicator buffers, cuBLAS workspace)
    _sync(device)
    dist.barrier(group=group)
    start = time.perf_counter()
    iters = args.iters if timed else 0
    for _ in range(iters):
        step()
    _sync(device)
    seconds = (time.perf_counter() - start) / max(iters, 1)
    # memory last: pinning glibc's mmap threshold must not slow down the timed steps
    _malloc_mmap_threshold(device, 64 * 1024)
    step()  # re-establish the steady state under the pinned threshold
    step.clear()
    _sync(device)
    before = _memory_now(device)
    _reset_peak(device)
    loss = step()
    _sync(device)
    growth = _peak(device) - before
    stats = torch.tensor([growth, seconds, before], dtype=torch.float64, device=device)
    dist.all_reduce(stats, op=dist.ReduceOp.MAX, group=group)
    return {
        "loss": loss,
        "growth": int(stats[0]),
        "seconds": float(stats[1]),
        "held": int(stats[2]),
        "weight_bytes": head.weight.numel() * head.weight.element_size(),
    }


def measure_bf16_peak(device: torch.device, n: int = 8192, iters: int = 20) -> float:
    """Achieved TFLOP/s of a large bf16 matmul on this GPU (the practical peak)."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(iters):
        a @ b
    torch.cuda.synchronize(device)
    return 2 * n**3 * iters / (time.perf_counter() - start) / 1e12


def _rank_interleaved(rank: int, world_size: int, args) -> dict | None:
    """``--margins`` timing: every variant's head in the same ranks, timed round-robin
    (``--iters`` rounds, one step of each per round, the order rotated), so that a change of
    the machine's load hits every variant alike; rank 0 returns the median seconds per
    variant (max over ranks)."""
    device = torch.device("cuda", rank) if args.device == "cuda" else torch.device("cpu")
    steps = {}
    for variant in args.margins:
        steps[variant] = _stepper(args, "torch", rank, device, dist.group.WORLD, variant)[1]
        steps[variant]()  # warm-up
    times = {variant: [] for variant in args.margins}
    names = list(steps)
    for round_index in range(args.iters):
        # each round starts one variant later: no variant always follows the same other one
        # (the step after the sub-center head's, which frees 3x the memory, ran slower)
        shift = round_index % len(names)
        for variant in names[shift:] + names[:shift]:
            step = steps[variant]
            _sync(device)
            dist.barrier(group=dist.group.WORLD)
            start = time.perf_counter()
            step()
            _sync(device)
            times[variant].append(time.perf_counter() - start)
    medians = torch.tensor([sorted(t)[len(t) // 2] for t in times.values()], dtype=torch.float64)
    dist.all_reduce(medians, op=dist.ReduceOp.MAX, group=dist.group.WORLD)
    return dict(zip(args.margins, medians.tolist())) if rank == 0 else None


def _rank_main(
    rank: int, world_size: int, args, impl: str, variant=None, timed=True
) -> dict | None:
    """One rank's measurement; rank 0 returns the figures."""
    cuda = args.device == "cuda"
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    out = _measure(args, impl, rank, device, dist.group.WORLD, variant, timed)
    if cuda and rank == 0:
        out["bf16_peak"] = measure_bf16_peak(device)
    return out if rank == 0 else None


def run_impl(args, impl: str, variant: str | None = None, timed: bool = True) -> dict:
    """Fresh ranks for one implementation (so no allocator state carries over); ``variant``
    a ``--margins`` entry for the torch head, ``timed=False`` for memory only.

    A failing implementation (e.g. out of memory) is reported as ``{"error": ...}``.
    """
    from tools.spawn import RanksFailed

    try:
        return _spawn(args, _rank_main, impl, variant, timed)[0]
    except RanksFailed as exc:  # which rank, and the last line of its traceback
        lines = str(exc).strip().splitlines()
        return {"error": " ".join(dict.fromkeys([lines[0], lines[-1]]))}


def _spawn(args, fn, *fn_args) -> list:
    """``fn(rank, world, args, *fn_args)`` on ``--world-size`` fresh ranks (gloo or NCCL)."""
    from tools.spawn import run_ranks

    cuda = args.device == "cuda"
    threads = None if cuda else args.threads or max(1, (os.cpu_count() or 1) // args.world_size)
    return run_ranks(
        args.world_size,
        fn,
        args,
        *fn_args,
        timeout_s=1800.0,
        backend="nccl" if cuda else "gloo",
        threads=threads,
        collective_timeout_s=600.0,
    )


def figures(args, results: dict[str, dict]) -> dict:
    """Per implementation: ms, both TFLOP/s counts, % of the measured bf16 peak, memory."""
    n = args.batch * args.world_size
    k = -(-args.num_classes // args.world_size)
    flops = {"maths_6NKD": 6 * n * k * args.dim, "with_recompute_8NKD": 8 * n * k * args.dim}
    peaks = [r["bf16_peak"] for r in results.values() if "bf16_peak" in r]
    peak = max(peaks) if peaks else None
    base = results.get("torch", {})
    out = {"config": {key: value for key, value in vars(args).items() if key != "json"}}
    out.update(flops_per_rank=flops, bf16_peak_tflops=peak, impls={})
    for name, res in results.items():
        if "error" in res:
            out["impls"][name] = res
            continue
        row = {"loss": res["loss"], "ms": res["seconds"] * 1e3, "growth_mib": res["growth"] / 2**20}
        for label, count in flops.items():
            row[f"tflops_{label}"] = count / res["seconds"] / 1e12
            if peak:
                row[f"pct_peak_{label}"] = 100 * row[f"tflops_{label}"] / peak
        if "seconds" in base and name != "torch":
            row["time_vs_torch"] = res["seconds"] / base["seconds"]
            row["growth_vs_torch"] = res["growth"] / max(base["growth"], 1)
            row["loss_diff_vs_torch"] = abs(res["loss"] - base["loss"])
        out["impls"][name] = row
    return out


def report(args, fig: dict) -> None:
    print(
        f"C={args.num_classes} D={args.dim} B/rank={args.batch} world={args.world_size} "
        f"device={args.device} dtype={args.dtype} chunk={args.chunk_size or 'auto'}"
    )
    print("TFLOP/s columns: 6NKD = 3 GEMMs of the maths; 8NKD = with the logits recompute")
    header = f"{'impl':<8}{'loss':>12}{'fwd+bwd ms':>12}{'growth MiB':>12}"
    print(header + f"{'TF/s 6NKD':>11}{'TF/s 8NKD':>11}{'%pk 6NKD':>10}{'%pk 8NKD':>10}")
    for name, row in fig["impls"].items():
        if "error" in row:
            print(f"{name:<8} FAILED: {row['error']}")
            continue
        pct = [row.get(f"pct_peak_{k}") for k in ("maths_6NKD", "with_recompute_8NKD")]
        print(
            f"{name:<8}{row['loss']:>12.5f}{row['ms']:>12.1f}{row['growth_mib']:>12.1f}"
            f"{row['tflops_maths_6NKD']:>11.2f}{row['tflops_with_recompute_8NKD']:>11.2f}"
            + "".join(f"{p:>10.1f}" if p is not None else f"{'-':>10}" for p in pct)
        )
        if "time_vs_torch" in row:
            print(
                f"{'':<8}vs torch: time x{row['time_vs_torch']:.3f}, growth "
                f"x{row['growth_vs_torch']:.3f}, |loss diff| {row['loss_diff_vs_torch']:.2e}"
            )
    if fig["bf16_peak_tflops"]:
        print(
            f"bf16 GEMM peak measured in this run: {fig['bf16_peak_tflops']:.1f} TFLOP/s "
            f"(datasheet H100/H200 SXM dense: {H100_H200_BF16_DENSE_TFLOPS:.0f})"
        )


def margin_figures(args, results: dict[str, dict]) -> dict:
    """Per margin entry: ms, memory growth and held memory, ratios against the first entry."""
    base_name = args.margins[0]
    base = results[base_name]
    out = {"config": {k: v for k, v in vars(args).items() if k != "json"}, "margins": {}}
    for name, res in results.items():
        if "error" in res or "error" in base:
            out["margins"][name] = res
            continue
        out["margins"][name] = {
            "loss": res["loss"],
            "ms": res["seconds"] * 1e3,
            "growth_mib": res["growth"] / 2**20,
            "held_mib": res["held"] / 2**20,
            "weight_mib": res["weight_bytes"] / 2**20,
            f"time_vs_{base_name}": res["seconds"] / base["seconds"],
            f"growth_vs_{base_name}": res["growth"] / max(base["growth"], 1),
        }
    return out


def margin_report(args, fig: dict) -> None:
    base = args.margins[0]
    print(
        f"C={args.num_classes} D={args.dim} B/rank={args.batch} world={args.world_size} "
        f"device={args.device} dtype={args.dtype} chunk={args.chunk_size or 'auto'}: torch "
        f"head per margin type, ratios against {base}"
    )
    print(
        f"{'margin':<20}{'loss':>10}{'fwd+bwd ms':>12}{'growth MiB':>12}{'weight MiB':>12}"
        f"{'time x':>9}{'growth x':>10}"
    )
    for name, row in fig["margins"].items():
        if "error" in row:
            print(f"{name:<20} FAILED: {row['error']}")
            continue
        print(
            f"{name:<20}{row['loss']:>10.4f}{row['ms']:>12.1f}{row['growth_mib']:>12.1f}"
            f"{row['weight_mib']:>12.1f}{row[f'time_vs_{base}']:>9.3f}"
            f"{row[f'growth_vs_{base}']:>10.3f}"
        )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.margins:
        results = {m: run_impl(args, "torch", m, timed=False) for m in args.margins}
        for variant, seconds in _spawn(args, _rank_interleaved)[0].items():
            results[variant]["seconds"] = seconds
        fig = margin_figures(args, results)
        margin_report(args, fig)
        if args.json:
            Path(args.json).write_text(json.dumps(fig, indent=2) + "\n")
        return
    fig = figures(args, {impl: run_impl(args, impl) for impl in args.impls})
    report(args, fig)
    if args.json:
        Path(args.json).write_text(json.dumps(fig, indent=2) + "\n")
    if all("error" in row for row in fig["impls"].values()):
        raise SystemExit("every implementation failed")


if __name__ == "__main__":
    main()
