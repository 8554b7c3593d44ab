"""The LMCL head's loss on fused Triton kernels (``classifier.kernel: triton``).

Same maths, collectives and gradients as :class:`dist_cosface.classifier.loss.ShardedMarginLoss`
(docs/classifier.md, "Triton kernels"). Forward: one pass makes the used rows normalized in
the compute dtype (``w_hat``, kept for the backward), the statistics kernel produces per-row
partial max / sum-exp per column split (reduced here in a fixed order: deterministic), then
the two unchanged all-reduces. Backward, per column chunk: ``G`` (recomputed logits), the
weight gradient ``G^T x`` with the normalization backward fused, and ``G w_hat``.

Every launch is described by a :class:`KernelLaunch` built here, whether it runs or not:
:func:`record_launches` collects the launches a forward/backward would make without running
any (CPU tensors allowed), which is how ``tools/compile_gate.py`` compiles exactly what the
head launches. triton is imported only when a launch runs or is compiled.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from dist_cosface.classifier.config import KERNELS
from dist_cosface.classifier.loss_common import (
    LossPlan,
    LossTask,
    auto_chunk_size,
    backward_scales,
    global_log_sum_exp,
    target_stats,
)

_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class Tiles:
    """Block sizes (the kernel's ``BLOCK_*`` constexprs), warps and pipeline stages."""

    blocks: dict[str, int]
    num_warps: int
    num_stages: int


# Tiles per target: "sm90" (Hopper and newer: wgmma, up to 227 KiB of shared memory per
# block), "sm80" (Ampere / Ada: mma.sync; sm_86/89 allow 99 KiB per block, so that is the
# budget), each with a "_fp32" variant for fp32 embeddings (TF32 operands take twice the
# shared memory), and "interp" (Triton's CPU interpreter: small, it runs programs one at a
# time). tools/compile_gate.py compiles every GPU entry the head can launch and checks
# registers, spills, shared memory and the wgmma pipeline; not tuned on hardware yet.
def _gpu_tiles(stats_c: int, k: int, grad_k: int, grad_stages: int) -> dict[str, Tiles]:
    """One target's tiles: the statistics' column block, the K step of the logit GEMMs and of
    the backward GEMMs (halved for fp32 operands: same bytes per stage), the backward's
    pipeline stages. M >= 64 everywhere (wgmma's M per warp group)."""
    return {
        "rows": Tiles({"BLOCK_R": 16, "BLOCK_D": 256}, 4, 1),
        "stats": Tiles({"BLOCK_N": 64, "BLOCK_C": stats_c, "BLOCK_K": k}, 4, 3),
        "probs": Tiles({"BLOCK_N": 64, "BLOCK_C": 64, "BLOCK_K": k}, 4, 3),
        "weight_grad": Tiles({"BLOCK_C": 128, "BLOCK_D": 128, "BLOCK_N": grad_k}, 8, grad_stages),
        "input_grad": Tiles({"BLOCK_M": 128, "BLOCK_D": 128, "BLOCK_K": grad_k}, 8, grad_stages),
    }


_INTERP = {
    "rows": Tiles({"BLOCK_R": 16, "BLOCK_D": 32}, 4, 1),
    "stats": Tiles({"BLOCK_N": 16, "BLOCK_C": 32, "BLOCK_K": 32}, 4, 1),
    "probs": Tiles({"BLOCK_N": 16, "BLOCK_C": 32, "BLOCK_K": 32}, 4, 1),
    "weight_grad": Tiles({"BLOCK_C": 32, "BLOCK_D": 32, "BLOCK_N": 16}, 4, 1),
    "input_grad": Tiles({"BLOCK_M": 16, "BLOCK_D": 32, "BLOCK_K": 32}, 4, 1),
}
TILES: dict[str, dict[str, Tiles]] = {
    "sm90": _gpu_tiles(stats_c=128, k=64, grad_k=64, grad_stages=4),
    "sm90_fp32": _gpu_tiles(stats_c=128, k=32, grad_k=32, grad_stages=3),
    "sm80": _gpu_tiles(stats_c=64, k=64, grad_k=32, grad_stages=3),
    "sm80_fp32": _gpu_tiles(stats_c=64, k=32, grad_k=16, grad_stages=3),
    "interp": _INTERP,
}
_ALIGN = 64  # elements: row strides of the G and statistics buffers (16-byte aligned rows)


@dataclass(frozen=True)
class KernelLaunch:
    """One kernel launch: the single description both the launcher and the compile gate use."""

    name: str  # key of TILES ("stats", ...)
    grid: tuple[int, ...]
    args: tuple[Any, ...]
    constexprs: dict[str, Any]
    num_warps: int
    num_stages: int

    @property
    def kernel_name(self) -> str:
        """The kernel's name in :mod:`dist_cosface.classifier.triton_kernels`."""
        return f"{self.name}_kernel"

    def kernel(self) -> Any:
        from dist_cosface.classifier import triton_kernels

        return getattr(triton_kernels, self.kernel_name)

    def run(self) -> None:
        self.kernel()[self.grid](
            *self.args, **self.constexprs, num_warps=self.num_warps, num_stages=self.num_stages
        )


@dataclass
class _Recorder:
    arch: int
    launches: list[KernelLaunch] = field(default_factory=list)


_recorder: _Recorder | None = None


@contextlib.contextmanager
def record_launches(arch: int) -> Iterator[list[KernelLaunch]]:
    """Collect the launches of the Triton path instead of running them (``arch``: 90, 80...).

    Inside the block ``use_triton`` accepts CPU tensors and every kernel launch is appended
    to the yielded list, not run: outputs of kernels stay uninitialized. Tile choice follows
    ``arch`` as it would on such a GPU. For tools/compile_gate.py.
    """
    global _recorder
    previous, _recorder = _recorder, _Recorder(arch)
    try:
        yield _recorder.launches
    finally:
        _recorder = previous


def _launch(launch: KernelLaunch) -> None:
    if _recorder is not None:
        _recorder.launches.append(launch)
    else:
        launch.run()


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def tf32_allowed() -> bool:
    """Whether PyTorch's fp32 matmul setting allows TF32 (legacy flag or the torch >= 2.9 API)."""
    matmul = torch.backends.cuda.matmul
    try:
        return bool(matmul.allow_tf32)
    except RuntimeError:  # the new API was used: the legacy flag refuses to answer
        return getattr(matmul, "fp32_precision", "ieee") == "tf32"


def use_triton(kernel: str, device: torch.device, compute_dtype: torch.dtype) -> bool:
    """Resolve ``classifier.kernel`` for one forward; raise when ``triton`` cannot run.

    fp32 embeddings on a GPU run the kernels' GEMMs on TF32 tensor cores, so they follow
    PyTorch's fp32 matmul setting: allowed (``torch.backends.cuda.matmul.allow_tf32 = True``
    or ``torch.set_float32_matmul_precision("high")``), or ``triton`` is refused (``auto``
    picks torch). There is no full-precision fp32 fallback: it would spill registers.
    """
    if kernel not in KERNELS:
        raise ValueError(f"classifier.kernel must be one of {list(KERNELS)}, got {kernel!r}")
    if kernel == "torch":
        return False
    fp32_refused = device.type == "cuda" and compute_dtype == torch.float32 and not tf32_allowed()
    if kernel == "auto":
        return (
            device.type == "cuda"
            and compute_dtype in _TRITON_DTYPES
            and not fp32_refused
            and triton_available()
        )
    if not triton_available():
        raise ValueError("classifier.kernel=triton needs the 'triton' package (pip install triton)")
    if not (device.type == "cuda" or interpreting() or _recorder is not None):
        raise ValueError(
            f"classifier.kernel=triton needs a CUDA device (embeddings are on {device}); "
            "on CPU only Triton's interpreter runs it (TRITON_INTERPRET=1, tests only)"
        )
    if compute_dtype not in _TRITON_DTYPES:
        raise ValueError(
            f"classifier.kernel=triton supports float32/float16/bfloat16, got {compute_dtype}; "
            "use kernel=torch (or auto)"
        )
    if fp32_refused:
        raise ValueError(
            "classifier.kernel=triton runs float32 embeddings on TF32 tensor cores, which "
            "PyTorch's fp32 matmul setting forbids (torch.backends.cuda.matmul.allow_tf32 is "
            "False); allow TF32 (torch.set_float32_matmul_precision('high')), train in "
            "bf16/fp16 (train.precision), or use kernel=torch"
        )
    return True


def target_family(device: torch.device, compute_dtype: torch.dtype) -> str:
    """Key of :data:`TILES` for launches on ``device`` with operands of ``compute_dtype``."""
    if _recorder is not None:
        arch = _recorder.arch
    elif interpreting() or device.type != "cuda":
        return "interp"
    else:
        major, minor = torch.cuda.get_device_capability(device)
        arch = 10 * major + minor
    family = "sm90" if arch >= 90 else "sm80"
    return family + "_fp32" if compute_dtype == torch.float32 else family


def _programs_wanted(device: torch.device) -> int | None:
    """~4 programs per SM on a GPU (an H100's 132 SMs when recording); None in the interpreter."""
    if _recorder is not None:
        return 4 * 132
    if device.type == "cuda":
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return None


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _round_up(a: int, b: int) -> int:
    return triton_cdiv(a, b) * b


def _split(cols: int, tiles: int, block: int, device: torch.device) -> tuple[int, int]:
    """``(splits, cols_per_split)`` of a grid of ``tiles`` programs per split (3 splits in the
    interpreter, so that the tests see several)."""
    wanted = _programs_wanted(device)
    splits = 3 if wanted is None else triton_cdiv(wanted, tiles)
    splits = max(1, min(triton_cdiv(cols, block), splits))
    per_split = _round_up(triton_cdiv(cols, splits), block)
    return triton_cdiv(cols, per_split), per_split


def _launch_with(name: str, family: str, grid: int, args: tuple[Any, ...]) -> None:
    """Launch (or record) kernel ``name`` with the tiles of ``family`` on a 1-D grid."""
    tiles = TILES[family][name]
    constexprs = dict(tiles.blocks)
    if name != "rows":  # the GEMM kernels: fp32 operands in the interpreter (its bf16 dot)
        constexprs["UPCAST"] = interpreting()
    _launch(KernelLaunch(name, (grid,), args, constexprs, tiles.num_warps, tiles.num_stages))


def _rows_arg(rows: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    """``rows``, or an unused int64 stand-in (one kernel signature with and without rows)."""
    return rows if rows is not None else torch.zeros(1, dtype=torch.int64, device=device)


def used_rows(
    weight: torch.Tensor, rows: torch.Tensor | None, plan: LossPlan
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(w_hat [Ks, D]`` normalized rows in the compute dtype, ``inv [Ks]`` fp32 1/|w|).

    One pass over the used rows (``rows``: Partial FC, gathered here once); the kernels then
    read ``w_hat`` contiguously and as 16-bit operands straight into shared memory. It lives
    from the forward to the backward: ``Ks * D * 2`` bytes for fp16/bf16.
    """
    num_cols = weight.shape[0] if rows is None else rows.shape[0]
    d = weight.shape[1]
    what = torch.empty(num_cols, d, dtype=plan.compute_dtype, device=weight.device)
    inv = torch.empty(num_cols, dtype=torch.float32, device=weight.device)
    family = target_family(weight.device, plan.compute_dtype)
    block = TILES[family]["rows"].blocks["BLOCK_R"]
    args = (weight, _rows_arg(rows, weight.device), what, inv, num_cols, d)
    flags = (int(rows is not None), int(plan.spec.normalized))
    _launch_with("rows", family, triton_cdiv(num_cols, block), args + flags)
    return what, inv


def forward_statistics(
    x_scaled: torch.Tensor,
    what: torch.Tensor,
    target_col: torch.Tensor,
    tgt_logit: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Local row max, sum-exp (relative to that max) and hardest negative logit, ``[N]`` fp32."""
    n, d = x_scaled.shape
    num_cols = what.shape[0]
    family = target_family(x_scaled.device, x_scaled.dtype)
    blocks = TILES[family]["stats"].blocks
    row_blocks = triton_cdiv(n, blocks["BLOCK_N"])
    splits, cols_per_split = _split(num_cols, row_blocks, blocks["BLOCK_C"], x_scaled.device)
    stride = _round_up(n, _ALIGN)
    parts = torch.empty(3, splits, stride, dtype=torch.float32, device=x_scaled.device)
    args = (x_scaled, what, target_col, tgt_logit.float().contiguous(), parts)
    sizes = (n, num_cols, d, cols_per_split, stride, splits * stride)
    _launch_with("stats", family, row_blocks * splits, args + sizes)
    part_max, part_sum, part_neg = parts[:, :, :n]
    # fixed-order reduction over the splits: deterministic, no atomics
    row_max = part_max.amax(dim=0)
    shift = torch.where(torch.isinf(row_max), torch.zeros_like(row_max), row_max)
    row_sum = (part_sum * torch.exp(part_max - shift)).sum(dim=0)
    return row_max, row_sum, part_neg.amax(dim=0)


def _backward_chunks(num_cols: int, n: int, plan: LossPlan, device: torch.device) -> list[int]:
    """Chunk starts of the backward (``plan.chunk_size`` columns, or ~256 MiB of G in fp32)."""
    size = plan.chunk_size or auto_chunk_size(n, device)
    return list(range(0, num_cols, size)) + [num_cols]


def weight_and_input_grads(
    x_scaled: torch.Tensor,
    weight: torch.Tensor,
    rows: torch.Tensor | None,
    what: torch.Tensor,
    inv: torch.Tensor,
    target_col: torch.Tensor,
    tgt_grad: torch.Tensor,
    lse: torch.Tensor,
    factor: torch.Tensor,
    plan: LossPlan,
    need_weight_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(sum_j G_j w_hat_j`` in the stat dtype, ``factor * dloss/dweight`` or None)."""
    n, d = x_scaled.shape
    device = x_scaled.device
    family = target_family(device, x_scaled.dtype)
    tiles = TILES[family]
    grad_x = torch.zeros(n, d, dtype=plan.stat_dtype, device=device)
    # rows outside ``rows`` keep a zero gradient; with all rows used every row is written
    grad_w = None
    if need_weight_grad:
        grad_w = torch.zeros_like(weight) if rows is not None else torch.empty_like(weight)
    starts = _backward_chunks(what.shape[0], n, plan, device)
    ldg = _round_up(max(b - a for a, b in zip(starts, starts[1:])), _g_alignment(tiles))
    g, r = _chunk_buffers(n, ldg, x_scaled.dtype, device)
    per_row = (target_col, tgt_grad.float().contiguous(), lse.float().contiguous())
    factor32 = factor.float().reshape(1)  # a pointer: no host sync on the loss gradient
    flags = (int(rows is not None), int(plan.spec.normalized))
    for c0, c1 in zip(starts, starts[1:]):
        chunk = (n, c1 - c0, d, c0, ldg)  # the kernels' N, C, D, c_offset, ldg
        grid = triton_cdiv(c1 - c0, tiles["probs"].blocks["BLOCK_C"])
        _launch_with("probs", family, grid, (x_scaled, what, *per_row, g, r, *chunk))
        if grad_w is not None:
            blocks = tiles["weight_grad"].blocks
            grid = triton_cdiv(c1 - c0, blocks["BLOCK_C"]) * triton_cdiv(d, blocks["BLOCK_D"])
            args = (g, x_scaled, weight, _rows_arg(rows, device), inv, r, grad_w, factor32)
            _launch_with("weight_grad", family, grid, args + chunk + flags)
        grad_x += _input_grad(g, what, chunk, family)
    return grad_x, grad_w


def _chunk_buffers(
    n: int, ldg: int, dtype: torch.dtype, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """G ``[n, ldg]`` (compute dtype) and r ``[ldg]`` (fp32), reused by every chunk.

    In the interpreter (tests) they start NaN-filled, so that a read of an element no kernel
    wrote shows in the results.
    """
    if interpreting():
        g = torch.full((n, ldg), float("nan"), dtype=dtype, device=device)
        return g, torch.full((ldg,), float("nan"), dtype=torch.float32, device=device)
    g = torch.empty(n, ldg, dtype=dtype, device=device)
    return g, torch.empty(ldg, dtype=torch.float32, device=device)


def _input_grad(
    g: torch.Tensor, what: torch.Tensor, chunk: tuple[int, ...], family: str
) -> torch.Tensor:
    """``G w_hat`` of one chunk, fp32 ``[N, D]``: split-K partials summed in a fixed order."""
    n, cols, d = chunk[:3]
    blocks = TILES[family]["input_grad"].blocks
    tiles = triton_cdiv(n, blocks["BLOCK_M"]) * triton_cdiv(d, blocks["BLOCK_D"])
    splits, per_split = _split(cols, tiles, blocks["BLOCK_K"], g.device)
    parts = torch.empty(splits, n, d, dtype=torch.float32, device=g.device)
    _launch_with("input_grad", family, tiles * splits, (g, what, parts, *chunk, per_split))
    return parts.sum(dim=0)


def _g_alignment(tiles: dict[str, Tiles]) -> int:
    """Columns the G buffer's width is a multiple of, so that no G read needs a column mask.

    probs_kernel writes zeros up to its next BLOCK_C boundary, input_grad_kernel reads up to
    its next BLOCK_K boundary (so BLOCK_K must divide probs' BLOCK_C), weight_grad_kernel up
    to its next BLOCK_C boundary (only into rows it does not store).
    """
    probs_c = tiles["probs"].blocks["BLOCK_C"]
    if probs_c % tiles["input_grad"].blocks["BLOCK_K"]:
        raise ValueError("TILES: input_grad BLOCK_K must divide probs BLOCK_C")
    return math.lcm(probs_c, tiles["weight_grad"].blocks["BLOCK_C"], _ALIGN)


class TritonMarginLoss(torch.autograd.Function):
    """The loss of :class:`dist_cosface.classifier.loss.ShardedMarginLoss` on Triton kernels.

    Same shapes, collectives and gradients: the contract is stated once, on
    ``ShardedMarginLoss``. Here x is fp32/fp16/bf16, and ``plan.materialize`` is ignored
    (the logits are always recomputed tile by tile). Extra memory from
    forward to backward: ``w_hat``, ``Ks x D`` in the compute dtype.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, task: LossTask) -> torch.Tensor:
        rows, target_col, plan = task.rows, task.target_col.contiguous(), task.plan
        scale = plan.spec.logit_scale
        x_scaled = (x.to(plan.stat_dtype) * scale).to(plan.compute_dtype).contiguous()
        weight_c = weight.detach().contiguous()
        tgt_cos, tgt_logit = target_stats(x, weight, rows, target_col, plan)
        what, inv = used_rows(weight_c, rows, plan)
        row_max, row_sum, hard_neg = forward_statistics(x_scaled, what, target_col, tgt_logit)
        row_max, row_sum = row_max.to(plan.stat_dtype), row_sum.to(plan.stat_dtype)
        lse, global_tgt_logit = global_log_sum_exp(
            task.comm,
            row_max,
            row_sum,
            tgt_logit,
            tgt_cos,
            hard_neg.to(plan.stat_dtype),
            plan,
            task.row_stats,
        )
        ctx.save_for_backward(
            x_scaled, weight_c, rows, target_col, tgt_cos, tgt_logit, lse, what, inv
        )
        ctx.plan = plan
        return (lse - global_tgt_logit).mean()

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor) -> tuple[Any, ...]:
        x_scaled, weight, rows, target_col, tgt_cos, tgt_logit, lse, what, inv = ctx.saved_tensors
        plan: LossPlan = ctx.plan
        # same G convention as loss.ShardedMarginLoss.backward (target column rescaled by f')
        tgt_grad, factor = backward_scales(plan, grad_loss, tgt_logit, tgt_cos, lse)
        grad_x, grad_w = weight_and_input_grads(
            x_scaled, weight, rows, what, inv, target_col, tgt_grad, lse, factor,
            plan, ctx.needs_input_grad[1],
        )  # fmt: skip
        grad_x *= factor * plan.spec.logit_scale
        return grad_x.to(x_scaled.dtype), grad_w, None
