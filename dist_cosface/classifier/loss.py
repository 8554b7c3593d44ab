"""Vocab-parallel margin softmax cross-entropy over a class-sharded weight, chunked.

The scheme follows Megatron's vocab-parallel cross-entropy: each rank computes logits only
for the classes it owns, and three per-sample statistics are combined over the group: the
row max (all-reduce MAX), then the rescaled sum of exponentials together with the target
logit (one all-reduce SUM of a ``[2, N]`` tensor). The local logits are produced ``chunk``
classes at a time with an online max / sum-exp, and recomputed chunk by chunk in backward,
so only ``O(N x chunk)`` extra memory is live besides the weight gradient.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from dist_cosface.classifier.comm import Comm
from dist_cosface.classifier.health import RowStats, RowStatsSlot, reduce_row_max, reduce_row_sums
from dist_cosface.classifier.margins import MarginSpec, target_fn, target_fn_grad

# fp32 logits per automatic chunk: near cache size on CPU; on GPU large enough that the
# matmuls stay efficient and the per-chunk kernel launches are amortized
_CHUNK_LOGIT_BYTES = {"cpu": 4 * 2**20, "cuda": 256 * 2**20}


@dataclass(frozen=True)
class LossPlan:
    """How one step's loss is computed (everything that is not a tensor)."""

    spec: MarginSpec
    chunk_size: int | None  # None: automatic
    materialize: bool
    compute_dtype: torch.dtype  # matmul dtype; softmax statistics are fp32 (fp64 for fp64)

    @property
    def stat_dtype(self) -> torch.dtype:
        return torch.promote_types(self.compute_dtype, torch.float32)


def auto_chunk_size(num_rows: int, device: torch.device) -> int:
    """Classes per chunk so that one chunk's fp32 logits take ~4 MiB (CPU) or ~256 MiB (GPU)."""
    budget = _CHUNK_LOGIT_BYTES.get(device.type, _CHUNK_LOGIT_BYTES["cpu"])
    return max(256, budget // (4 * max(num_rows, 1)))


def _chunks(num_cols: int, plan: LossPlan, x: torch.Tensor) -> list[tuple[int, int]]:
    if plan.materialize:
        size = max(num_cols, 1)
    else:
        size = plan.chunk_size or auto_chunk_size(x.shape[0], x.device)
    return [(c0, min(c0 + size, num_cols)) for c0 in range(0, num_cols, size)]


def _chunk_weight(
    weight: torch.Tensor, rows: torch.Tensor | None, c0: int, c1: int, plan: LossPlan
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Rows of columns [c0, c1): raw (stat dtype), matmul operand (normalized, compute
    dtype) and 1/norm (None without normalization)."""
    w = weight[c0:c1] if rows is None else weight[rows[c0:c1]]
    w = w.to(plan.stat_dtype)
    if not plan.spec.normalized:
        return w, w.to(plan.compute_dtype), None
    inv_norm = w.norm(dim=1).clamp_min(1e-12).reciprocal()
    w_hat = w.to(plan.compute_dtype, copy=True).mul_(inv_norm.to(plan.compute_dtype)[:, None])
    return w, w_hat, inv_norm


def _mm(a: torch.Tensor, b: torch.Tensor, plan: LossPlan) -> torch.Tensor:
    """``a @ b`` in the compute dtype with a result in the stat dtype (fp32 for half).

    On CUDA a half-precision GEMM writes its fp32 accumulator directly (``out_dtype``), which
    is both more accurate and cheaper than rounding to half and casting back.
    """
    if a.is_cuda and plan.compute_dtype != plan.stat_dtype:
        return torch.mm(a, b, out_dtype=plan.stat_dtype)
    return (a @ b).to(plan.stat_dtype)


def _chunk_logits(x_scaled: torch.Tensor, w_hat: torch.Tensor, plan: LossPlan) -> torch.Tensor:
    """``s * cos`` (or ``W x`` for softmax) of one chunk, [N, c] in the stat dtype."""
    return _mm(x_scaled, w_hat.t(), plan)


def _put_targets(
    block: torch.Tensor, target_col: torch.Tensor, values: torch.Tensor, c0: int
) -> None:
    """``block[i, target_col[i] - c0] = values[i]`` for targets inside the chunk, in O(N)."""
    local = target_col - c0
    inside = (local >= 0) & (local < block.shape[1])
    index = local.clamp(0, block.shape[1] - 1)[:, None]
    current = block.gather(1, index).squeeze(1)
    block.scatter_(1, index, torch.where(inside, values, current)[:, None])


def _target_stats(
    x: torch.Tensor,
    weight: torch.Tensor,
    rows: torch.Tensor | None,
    target_col: torch.Tensor,
    plan: LossPlan,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample target cosine and margin logit; zero where another rank owns the target."""
    owned = target_col >= 0
    col = target_col.clamp_min(0)
    row = col if rows is None else rows[col]
    w = weight[row].to(plan.stat_dtype)
    if plan.spec.normalized:
        w = w / w.norm(dim=1, keepdim=True).clamp_min(1e-12)
    cos = (x.to(plan.stat_dtype) * w).sum(dim=1)
    logit = target_fn(plan.spec, cos) * plan.spec.logit_scale
    zero = torch.zeros_like(cos)
    return torch.where(owned, cos, zero), torch.where(owned, logit, zero)


def global_log_sum_exp(
    comm: Comm,
    row_max: torch.Tensor,
    row_sum: torch.Tensor,
    tgt_logit: torch.Tensor,
    tgt_cos: torch.Tensor,
    local_neg: torch.Tensor,
    plan: LossPlan,
    row_stats: RowStatsSlot | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(lse [N], target logit [N])`` of the global batch from this rank's shares.

    ``row_sum`` is relative to ``row_max``; ``tgt_logit`` / ``tgt_cos`` are 0 where another
    rank owns the target; ``local_neg`` is the local hardest negative logit. The two
    all-reduces carry the margin-health rows only when ``row_stats`` asks for them (shared
    by the torch and Triton paths).
    """
    want = row_stats is not None
    global_max, global_neg = reduce_row_max(comm, row_max, local_neg if want else None)
    sum_exp, global_tgt_logit, global_tgt_cos = reduce_row_sums(
        comm, row_sum * torch.exp(row_max - global_max), tgt_logit, tgt_cos if want else None
    )
    if want:
        row_stats.value = RowStats(global_tgt_cos, global_neg / plan.spec.logit_scale)
    return global_max + sum_exp.log(), global_tgt_logit


def backward_scales(
    plan: LossPlan,
    grad_loss: torch.Tensor,
    tgt_logit: torch.Tensor,
    tgt_cos: torch.Tensor,
    lse: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(target column of G [N], factor)`` for the backward of both kernels (torch, Triton).

    G = d(N * loss)/d(logit) with the target column rescaled to dlogit = s f'(c) dcos, so
    that d/dx_hat = s G W_hat and d/dW_hat = G^T (s x_hat) hold for every column; G is in
    [-f'(c), 1] (fp16 safe) and ``factor`` = grad_loss / N is applied after the matmuls in
    fp32.
    """
    tgt_grad = (torch.exp(tgt_logit - lse) - 1.0) * target_fn_grad(plan.spec, tgt_cos)
    if plan.compute_dtype == torch.float16:
        # ArcFace's f'(c) is unbounded as c -> 1; keep G finite in fp16
        tgt_grad = tgt_grad.clamp(-6e4, 6e4)
    return tgt_grad, grad_loss.to(plan.stat_dtype) / tgt_logit.shape[0]


@dataclass(frozen=True)
class LossTask:
    """The non-differentiable inputs of one margin-loss forward (torch or Triton kernels).

    rows ``[Ks]`` int64 or None: local rows in use (Partial FC), None means all K;
    target_col ``[N]`` int64: column of the sample's class among the used rows, -1 when
    another rank owns it; plan: the maths and dtypes; comm: the group the two all-reduces run
    on; row_stats: a :class:`health.RowStatsSlot` to receive the global per-row target and
    hardest-negative cosines (margin health), or None.
    """

    rows: torch.Tensor | None
    target_col: torch.Tensor
    plan: LossPlan
    comm: Comm
    row_stats: RowStatsSlot | None = None


class ShardedMarginLoss(torch.autograd.Function):
    """Mean over the global batch of ``logsumexp_j(logit_j) - logit_target``.

    Shapes (N: global batch, D: embedding width, K: local classes, Ks: used local classes):
      x ``[N, D]``: gathered embeddings in the compute dtype (L2-normalized unless softmax),
      weight ``[K, D]``: this rank's class rows (raw, normalized per chunk),
      task: a :class:`LossTask` (used rows, target columns, plan, group, margin-health slot).
    Returns the scalar loss (identical on every rank).

    Collectives per call: forward 2 all-reduces on ``comm``'s group (row max: MAX over
    ``[N]``, ``[2, N]`` with ``row_stats``; sum-exp and target logit: SUM over ``[2, N]``,
    ``[3, N]`` with ``row_stats``); backward none (every rank
    already holds the global log-sum-exp; the embedding gradient is summed over ranks by the
    all-gather's backward).
    Gradients: exact d(loss)/dx (this rank's classes' share) and d(loss)/dweight (zero on
    unused rows).
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, task: LossTask) -> torch.Tensor:
        rows, target_col, plan = task.rows, task.target_col, task.plan
        num_cols = weight.shape[0] if rows is None else rows.shape[0]
        n = x.shape[0]
        # the scale is folded into the small [N, D] operand instead of every logit
        x_scaled = (x.to(plan.stat_dtype) * plan.spec.logit_scale).to(plan.compute_dtype)
        tgt_cos, tgt_logit = _target_stats(x, weight, rows, target_col, plan)
        neg_inf = torch.full((n,), float("-inf"), dtype=plan.stat_dtype, device=x.device)
        # the row max starts at the (owned) target logit, so each chunk's max can be taken
        # over its non-target columns only: the same single pass also yields the hardest
        # negative that the margin-health statistics need
        run_max = torch.where(target_col >= 0, tgt_logit, neg_inf)
        run_neg = neg_inf.clone()
        run_sum = torch.zeros(n, dtype=plan.stat_dtype, device=x.device)
        kept = None
        for c0, c1 in _chunks(num_cols, plan, x):
            _, w_hat, _ = _chunk_weight(weight, rows, c0, c1, plan)
            logits = _chunk_logits(x_scaled, w_hat, plan)
            _put_targets(logits, target_col, neg_inf, c0)
            chunk_neg = logits.amax(dim=1)
            run_neg = torch.maximum(run_neg, chunk_neg)
            _put_targets(logits, target_col, tgt_logit, c0)
            new_max = torch.maximum(run_max, chunk_neg)
            run_sum.mul_(torch.exp(run_max - new_max))
            if plan.materialize:
                kept = logits  # reused by backward; the exponentials go to a temporary
                logits = logits - new_max[:, None]
            else:
                logits.sub_(new_max[:, None])
            run_sum.add_(logits.exp_().sum(dim=1))
            run_max = new_max
        lse, global_tgt_logit = global_log_sum_exp(
            task.comm, run_max, run_sum, tgt_logit, tgt_cos, run_neg, plan, task.row_stats
        )
        ctx.save_for_backward(x_scaled, weight, rows, target_col, tgt_cos, tgt_logit, lse)
        ctx.plan, ctx.kept = plan, kept
        return (lse - global_tgt_logit).mean()

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor) -> tuple[Any, ...]:
        x_scaled, weight, rows, target_col, tgt_cos, tgt_logit, lse = ctx.saved_tensors
        plan: LossPlan = ctx.plan
        num_cols = weight.shape[0] if rows is None else rows.shape[0]
        tgt_grad, factor = backward_scales(plan, grad_loss, tgt_logit, tgt_cos, lse)
        grad_x = torch.zeros(x_scaled.shape, dtype=plan.stat_dtype, device=x_scaled.device)
        grad_w = torch.zeros_like(weight) if ctx.needs_input_grad[1] else None
        for c0, c1 in _chunks(num_cols, plan, x_scaled):
            w, w_hat, inv_norm = _chunk_weight(weight, rows, c0, c1, plan)
            logits = ctx.kept if plan.materialize else _chunk_logits(x_scaled, w_hat, plan)
            probs = logits.sub_(lse[:, None]).exp_()
            _put_targets(probs, target_col, tgt_grad, c0)
            g = probs.to(plan.compute_dtype)
            grad_x += _mm(g, w_hat, plan)
            if grad_w is not None:
                grad_w_hat = _mm(g.t(), x_scaled, plan)  # d(N loss / factor)/d(w_hat)
                _store_weight_grad(grad_w, rows, c0, c1, grad_w_hat, w, inv_norm, factor)
        ctx.kept = None
        grad_x *= factor * plan.spec.logit_scale
        return grad_x.to(x_scaled.dtype), grad_w, None


def _store_weight_grad(
    grad_w: torch.Tensor,
    rows: torch.Tensor | None,
    c0: int,
    c1: int,
    grad_w_hat: torch.Tensor,
    w: torch.Tensor,
    inv_norm: torch.Tensor | None,
    factor: torch.Tensor,
) -> None:
    """Write ``factor * d/dw`` of one chunk, given ``A = d/dw_hat`` (overwritten)."""
    if inv_norm is None:
        grad = grad_w_hat.mul_(factor)
    else:
        # backward of w_hat = w / |w|: (A - w_hat (w_hat . A)) / |w|, computed from the raw
        # rows as inv * A - w * (inv^3 (w . A)) to avoid materializing w_hat in fp32
        dots = (w * grad_w_hat).sum(dim=1)
        grad = grad_w_hat.addcmul_(w, (dots * inv_norm * inv_norm)[:, None], value=-1.0)
        grad.mul_((inv_norm * factor)[:, None])
    if rows is None:
        grad_w[c0:c1] = grad
    else:
        grad_w.index_copy_(0, rows[c0:c1], grad.to(grad_w.dtype))
