"""Triton kernels of the fused LMCL head: forward softmax statistics and the weight gradient.

Imported only by :mod:`dist_cosface.classifier.triton_loss` when the Triton path is chosen
(never at package import: triton is optional). Under ``TRITON_INTERPRET=1`` (CPU tests) the
same kernels run in Triton's interpreter; ``DOT_FP32`` then converts half operands to fp32
before ``tl.dot`` (the interpreter's half-precision dot is wrong).

Layout: ``x [N, D]`` (compute dtype, already multiplied by the logit scale), ``w [K, D]``
(raw rows, any float dtype), ``rows [Ks]`` (optional row indices: Partial FC), ``inv [Ks]``
(fp32 inverse row norms; weight normalization is applied to the logits' columns, so no
normalized copy of the weight is ever made).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _tile_logits(
    x_ptr,
    w_ptr,
    rows_ptr,
    inv_ptr,
    offs_n,
    n_mask,
    offs_c,
    c_mask,
    D,
    HAS_ROWS: tl.constexpr,
    NORMALIZED: tl.constexpr,
    DOT_FP32: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """``[BLOCK_N, BLOCK_C]`` fp32 logits ``x . w_hat`` of one tile (zero outside the masks)."""
    if HAS_ROWS:
        w_row = tl.load(rows_ptr + offs_c, mask=c_mask, other=0).to(tl.int64)
    else:
        w_row = offs_c.to(tl.int64)
    acc = tl.zeros((BLOCK_N, BLOCK_C), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < D
        xt = tl.load(
            x_ptr + offs_n[:, None].to(tl.int64) * D + offs_k[None, :],
            mask=n_mask[:, None] & k_mask[None, :],
            other=0.0,
        )
        wt = tl.load(
            w_ptr + w_row[:, None] * D + offs_k[None, :],
            mask=c_mask[:, None] & k_mask[None, :],
            other=0.0,
        )
        if DOT_FP32:
            xt, wt = xt.to(tl.float32), wt.to(tl.float32)
            acc = tl.dot(xt, tl.trans(wt), acc, input_precision="ieee")
        else:
            acc = tl.dot(xt, tl.trans(wt.to(xt.dtype)), acc)
    if NORMALIZED:
        inv = tl.load(inv_ptr + offs_c, mask=c_mask, other=0.0)
        acc = acc * inv[None, :]
    return acc


@triton.jit
def stats_kernel(
    x_ptr,
    w_ptr,
    rows_ptr,
    inv_ptr,
    tcol_ptr,
    tlogit_ptr,
    max_ptr,
    sum_ptr,
    neg_ptr,
    N,
    C,
    D,
    cols_per_split,
    HAS_ROWS: tl.constexpr,
    NORMALIZED: tl.constexpr,
    DOT_FP32: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Per (row block, column split): partial max, sum-exp and hardest negative logit.

    Grid ``(cdiv(N, BLOCK_N), splits)``; row blocks vary fastest, so programs reading the
    same weight tiles run side by side (L2 reuse). Outputs ``[splits, N]`` fp32 each; the
    target column takes the margin logit ``tlogit`` and is excluded from the negatives.
    """
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    tcol = tl.load(tcol_ptr + offs_n, mask=n_mask, other=-1)
    tlogit = tl.load(tlogit_ptr + offs_n, mask=n_mask, other=0.0)
    run_max = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    run_sum = tl.zeros((BLOCK_N,), dtype=tl.float32)
    run_neg = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    c_start = pid_s * cols_per_split
    c_end = tl.minimum(c_start + cols_per_split, C)
    for c0 in range(c_start, c_end, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        c_mask = offs_c < c_end
        logits = _tile_logits(
            x_ptr, w_ptr, rows_ptr, inv_ptr, offs_n, n_mask, offs_c, c_mask, D,
            HAS_ROWS, NORMALIZED, DOT_FP32, BLOCK_N, BLOCK_C, BLOCK_K,
        )  # fmt: skip
        is_target = offs_c[None, :] == tcol[:, None]
        valid = c_mask[None, :] & n_mask[:, None]
        negatives = tl.where(valid & (~is_target), logits, float("-inf"))
        run_neg = tl.maximum(run_neg, tl.max(negatives, axis=1))
        logits = tl.where(is_target, tlogit[:, None], logits)
        logits = tl.where(valid, logits, float("-inf"))
        new_max = tl.maximum(run_max, tl.max(logits, axis=1))
        # rows with no valid column yet keep max -inf: shift by 0 there (exp(-inf) = 0)
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        run_sum = run_sum * tl.exp(run_max - shift) + tl.sum(tl.exp(logits - shift[:, None]), 1)
        run_max = new_max
    out = pid_s * N + offs_n
    tl.store(max_ptr + out, run_max, mask=n_mask)
    tl.store(sum_ptr + out, run_sum, mask=n_mask)
    tl.store(neg_ptr + out, run_neg, mask=n_mask)


@triton.jit
def grad_kernel(
    x_ptr,
    w_ptr,
    rows_ptr,
    inv_ptr,
    tcol_ptr,
    tgrad_ptr,
    lse_ptr,
    g_ptr,
    gw_ptr,
    factor_ptr,
    N,
    C,
    D,
    c_offset,
    HAS_ROWS: tl.constexpr,
    NORMALIZED: tl.constexpr,
    DOT_FP32: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """One column tile of a chunk of ``C`` columns starting at ``c_offset``.

    Recomputes the logits over all row blocks, forms ``G = softmax - onehot`` (target
    column: ``tgrad`` = (p_t - 1) f'(cos_t)), stores G (compute dtype, ``[N, C]``) for the dX
    GEMM, accumulates ``A = G^T x`` over the rows and writes, once per weight row,
    ``factor * d/dw`` with the weight-normalization backward
    ``inv * A - w * inv^3 (w . A)`` fused into the epilogue.
    """
    pid = tl.program_id(0)
    offs_local = pid * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = offs_local < C
    offs_c = c_offset + offs_local
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    acc = tl.zeros((BLOCK_C, BLOCK_D), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        logits = _tile_logits(
            x_ptr, w_ptr, rows_ptr, inv_ptr, offs_n, n_mask, offs_c, c_mask, D,
            HAS_ROWS, NORMALIZED, DOT_FP32, BLOCK_N, BLOCK_C, BLOCK_K,
        )  # fmt: skip
        lse = tl.load(lse_ptr + offs_n, mask=n_mask, other=0.0)
        tcol = tl.load(tcol_ptr + offs_n, mask=n_mask, other=-1)
        tgrad = tl.load(tgrad_ptr + offs_n, mask=n_mask, other=0.0)
        g = tl.exp(logits - lse[:, None])
        g = tl.where(offs_c[None, :] == tcol[:, None], tgrad[:, None], g)
        g = tl.where(n_mask[:, None] & c_mask[None, :], g, 0.0)
        xt = tl.load(
            x_ptr + offs_n[:, None].to(tl.int64) * D + offs_d[None, :],
            mask=n_mask[:, None] & d_mask[None, :],
            other=0.0,
        )
        g_half = g.to(xt.dtype)  # the operand the torch path rounds to as well
        tl.store(
            g_ptr + offs_n[:, None].to(tl.int64) * C + offs_local[None, :],
            g_half,
            mask=n_mask[:, None] & c_mask[None, :],
        )
        if DOT_FP32:
            acc = tl.dot(
                tl.trans(g_half.to(tl.float32)), xt.to(tl.float32), acc, input_precision="ieee"
            )
        else:
            acc = tl.dot(tl.trans(g_half), xt, acc)
    if HAS_ROWS:
        w_row = tl.load(rows_ptr + offs_c, mask=c_mask, other=0).to(tl.int64)
    else:
        w_row = offs_c.to(tl.int64)
    w_offsets = w_row[:, None] * D + offs_d[None, :]
    wd_mask = c_mask[:, None] & d_mask[None, :]
    factor = tl.load(factor_ptr)
    if NORMALIZED:
        w = tl.load(w_ptr + w_offsets, mask=wd_mask, other=0.0).to(tl.float32)
        inv = tl.load(inv_ptr + offs_c, mask=c_mask, other=0.0)
        dots = tl.sum(w * acc, axis=1)
        grad = (acc - w * (dots * inv * inv)[:, None]) * (inv * factor)[:, None]
    else:
        grad = acc * factor
    tl.store(gw_ptr + w_offsets, grad.to(gw_ptr.dtype.element_ty), mask=wd_mask)
