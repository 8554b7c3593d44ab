"""Ahead-of-time compile gate of the Triton head: real sm_90a / sm_80 builds, no GPU needed.

Every kernel launch the head (``classifier.kernel: triton``) makes is recorded by running the
real head forward and backward under ``triton_loss.record_launches`` on CPU tensors (no kernel
runs), for each variant: embeddings bf16 / fp16 / fp32, rows fp32 / bf16, Partial FC on / off,
CosFace and softmax, D = 128 / 256 / 512 / 1024, aligned and unaligned N and C. The launches
are turned into Triton compile jobs exactly as Triton's launcher does (its own argument binder:
same signature, constexprs, divisibility attributes and options), deduplicated, and compiled
for each target in parallel worker processes with a private cache and ``always_compile``.

Per compiled kernel: registers and spills from ptxas's verbose log (``dump_ptxas_log``),
cross-checked with the bundled ``cuobjdump --dump-resource-usage``; shared memory (what the
launcher requests); wgmma instructions in the PTX, HGMMA / HMMA in the SASS; the wgmma wait
depth of the innermost loop that issues wgmma; an estimate of resident blocks per SM.

It fails (exit 1) on: a compile error; any spill (ptxas or cuobjdump); shared memory above
the per-block limit (sm_90: 232,448 B; the sm_80 tiles also run on sm_86/89, so 101,376 B);
on sm_90a a 16-bit ``tl.dot`` not lowered to wgmma; a wgmma loop whose wait depth is 0 (every
MMA waited on at once: no MMA overlaps a load).

  python tools/compile_gate.py                      # every variant, sm_90a and sm_80
  python tools/compile_gate.py --config configs/webface42m_r100_pfc.yaml --world-size 64
  python tools/compile_gate.py --roofline           # plus the static roofline estimate

The gate proves the kernels build for real GPUs without spilling and with the intended
tensor-core path. It does not prove speed, memory bandwidth, or the absence of races.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import itertools
import json
import math
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from unittest import mock

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # runnable as a plain script from a checkout
    sys.path.insert(0, str(REPO))

ARCHS = (90, 80)
# per-block shared memory the launcher may request (cudaDevAttrMaxSharedMemoryPerBlockOptin)
SHARED_LIMIT = {90: 232_448, 80: 166_912, 86: 101_376}
# the sm80 tiles are launched on sm_80, sm_86 and sm_89 alike: the smallest limit applies
GATE_SHARED_LIMIT = {90: SHARED_LIMIT[90], 80: SHARED_LIMIT[86]}
SM_SHARED = {90: 233_472, 80: 167_936}  # shared memory per SM (H100 / A100)
RESERVED_SHARED = 1024  # per block, reserved by the driver on sm_80+
REGISTERS_PER_SM, MAX_THREADS_PER_SM, MAX_BLOCKS_PER_SM = 65_536, 2048, 32
DTYPES = ("bfloat16", "float16", "float32")
DIMS = (128, 256, 512, 1024)
# (global batch N, local classes C): aligned, and unaligned in both
SHAPES = ((1024, 4096), (1000, 3001))


@dataclass(frozen=True)
class Variant:
    """One head configuration the gate records launches for."""

    dtype: str  # embeddings (compute) dtype
    rows_dtype: str  # the weight's dtype
    partial_fc: bool
    margin_type: str
    dim: int
    batch: int  # global N
    classes: int  # local classes

    def label(self) -> str:
        pfc = " pfc" if self.partial_fc else ""
        return (
            f"{self.dtype}/{self.rows_dtype}-rows{pfc} {self.margin_type} "
            f"D={self.dim} N={self.batch} C={self.classes}"
        )


def default_variants(full: bool = False) -> list[Variant]:
    """The variants the gate records.

    ``full``: the whole product (192). Default: every operand combination (embeddings x rows x
    Partial FC) at D = 512 with unaligned N and C, plus every (margin, D, N/C) combination for
    both tile families (bf16 and fp32 embeddings, fp32 rows, Partial FC alternating). It
    yields the same 42 unique kernels as the product (compared once: docs/classifier.md), in
    a quarter of the recording time.
    """
    operands = list(itertools.product(DTYPES, ("float32", "bfloat16"), (False, True)))
    shapes = list(itertools.product(("cosface", "softmax"), DIMS, SHAPES))
    if full:
        return [Variant(*o, m, d, n, c) for o in operands for m, d, (n, c) in shapes]
    variants = [Variant(*o, "cosface", 512, *SHAPES[1]) for o in operands]
    for dtype in ("bfloat16", "float32"):
        for i, (m, d, (n, c)) in enumerate(shapes):
            variants.append(Variant(dtype, "float32", bool(i % 2), m, d, n, c))
    return variants


def config_variants(path: str, world_size: int, overrides: list[str]) -> list[Variant]:
    """The one variant a training config launches: its width, precision, sampling, margin."""
    from dist_cosface.config import load_config

    cfg = load_config(path, overrides)
    dtype = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[cfg.train.precision]
    classes = -(-cfg.classifier.num_classes // world_size)
    batch = cfg.data.batch_size * world_size
    return [
        Variant(
            dtype,
            "float32",
            cfg.classifier.sample_rate < 1.0,
            cfg.classifier.margin_type,
            cfg.model.embedding_size,
            batch,
            classes,
        )
    ]


def record(variant: Variant, arch: int) -> list[Any]:
    """The kernel launches of one forward + backward of the real head (nothing runs)."""
    import torch

    from dist_cosface.classifier import ClassifierConfig, ShardedClassifier
    from dist_cosface.classifier.triton_loss import record_launches

    gen = torch.Generator().manual_seed(0)
    # the weight's values play no part in what is launched: skip the (slow) initialization
    no_init = mock.patch.object(ShardedClassifier, "reset_parameters", lambda self, seed=None: None)
    cfg = ClassifierConfig(
        num_classes=variant.classes,
        margin_type=variant.margin_type,
        sample_rate=0.5 if variant.partial_fc else 1.0,
        kernel="triton",
    )
    with no_init, record_launches(arch) as launches:
        head = ShardedClassifier(cfg, variant.dim, None).to(getattr(torch, variant.rows_dtype))
        x = torch.randn(variant.batch, variant.dim, generator=gen)
        x = x.to(getattr(torch, variant.dtype)).requires_grad_()
        labels = torch.randint(0, variant.classes, (variant.batch,), generator=gen)
        head(x, labels).backward()
    return launches


@dataclass(frozen=True)
class Job:
    """One compilation: what Triton's launcher would hand to ``triton.compile``."""

    name: str
    kernel_name: str
    arch: int
    signature: dict[str, str]
    constexprs: dict[tuple[int, ...], Any]
    attrs: dict[tuple[int, ...], Any]
    options: dict[str, Any]

    def key(self) -> str:
        return repr(
            (self.arch, self.kernel_name, sorted(self.signature.items()), self.constexprs,
             self.attrs, sorted(self.options.items()))
        )  # fmt: skip

    def describe(self) -> str:
        """The operand dtypes: embeddings (compute dtype) and, where read, the weight rows."""
        sig = self.signature
        compute = next(sig[p][1:] for p in ("x_ptr", "what_ptr", "g_ptr") if p in sig)
        label = compute + (f", {sig['w_ptr'][1:]} rows" if "w_ptr" in sig else "")
        return label + (" (upcast)" if self._named_constexprs().get("UPCAST") else "")

    def _named_constexprs(self) -> dict[str, Any]:
        names = list(self.signature)
        return {names[k[0]]: v for k, v in self.constexprs.items()}

    def tiles(self) -> str:
        blocks = {k: v for k, v in self._named_constexprs().items() if k.startswith("BLOCK_")}
        shape = "x".join(str(v) for v in blocks.values())
        return f"{shape} w{self.options['num_warps']} s{self.options['num_stages']}"


@functools.cache
def _backend(arch: int) -> Any:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend

    return make_backend(GPUTarget("cuda", arch, 32))


@functools.cache
def _binder(kernel_name: str, arch: int) -> Any:
    """The argument binder Triton's launcher builds for this kernel on this target."""
    from triton.runtime.jit import create_function_from_signature

    from dist_cosface.classifier import triton_kernels

    fn = getattr(triton_kernels, kernel_name)
    return create_function_from_signature(fn.signature, fn.params, _backend(arch))


def to_job(launch: Any, arch: int) -> Job:
    """Bind a launch's arguments with Triton's own launcher code for ``arch``."""
    from triton import knobs

    fn = launch.kernel()
    backend = _backend(arch)
    kwargs = {
        **launch.constexprs,
        "num_warps": launch.num_warps,
        "num_stages": launch.num_stages,
        # what JITFunction.run adds before binding
        "debug": False,
        "instrumentation_mode": knobs.compilation.instrumentation_mode,
        "fpsan_homomorphic_casts": knobs.compilation.fpsan_homomorphic_casts,
    }
    binder = _binder(launch.kernel_name, arch)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*TRITON_DEFAULT_FP_FUSION.*")
        bound, specialization, options = binder(*launch.args, **kwargs)
        options, signature, constexprs, attrs = fn._pack_args(
            backend, kwargs, bound, specialization, options
        )
    return Job(
        launch.name, launch.kernel_name, arch, signature, constexprs, attrs, dict(options.__dict__)
    )


def record_jobs(variant: Variant, arch: int) -> list[Job]:
    """The compile jobs of one variant's launches (runs in a worker)."""
    return [to_job(launch, arch) for launch in record(variant, arch)]


def unique_jobs(
    recorded: list[tuple[Variant, list[Job]]],
) -> tuple[list[Job], dict[str, list[str]]]:
    """Deduplicated jobs and, per job key, the variants that launch it."""
    jobs: dict[str, Job] = {}
    users: dict[str, list[str]] = {}
    for variant, variant_jobs in recorded:
        for job in variant_jobs:
            jobs.setdefault(job.key(), job)
            users.setdefault(job.key(), []).append(f"{variant.label()} sm_{job.arch}")
    return list(jobs.values()), users


# ---------------------------------------------------------------- compile and inspect (worker)


def _tool(name: str) -> str:
    from triton import knobs

    path = getattr(knobs.nvidia, name.replace("-", "_")).path
    if not path or not os.path.exists(path):
        raise FileNotFoundError(f"triton's bundled {name} is missing ({path})")
    return path


def _worker_init(cache_dir: str) -> None:
    os.environ["TRITON_CACHE_DIR"] = cache_dir  # private: nothing is read from a user's cache


@contextlib.contextmanager
def _compile_settings(log: io.StringIO) -> Any:
    """Always compile (never a cached cubin), ptxas's verbose log captured into ``log``."""
    from triton import knobs

    saved = knobs.compilation.always_compile, knobs.nvidia.dump_ptxas_log
    knobs.compilation.always_compile, knobs.nvidia.dump_ptxas_log = True, True
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(log):
            # Triton 3.9 asks for an explicit fp-fusion default; the launcher uses the same one
            warnings.filterwarnings("ignore", message=".*TRITON_DEFAULT_FP_FUSION.*")
            yield
    finally:
        knobs.compilation.always_compile, knobs.nvidia.dump_ptxas_log = saved


def compile_job(job: Job) -> dict[str, Any]:
    """Compile one job and read its resources; never raises (errors are results)."""
    result: dict[str, Any] = {"key": job.key(), "error": None}
    start = time.perf_counter()
    log = io.StringIO()
    try:
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource

        from dist_cosface.classifier import triton_kernels

        fn = getattr(triton_kernels, job.kernel_name)
        src = ASTSource(fn, job.signature, job.constexprs, job.attrs)
        with _compile_settings(log):
            kernel = triton.compile(
                src, target=GPUTarget("cuda", job.arch, 32), options=job.options
            )
    except Exception as exc:  # noqa: BLE001 - the gate reports every failure
        result["error"] = f"{type(exc).__name__}: {str(exc).strip()[:2000]}"
        result["seconds"] = time.perf_counter() - start
        return result
    result["seconds"] = time.perf_counter() - start
    result.update(ptxas_resources(log.getvalue()))
    result["shared"] = int(kernel.metadata.shared)
    ptx = kernel.asm["ptx"]
    result["wgmma"] = ptx.count("wgmma.mma_async")
    result["wait_depth"] = wgmma_loop_wait_depth(ptx)
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "kernel.cubin"
        cubin.write_bytes(kernel.asm["cubin"])
        usage = subprocess.run(
            [_tool("cuobjdump"), "--dump-resource-usage", str(cubin)],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        sass = subprocess.run(
            [_tool("cuobjdump"), "-sass", str(cubin)], capture_output=True, text=True, check=True
        ).stdout
    result.update(cuobjdump_resources(usage))
    result.update(sass_mma_counts(sass))
    return result


def ptxas_resources(log: str) -> dict[str, int]:
    """Registers and spill bytes from ``ptxas -v`` (either ptxas's wording)."""
    regs = re.search(r"Used (\d+) registers", log)
    stores = re.search(r"(\d+) bytes spill stores", log)
    loads = re.search(r"(\d+) bytes spill loads", log)
    stack = re.search(r"(\d+) bytes stack frame", log)
    if regs is None:
        raise ValueError(f"no register count in the ptxas log:\n{log[-2000:]}")
    return {
        "registers": int(regs.group(1)),
        "spill_stores": int(stores.group(1)) if stores else 0,
        "spill_loads": int(loads.group(1)) if loads else 0,
        "stack": int(stack.group(1)) if stack else 0,
    }


def cuobjdump_resources(text: str) -> dict[str, int]:
    """``REG``, ``STACK`` (the stack frame: spills), ``LOCAL`` and static ``SHARED``."""
    m = re.search(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)", text)
    if m is None:
        raise ValueError(f"no resource line in cuobjdump's output:\n{text[-2000:]}")
    reg, stack, shared, local = map(int, m.groups())
    return {"cuobjdump_registers": reg, "cuobjdump_stack": stack, "static_shared": shared,
            "cuobjdump_local": local}  # fmt: skip


def sass_mma_counts(sass: str) -> dict[str, int]:
    return {
        "hgmma": len(re.findall(r"\bHGMMA\.", sass)),
        "hmma": len(re.findall(r"\bHMMA\.", sass)),
    }


_LABEL = re.compile(r"^\s*(\$?[\w$.]+):")
_BRANCH = re.compile(r"\bbra(?:\.uni)?\s+(\$?[\w$.]+);")
_WAIT = re.compile(r"wgmma\.wait_group\.sync\.aligned\s+(\d+);")


def wgmma_loop_wait_depth(ptx: str) -> int | None:
    """Smallest ``wgmma.wait_group N`` in the innermost loop that issues wgmma.

    Loops are found as backward branches (label ... ``bra label``). A pipelined main loop
    waits with N >= 1 (MMAs stay in flight while the next tiles load); N = 0 means every MMA
    is waited on before the loop goes on. None: no loop issues wgmma (or it has no wait).
    """
    lines = ptx.splitlines()
    labels = {}
    loops = []
    for i, line in enumerate(lines):
        label = _LABEL.match(line)
        if label:
            labels[label.group(1)] = i
        branch = _BRANCH.search(line)
        if branch and branch.group(1) in labels and labels[branch.group(1)] < i:
            loops.append((labels[branch.group(1)], i))
    mma_lines = [i for i, line in enumerate(lines) if "wgmma.mma_async" in line]
    with_mma = [(a, b) for a, b in loops if any(a <= i <= b for i in mma_lines)]
    if not with_mma:
        return None
    first, last = min(with_mma, key=lambda loop: loop[1] - loop[0])
    depths = [int(m.group(1)) for line in lines[first : last + 1] if (m := _WAIT.search(line))]
    return min(depths) if depths else None


# ---------------------------------------------------------------- checks and table


def blocks_per_sm(arch: int, registers: int, num_warps: int, shared: int) -> int:
    """Resident blocks per SM from registers (allocated per warp in units of 256), threads and
    shared memory (per-block reservation included); H100 / A100 figures."""
    regs_per_warp = math.ceil(registers * 32 / 256) * 256
    by_regs = (REGISTERS_PER_SM // regs_per_warp) // num_warps
    by_threads = MAX_THREADS_PER_SM // (32 * num_warps)
    by_shared = SM_SHARED[arch] // (shared + RESERVED_SHARED)
    return max(0, min(by_regs, by_threads, by_shared, MAX_BLOCKS_PER_SM))


def problems(job: Job, res: dict[str, Any]) -> list[str]:
    """Why a compiled kernel fails the gate (empty: it passes)."""
    if res["error"]:
        return [f"compile error: {res['error']}"]
    out = []
    spill = res["spill_stores"] + res["spill_loads"]
    # spilled registers live in the stack frame (local memory): cuobjdump's STACK / LOCAL
    if spill or res["cuobjdump_stack"] or res["cuobjdump_local"]:
        out.append(
            f"spills {res['spill_stores']}+{res['spill_loads']} B/thread "
            f"(stack frame {res['cuobjdump_stack']} B)"
        )
    ptxas = (res["registers"], res["stack"])
    cuobjdump = (res["cuobjdump_registers"], res["cuobjdump_stack"])
    if ptxas != cuobjdump:
        out.append(f"ptxas (registers, stack) {ptxas} != cuobjdump's {cuobjdump}")
    limit = GATE_SHARED_LIMIT[job.arch]
    if res["shared"] > limit:
        out.append(f"shared memory {res['shared']} B > {limit} B")
    uses_dot = "UPCAST" in job._named_constexprs()
    sixteen_bit = any(job.signature.get(p) in ("*bf16", "*fp16") for p in ("x_ptr", "g_ptr"))
    if job.arch == 90 and uses_dot and sixteen_bit and not (res["wgmma"] and res["hgmma"]):
        out.append("16-bit tl.dot not lowered to wgmma / HGMMA")
    if job.arch == 90 and res["wgmma"] and res["wait_depth"] == 0:
        out.append("wgmma main loop waits with depth 0 (no MMA overlaps a load)")
    return out


def row(job: Job, res: dict[str, Any]) -> dict[str, Any]:
    """One table row: the job, what the build uses, and its problems."""
    out = {
        "kernel": job.name,
        "target": f"sm_{job.arch}{'a' if job.arch == 90 else ''}",
        "operands": job.describe(),
        "tiles": job.tiles(),
        "seconds": round(res["seconds"], 1),
    }
    if res["error"] is None:
        out.update(
            registers=res["registers"],
            spills=res["spill_stores"],  # bytes per thread, as ptxas counts spills
            shared=res["shared"],
            blocks_per_sm=blocks_per_sm(
                job.arch, res["registers"], job.options["num_warps"], res["shared"]
            ),
            wgmma=res["wgmma"],
            wait_depth=res["wait_depth"],
            hgmma=res["hgmma"],
            hmma=res["hmma"],
        )
    out["problems"] = problems(job, res)
    return out


COLUMNS = (
    ("kernel", 12), ("target", 7), ("operands", 30), ("tiles", 18), ("registers", 5),
    ("spills", 6), ("shared", 7), ("blocks_per_sm", 6), ("wgmma", 5), ("wait_depth", 4),
    ("hgmma", 5), ("hmma", 5), ("seconds", 6),
)  # fmt: skip
HEADERS = {"registers": "regs", "blocks_per_sm": "blk/SM", "wait_depth": "wait",
           "seconds": "comp s"}  # fmt: skip


def format_table(rows: list[dict[str, Any]]) -> str:
    head = " ".join(f"{HEADERS.get(k, k):<{w}}" for k, w in COLUMNS)
    lines = [head, "-" * len(head)]
    order = ("rows", "stats", "probs", "weight_grad", "input_grad")
    rank = {name: i for i, name in enumerate(order)}
    for r in sorted(rows, key=lambda r: (rank.get(r["kernel"], 9), r["target"], r["operands"])):
        cells = []
        for k, w in COLUMNS:
            v = r.get(k, "-")
            cells.append(f"{'-' if v is None else v!s:<{w}}")
        lines.append(
            " ".join(cells) + ("  FAIL: " + "; ".join(r["problems"]) if r["problems"] else "")
        )
    return "\n".join(lines)


# ---------------------------------------------------------------- roofline estimate

# NVIDIA datasheet figures, SXM parts, dense tensor-core peaks
PEAKS = {
    "H100": {"bf16": 989e12, "tf32": 494.7e12, "bandwidth": 3.35e12},
    "H200": {"bf16": 989e12, "tf32": 494.7e12, "bandwidth": 4.8e12},
}


def roofline(n: int, c: int, d: int, half: bool = True, rows_bytes: int = 4) -> list[dict]:
    """Static estimate per kernel of one forward + backward over ``c`` used local classes.

    HBM bytes assume each tile is read from HBM once (the L2 grouping's intent) and the small
    ``[N, D]`` operands stay in L2; FLOPs count tensor-core work (2 per multiply-add).
    """
    e = 2 if half else 4
    gemm = 2.0 * n * c * d
    kernels = {
        "rows": (0.0, c * d * (rows_bytes + e) + 4 * c),
        "stats": (gemm, c * d * e + n * d * e),
        "probs": (gemm, c * d * e + n * c * e),
        "weight_grad": (gemm, n * c * e + 2 * c * d * rows_bytes + 8 * c),
        "input_grad": (gemm, n * c * e + c * d * e),
    }
    out = []
    for name, (flops, nbytes) in kernels.items():
        entry = {"kernel": name, "gflop": flops / 1e9, "gbytes": nbytes / 1e9,
                 "intensity": flops / nbytes}  # fmt: skip
        for gpu, peak in PEAKS.items():
            tflops = peak["bf16" if half else "tf32"]
            entry[f"{gpu}_ms"] = 1e3 * max(flops / tflops, nbytes / peak["bandwidth"])
            entry[f"{gpu}_bound"] = (
                "compute" if flops / tflops > nbytes / peak["bandwidth"] else "memory"
            )
        out.append(entry)
    return out


def format_roofline(n: int, c: int, d: int) -> str:
    rows = roofline(n, c, d)
    lines = [
        f"static roofline, N={n} C={c:,} D={d} bf16 (fp32 rows); H100 989 TFLOP/s 3.35 TB/s, "
        "H200 989 TFLOP/s 4.8 TB/s",
        f"{'kernel':<12} {'GFLOP':>8} {'GB':>7} {'FLOP/B':>7} {'H100 ms':>8} {'H200 ms':>8}  bound",
    ]
    for r in rows:
        lines.append(
            f"{r['kernel']:<12} {r['gflop']:>8.0f} {r['gbytes']:>7.2f} {r['intensity']:>7.0f} "
            f"{r['H100_ms']:>8.2f} {r['H200_ms']:>8.2f}  {r['H100_bound']}/{r['H200_bound']}"
        )
    total = {g: sum(r[f"{g}_ms"] for r in rows) for g in PEAKS}
    lines.append(
        f"{'total':<12} {'':>8} {'':>7} {'':>7} {total['H100']:>8.2f} {total['H200']:>8.2f}"
    )
    return "\n".join(lines)


# ---------------------------------------------------------------- driver


def run_gate(
    variants: list[Variant], archs: tuple[int, ...] = ARCHS, jobs: int | None = None
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Record, deduplicate and compile every kernel of ``variants``; ``(table rows, summary)``."""
    start = time.perf_counter()
    tasks = [(v, a) for a in archs for v in variants]
    workers = max(1, jobs or os.cpu_count() or 1)
    with tempfile.TemporaryDirectory(prefix="compile_gate_") as cache:
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(workers, ctx, _worker_init, (cache,)) as pool:
            recorded = list(pool.map(record_jobs, *zip(*tasks)))
            unique, users = unique_jobs([(v, r) for (v, _), r in zip(tasks, recorded)])
            results = list(pool.map(compile_job, unique))
    rows = [row(job, res) for job, res in zip(unique, results)]
    summary = {
        "variants": len(variants),
        "launches": sum(len(v) for v in users.values()),
        "unique_kernels": len(unique),
        "failed": sum(1 for r in rows if r["problems"]),
        "compile_seconds": round(sum(r["seconds"] for r in rows), 1),
        "wall_seconds": round(time.perf_counter() - start, 1),
        "workers": workers,
    }
    for r, job in zip(rows, unique):
        r["launched_by"] = len(users[job.key()])
    return rows, summary


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--config", help="a training YAML: gate only the kernels that run launches")
    p.add_argument("--world-size", type=int, default=8, help="ranks, with --config (default 8)")
    p.add_argument("--override", action="append", default=[], help="dotted config override")
    p.add_argument("--arch", default="90,80", help="compute capabilities (default 90,80)")
    p.add_argument("--jobs", type=int, default=None, help="worker processes (default: CPUs)")
    p.add_argument(
        "--full", action="store_true", help="every combination (192 variants), not the cover"
    )
    p.add_argument("--json", help="write the table and summary as JSON")
    p.add_argument("--roofline", action="store_true", help="print the static roofline estimate")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    archs = tuple(int(a) for a in args.arch.split(","))
    for arch in archs:
        if arch not in GATE_SHARED_LIMIT:
            raise ValueError(f"--arch: {arch} is not one of {sorted(GATE_SHARED_LIMIT)}")
    if args.config:
        variants = config_variants(args.config, args.world_size, args.override)
    else:
        variants = default_variants(args.full)
    rows, summary = run_gate(variants, archs, args.jobs)
    print(format_table(rows))
    print(
        f"\n{summary['variants']} variants x {len(archs)} targets: {summary['launches']} launches,"
        f" {summary['unique_kernels']} unique kernels, {summary['failed']} failed; compile "
        f"{summary['compile_seconds']} s in {summary['workers']} workers, "
        f"{summary['wall_seconds']} s wall"
    )
    if args.roofline:
        for c in (2_000_000, 10_000_000):
            print()
            print(format_roofline(1024, c, 512))
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {"kernels": rows, "summary": summary, "variants": [asdict(v) for v in variants]},
                indent=2,
            )
            + "\n"  # fmt: skip
        )
    return 1 if summary["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
