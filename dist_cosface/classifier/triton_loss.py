"""The LMCL head's loss on fused Triton kernels (``classifier.kernel: triton``).

Same maths, collectives and gradients as :class:`dist_cosface.classifier.loss.ShardedMarginLoss`
(see docs/classifier.md, "Triton kernels"): the forward statistics kernel produces per-row
partial max / sum-exp per class split (reduced here in a fixed order, so the result is
deterministic), the two all-reduces are unchanged, and the backward recomputes the logits
tile by tile in one kernel per column chunk that writes ``G`` for the dX GEMM and the weight
gradient once per row. triton is imported only when this path runs.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from dist_cosface.classifier.config import KERNELS
from dist_cosface.classifier.loss_common import (
    LossPlan,
    LossTask,
    backward_scales,
    column_chunks,
    global_log_sum_exp,
    stat_matmul,
    target_stats,
)

_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# tile sizes: GPU (H100/H200 class, not tuned on hardware yet) and interpreter (small: the
# interpreter runs programs one at a time, numpy-backed)
# (the backward keeps a [GRAD_BLOCK_C, D] fp32 accumulator and a [GRAD_BLOCK_N, D] operand per
# program, hence smaller row blocks and more warps there)
_GPU_TILES = {
    "BLOCK_N": 64, "BLOCK_C": 64, "BLOCK_K": 64, "STATS_WARPS": 4,
    "GRAD_BLOCK_N": 32, "GRAD_BLOCK_C": 32, "GRAD_WARPS": 8,
}  # fmt: skip
_INTERP_TILES = {
    "BLOCK_N": 16, "BLOCK_C": 32, "BLOCK_K": 32, "STATS_WARPS": 4,
    "GRAD_BLOCK_N": 16, "GRAD_BLOCK_C": 32, "GRAD_WARPS": 4,
}  # fmt: skip


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def use_triton(kernel: str, device: torch.device, compute_dtype: torch.dtype) -> bool:
    """Resolve ``classifier.kernel`` for one forward; raise when ``triton`` cannot run."""
    if kernel not in KERNELS:
        raise ValueError(f"classifier.kernel must be one of {list(KERNELS)}, got {kernel!r}")
    if kernel == "torch":
        return False
    runnable = device.type == "cuda" or interpreting()
    if kernel == "auto":
        return device.type == "cuda" and compute_dtype in _TRITON_DTYPES and triton_available()
    if not triton_available():
        raise ValueError("classifier.kernel=triton needs the 'triton' package (pip install triton)")
    if not runnable:
        raise ValueError(
            f"classifier.kernel=triton needs a CUDA device (embeddings are on {device}); "
            "on CPU only Triton's interpreter runs it (TRITON_INTERPRET=1, tests only)"
        )
    if compute_dtype not in _TRITON_DTYPES:
        raise ValueError(
            f"classifier.kernel=triton supports float32/float16/bfloat16, got {compute_dtype}; "
            "use kernel=torch (or auto)"
        )
    return True


def _tiles() -> dict[str, int]:
    return _INTERP_TILES if interpreting() else _GPU_TILES


def _num_splits(num_cols: int, row_blocks: int, block_c: int, device: torch.device) -> int:
    """Column splits of the statistics grid: ~4 programs per SM (3 in the interpreter)."""
    tiles = triton_cdiv(num_cols, block_c)
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        wanted = triton_cdiv(4 * sms, row_blocks)
    else:
        wanted = 3
    return max(1, min(tiles, wanted))


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _inverse_norms(
    weight: torch.Tensor, rows: torch.Tensor | None, normalized: bool
) -> torch.Tensor:
    """fp32 ``1 / |w|`` of the used rows (a dummy when logits are not normalized)."""
    if not normalized:
        return torch.empty(1, dtype=torch.float32, device=weight.device)
    w = weight if rows is None else weight[rows]
    return w.float().norm(dim=1).clamp_min(1e-12).reciprocal()


def forward_statistics(
    x_scaled: torch.Tensor,
    weight: torch.Tensor,
    rows: torch.Tensor | None,
    inv: torch.Tensor,
    target_col: torch.Tensor,
    tgt_logit: torch.Tensor,
    plan: LossPlan,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Local row max, sum-exp (relative to that max) and hardest negative logit, ``[N]`` fp32."""
    from dist_cosface.classifier import triton_kernels as tk

    n, d = x_scaled.shape
    num_cols = weight.shape[0] if rows is None else rows.shape[0]
    t = _tiles()
    row_blocks = triton_cdiv(n, t["BLOCK_N"])
    splits = _num_splits(num_cols, row_blocks, t["BLOCK_C"], x_scaled.device)
    cols_per_split = triton_cdiv(triton_cdiv(num_cols, splits), t["BLOCK_C"]) * t["BLOCK_C"]
    splits = triton_cdiv(num_cols, cols_per_split)
    parts = torch.empty(3, splits, n, dtype=torch.float32, device=x_scaled.device)
    tk.stats_kernel[(row_blocks, splits)](
        x_scaled, weight, _rows_arg(rows, target_col), inv, target_col,
        tgt_logit.float().contiguous(), parts[0], parts[1], parts[2],
        n, num_cols, d, cols_per_split,
        HAS_ROWS=rows is not None, NORMALIZED=plan.spec.normalized,
        DOT_FP32=interpreting() or x_scaled.dtype == torch.float32,
        BLOCK_N=t["BLOCK_N"], BLOCK_C=t["BLOCK_C"], BLOCK_K=t["BLOCK_K"],
        num_warps=t["STATS_WARPS"],
    )  # fmt: skip
    part_max, part_sum, part_neg = parts
    # fixed-order reduction over the splits: deterministic, no atomics
    row_max = part_max.amax(dim=0)
    shift = torch.where(torch.isinf(row_max), torch.zeros_like(row_max), row_max)
    row_sum = (part_sum * torch.exp(part_max - shift)).sum(dim=0)
    return row_max, row_sum, part_neg.amax(dim=0)


def _rows_arg(rows: torch.Tensor | None, fallback: torch.Tensor) -> torch.Tensor:
    return rows if rows is not None else fallback  # unused pointer when HAS_ROWS is False


def weight_and_input_grads(
    x_scaled: torch.Tensor,
    weight: torch.Tensor,
    rows: torch.Tensor | None,
    inv: torch.Tensor,
    target_col: torch.Tensor,
    tgt_grad: torch.Tensor,
    lse: torch.Tensor,
    factor: torch.Tensor,
    plan: LossPlan,
    need_weight_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(sum_j G_j w_hat_j`` in the stat dtype, ``factor * dloss/dweight`` or None)."""
    from dist_cosface.classifier import triton_kernels as tk

    n, d = x_scaled.shape
    num_cols = weight.shape[0] if rows is None else rows.shape[0]
    t = _tiles()
    grad_x = torch.zeros(n, d, dtype=plan.stat_dtype, device=x_scaled.device)
    # rows outside ``rows`` keep a zero gradient; with all rows used every row is written
    grad_w = torch.zeros_like(weight) if rows is not None else torch.empty_like(weight)
    lse32, tgrad32 = lse.float().contiguous(), tgt_grad.float().contiguous()
    factor32 = factor.float().reshape(1)  # a pointer: no host sync on the loss gradient
    for c0, c1 in column_chunks(num_cols, plan, x_scaled):
        g = torch.empty(n, c1 - c0, dtype=x_scaled.dtype, device=x_scaled.device)
        tk.grad_kernel[(triton_cdiv(c1 - c0, t["GRAD_BLOCK_C"]),)](
            x_scaled, weight, _rows_arg(rows, target_col), inv, target_col, tgrad32, lse32,
            g, grad_w, factor32, n, c1 - c0, d, c0,
            HAS_ROWS=rows is not None, NORMALIZED=plan.spec.normalized,
            DOT_FP32=interpreting() or x_scaled.dtype == torch.float32,
            BLOCK_N=t["GRAD_BLOCK_N"], BLOCK_C=t["GRAD_BLOCK_C"], BLOCK_K=t["BLOCK_K"],
            BLOCK_D=_next_pow2(d), num_warps=t["GRAD_WARPS"],
        )  # fmt: skip
        grad_x += stat_matmul(g, _normalized_rows(weight, rows, inv, c0, c1, plan), plan)
    return grad_x, (grad_w if need_weight_grad else None)


def _normalized_rows(
    weight: torch.Tensor,
    rows: torch.Tensor | None,
    inv: torch.Tensor,
    c0: int,
    c1: int,
    plan: LossPlan,
) -> torch.Tensor:
    """``W_hat`` of columns [c0, c1) in the compute dtype, from the forward's inverse norms."""
    w = weight[c0:c1] if rows is None else weight[rows[c0:c1]]
    w = w.to(plan.compute_dtype, copy=True)
    if plan.spec.normalized:
        w.mul_(inv[c0:c1].to(plan.compute_dtype)[:, None])
    return w


def _next_pow2(v: int) -> int:
    return 1 << max(v - 1, 0).bit_length()


class TritonMarginLoss(torch.autograd.Function):
    """The loss of :class:`dist_cosface.classifier.loss.ShardedMarginLoss` on Triton kernels.

    Same shapes, collectives and gradients: the contract is stated once, on
    ``ShardedMarginLoss``. Here x is fp32/fp16/bf16, and ``plan.materialize`` is ignored
    (the logits are always recomputed tile by tile).
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, task: LossTask) -> torch.Tensor:
        rows, target_col, plan = task.rows, task.target_col, task.plan
        scale = plan.spec.logit_scale
        x_scaled = (x.to(plan.stat_dtype) * scale).to(plan.compute_dtype).contiguous()
        weight_c = weight.detach().contiguous()
        tgt_cos, tgt_logit = target_stats(x, weight, rows, target_col, plan)
        inv = _inverse_norms(weight_c, rows, plan.spec.normalized)
        row_max, row_sum, hard_neg = forward_statistics(
            x_scaled, weight_c, rows, inv, target_col.contiguous(), tgt_logit, plan
        )
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
        ctx.save_for_backward(x_scaled, weight_c, rows, target_col, tgt_cos, tgt_logit, lse, inv)
        ctx.plan = plan
        return (lse - global_tgt_logit).mean()

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor) -> tuple[Any, ...]:
        x_scaled, weight, rows, target_col, tgt_cos, tgt_logit, lse, inv = ctx.saved_tensors
        plan: LossPlan = ctx.plan
        # same G convention as loss.ShardedMarginLoss.backward (target column rescaled by f')
        tgt_grad, factor = backward_scales(plan, grad_loss, tgt_logit, tgt_cos, lse)
        grad_x, grad_w = weight_and_input_grads(
            x_scaled, weight, rows, inv, target_col.contiguous(), tgt_grad, lse, factor,
            plan, ctx.needs_input_grad[1],
        )  # fmt: skip
        grad_x *= factor * plan.spec.logit_scale
        return grad_x.to(x_scaled.dtype), grad_w, None
