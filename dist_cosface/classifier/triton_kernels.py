"""Triton kernels of the fused LMCL head (``classifier.kernel: triton``).

Imported only by :mod:`dist_cosface.classifier.triton_loss` when the Triton path runs (never
at package import: triton is optional). ``triton_loss`` builds every launch (grid, arguments,
tiles) as a :class:`triton_loss.KernelLaunch`; ``tools/compile_gate.py`` compiles the same
launches ahead of time for sm_90a and sm_80.

Five kernels, each one GEMM (or none) with its epilogue fused:

- ``rows_kernel``: the used weight rows, normalized, in the compute dtype ``w_hat [Ks, D]``
  and their fp32 inverse norms ``inv [Ks]`` (gathers the Partial FC rows once);
- ``stats_kernel``: logits ``x w_hat^T`` tile by tile with an online max / sum-exp and the
  hardest negative per row (forward);
- ``probs_kernel``: recomputes the logits and writes ``G = softmax - onehot`` (target column
  rescaled) in the compute dtype, plus ``r = sum_n G L`` per column (backward);
- ``weight_grad_kernel``: ``A = G^T x`` with the weight-normalization backward as epilogue;
- ``input_grad_kernel``: ``G w_hat`` split over the columns (fp32 partials, summed in order).

Every ``tl.dot`` reads operands exactly as loaded (16-bit, or fp32 on TF32): no conversion
between load and dot, so Triton's software pipeline copies them straight to shared memory
and keeps wgmma in flight on Hopper. ``UPCAST`` (interpreter only: its bf16 dot is wrong)
converts to fp32 before the dot.

Layouts (row-major): ``x [N, D]`` compute dtype, already multiplied by the logit scale;
``w_hat [Ks, D]``; ``G [N, ldg]`` (chunk columns, ``ldg`` >= chunk); ``w`` / ``grad_w``
``[K, D]`` in the weight's dtype.
"""

from __future__ import annotations

import triton
import triton.language as tl

# sizes that vary per call and the flags of cheap epilogue branches are plain runtime values:
# not specialized on, so a new N or C, or Partial FC on or off, reuses the compiled kernel
_RUNTIME = ["N", "C", "K", "c_offset", "has_rows", "normalized"]


@triton.jit
def _mma(a, b, acc, UPCAST: tl.constexpr):
    """``acc + a @ b`` on tensor cores; fp32 operands as TF32 (``triton_loss.use_triton``
    allows fp32 only where PyTorch allows TF32)."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision="tf32")


@triton.jit
def _logit_tile(
    x_ptr,
    what_ptr,
    offs_n,
    n_mask,
    offs_c,
    c_mask,
    D,
    UPCAST: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """``[BLOCK_N, BLOCK_C]`` fp32 logits ``x . w_hat`` (zero outside the masks)."""
    x_rows = x_ptr + offs_n[:, None].to(tl.int64) * D
    w_rows = what_ptr + offs_c[:, None].to(tl.int64) * D
    acc = tl.zeros((BLOCK_N, BLOCK_C), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < D
        xt = tl.load(x_rows + offs_k[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0.0)
        wt = tl.load(w_rows + offs_k[None, :], mask=c_mask[:, None] & k_mask[None, :], other=0.0)
        acc = _mma(xt, tl.trans(wt), acc, UPCAST)
    return acc


@triton.jit(do_not_specialize=_RUNTIME)
def rows_kernel(
    w_ptr,
    rows_ptr,
    what_ptr,
    inv_ptr,
    K,
    D,
    has_rows,
    normalized,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """``w_hat[i] = w[rows[i]] * inv[i]`` in ``what``'s dtype, ``inv[i] = 1 / |w[rows[i]]|``.

    Grid ``cdiv(K, BLOCK_R)``; ``K`` used rows (``has_rows`` 0: the first K). Without
    ``normalized`` (softmax) ``inv`` is 1. Norms in fp32 as the torch path's ``clamp_min(1e-12)``.
    """
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_mask = offs_r < K
    src = offs_r.to(tl.int64)
    if has_rows:
        src = tl.load(rows_ptr + offs_r, mask=r_mask, other=0).to(tl.int64)
    src_rows = w_ptr + src[:, None] * D
    dst_rows = what_ptr + offs_r[:, None].to(tl.int64) * D
    inv = tl.full((BLOCK_R,), 1.0, dtype=tl.float32)
    if normalized:
        sq = tl.zeros((BLOCK_R,), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            m = r_mask[:, None] & (offs_d < D)[None, :]
            w = tl.load(src_rows + offs_d[None, :], mask=m, other=0.0).to(tl.float32)
            sq += tl.sum(w * w, axis=1)
        inv = 1.0 / tl.maximum(tl.sqrt(sq), 1e-12)
    tl.store(inv_ptr + offs_r, inv, mask=r_mask)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        m = r_mask[:, None] & (offs_d < D)[None, :]
        w = tl.load(src_rows + offs_d[None, :], mask=m, other=0.0).to(tl.float32)
        tl.store(dst_rows + offs_d[None, :], (w * inv[:, None]).to(what_ptr.dtype.element_ty), m)


@triton.jit(do_not_specialize=_RUNTIME)
def stats_kernel(
    x_ptr,
    what_ptr,
    tcol_ptr,
    tlogit_ptr,
    part_ptr,
    N,
    C,
    D,
    cols_per_split,
    split_stride,
    stat_stride,
    UPCAST: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Per (row block, column split): partial max, sum-exp and hardest negative logit.

    Grid ``cdiv(N, BLOCK_N) * splits`` with the row blocks of one split adjacent: programs
    reading the same ``w_hat`` tiles run together, so each tile comes from HBM once (L2
    grouping). ``part``: ``[3 (max, sum-exp, negative), splits, >= N]`` fp32 with strides
    ``stat_stride``, ``split_stride``. The target column takes the margin logit ``tlogit``
    and is excluded from the negatives.
    """
    row_blocks = tl.cdiv(N, BLOCK_N)
    pid_n = tl.program_id(0) % row_blocks
    pid_s = tl.program_id(0) // row_blocks
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    tcol = tl.load(tcol_ptr + offs_n, mask=n_mask, other=-1).to(tl.int32)
    tlogit = tl.load(tlogit_ptr + offs_n, mask=n_mask, other=0.0)
    run_max = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    run_sum = tl.zeros((BLOCK_N,), dtype=tl.float32)
    run_neg = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    c_start = pid_s * cols_per_split
    c_end = tl.minimum(c_start + cols_per_split, C)
    for c0 in range(c_start, c_end, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        c_mask = offs_c < c_end
        logits = _logit_tile(
            x_ptr, what_ptr, offs_n, n_mask, offs_c, c_mask, D,
            UPCAST, BLOCK_N, BLOCK_C, BLOCK_K,
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
    out = part_ptr + pid_s * split_stride + offs_n
    tl.store(out, run_max, mask=n_mask)
    tl.store(out + stat_stride, run_sum, mask=n_mask)
    tl.store(out + 2 * stat_stride, run_neg, mask=n_mask)


@triton.jit(do_not_specialize=_RUNTIME)
def probs_kernel(
    x_ptr,
    what_ptr,
    tcol_ptr,
    tgrad_ptr,
    lse_ptr,
    g_ptr,
    r_ptr,
    N,
    C,
    D,
    c_offset,
    ldg,
    UPCAST: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """``G`` of one column tile of a chunk (columns ``c_offset + [0, C)``), all rows.

    ``G = exp(logit - lse)``, the target column ``tgrad`` = (p_t - 1) f'(cos_t), rounded to
    ``g``'s dtype (the operand of both backward GEMMs) and stored at ``g[n, c]``; also
    ``r[c] = sum_n G[n, c] L[n, c]`` (L: the logit without margin = ``w_hat_c . A_c`` of the
    weight gradient, so its normalization backward needs no full row of A).
    """
    offs_c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = offs_c < C
    cols = c_offset + offs_c
    r = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        logits = _logit_tile(
            x_ptr, what_ptr, offs_n, n_mask, cols, c_mask, D,
            UPCAST, BLOCK_N, BLOCK_C, BLOCK_K,
        )  # fmt: skip
        lse = tl.load(lse_ptr + offs_n, mask=n_mask, other=0.0)
        tcol = tl.load(tcol_ptr + offs_n, mask=n_mask, other=-1).to(tl.int32)
        tgrad = tl.load(tgrad_ptr + offs_n, mask=n_mask, other=0.0)
        g = tl.exp(logits - lse[:, None])
        g = tl.where(cols[None, :] == tcol[:, None], tgrad[:, None], g)
        g = tl.where(n_mask[:, None] & c_mask[None, :], g, 0.0).to(g_ptr.dtype.element_ty)
        # the tile's columns past C are stored as zeros (ldg covers them): the GEMMs reading G
        # then need no mask along its contiguous axis, which keeps their loads vectorized and
        # asynchronous (a per-element mask there breaks the pipeline)
        tl.store(
            g_ptr + offs_n[:, None].to(tl.int64) * ldg + offs_c[None, :], g, mask=n_mask[:, None]
        )
        r += tl.sum(g.to(tl.float32) * logits, axis=0)
    tl.store(r_ptr + offs_c, r, mask=c_mask)


@triton.jit(do_not_specialize=_RUNTIME)
def weight_grad_kernel(
    g_ptr,
    x_ptr,
    w_ptr,
    rows_ptr,
    inv_ptr,
    r_ptr,
    gw_ptr,
    factor_ptr,
    N,
    C,
    D,
    c_offset,
    ldg,
    has_rows,
    normalized,
    UPCAST: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """``factor * d/dw`` of a ``[BLOCK_C, BLOCK_D]`` tile of the chunk's weight rows.

    ``A = G^T x`` over all rows (M = BLOCK_C weight rows), then the weight-normalization
    backward ``inv (A - w inv r)`` (``r = w_hat . A`` from ``probs_kernel``) as epilogue,
    written once per element at the weight row (``rows``: Partial FC). Grid
    ``cdiv(C, BLOCK_C) * cdiv(D, BLOCK_D)``, the D tiles of one row tile adjacent (they read
    the same G columns).
    """
    d_tiles = tl.cdiv(D, BLOCK_D)
    pid_c = tl.program_id(0) // d_tiles
    pid_d = tl.program_id(0) % d_tiles
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = offs_c < C
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    acc = tl.zeros((BLOCK_C, BLOCK_D), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        # columns past C (< ldg) hold zeros or a previous chunk's G: they only reach rows of A
        # that are not stored
        gt = tl.load(
            g_ptr + offs_n[:, None].to(tl.int64) * ldg + offs_c[None, :],
            mask=n_mask[:, None],
            other=0.0,
        )
        xt = tl.load(
            x_ptr + offs_n[:, None].to(tl.int64) * D + offs_d[None, :],
            mask=n_mask[:, None] & d_mask[None, :],
            other=0.0,
        )
        acc = _mma(tl.trans(gt), xt, acc, UPCAST)
    cols = c_offset + offs_c
    w_row = cols.to(tl.int64)
    if has_rows:
        w_row = tl.load(rows_ptr + cols, mask=c_mask, other=0).to(tl.int64)
    w_offsets = w_row[:, None] * D + offs_d[None, :]
    wd_mask = c_mask[:, None] & d_mask[None, :]
    factor = tl.load(factor_ptr)
    grad = acc * factor
    if normalized:
        w = tl.load(w_ptr + w_offsets, mask=wd_mask, other=0.0).to(tl.float32)
        inv = tl.load(inv_ptr + cols, mask=c_mask, other=0.0)
        r = tl.load(r_ptr + offs_c, mask=c_mask, other=0.0)
        grad = (acc - w * (inv * r)[:, None]) * (inv * factor)[:, None]
    tl.store(gw_ptr + w_offsets, grad.to(gw_ptr.dtype.element_ty), mask=wd_mask)


@triton.jit(do_not_specialize=_RUNTIME)
def input_grad_kernel(
    g_ptr,
    what_ptr,
    part_ptr,
    N,
    C,
    D,
    c_offset,
    ldg,
    cols_per_split,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """``part[s] = G[:, split s] @ w_hat[split s]``, ``[splits, N, D]`` fp32.

    Grid ``cdiv(N, BLOCK_M) * cdiv(D, BLOCK_D) * splits``: the output is small (``[N, D]``),
    so the chunk's columns are split over programs (split-K); the partials are summed in a
    fixed order afterwards (deterministic, no atomics). The programs of one split are adjacent
    and read the same ``w_hat`` rows (L2 grouping).
    """
    d_tiles = tl.cdiv(D, BLOCK_D)
    tiles = tl.cdiv(N, BLOCK_M) * d_tiles
    pid_s = tl.program_id(0) // tiles
    pid_m = tl.program_id(0) % tiles // d_tiles
    pid_d = tl.program_id(0) % d_tiles
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < N
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    c_start = pid_s * cols_per_split
    c_end = tl.minimum(c_start + cols_per_split, C)
    g_rows = g_ptr + offs_m[:, None].to(tl.int64) * ldg
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for k0 in range(c_start, c_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < c_end
        # G's columns past C up to the next BLOCK_K are zeros (probs_kernel), no column mask
        gt = tl.load(g_rows + offs_k[None, :], mask=m_mask[:, None], other=0.0)
        wt = tl.load(
            what_ptr + (c_offset + offs_k)[:, None].to(tl.int64) * D + offs_d[None, :],
            mask=k_mask[:, None] & d_mask[None, :],
            other=0.0,
        )
        acc = _mma(gt, wt, acc, UPCAST)
    out = part_ptr + pid_s.to(tl.int64) * N * D + offs_m[:, None].to(tl.int64) * D
    tl.store(out + offs_d[None, :], acc, mask=m_mask[:, None] & d_mask[None, :])
