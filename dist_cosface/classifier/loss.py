"""Vocab-parallel margin softmax cross-entropy over a class-sharded weight, chunked.

The scheme follows Megatron's vocab-parallel cross-entropy: each rank computes logits only
for the classes it owns, and three per-sample statistics are combined over the group: the
row max (all-reduce MAX), then the rescaled sum of exponentials together with the target
logit (one all-reduce SUM of a ``[2, N]`` tensor). The local logits are produced ``chunk``
classes at a time with an online max / sum-exp, and recomputed chunk by chunk in backward,
so only ``O(N x chunk)`` extra memory is live besides the weight gradient.

What the Triton path shares with this one (plan, chunks, target statistics, the two
all-reduces, backward scales) lives in ``loss_common.py``; the contract both keep is the
docstring of :class:`ShardedMarginLoss`.
"""

from __future__ import annotations

from typing import Any

import torch

from dist_cosface.classifier.loss_common import (
    LossPlan,
    LossTask,
    backward_scales,
    column_chunks,
    global_log_sum_exp,
    stat_matmul,
    target_stats,
)


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


def _chunk_logits(x_scaled: torch.Tensor, w_hat: torch.Tensor, plan: LossPlan) -> torch.Tensor:
    """``s * cos`` (or ``W x`` for softmax) of one chunk, [N, c] in the stat dtype."""
    return stat_matmul(x_scaled, w_hat.t(), plan)


def _put_targets(
    block: torch.Tensor, target_col: torch.Tensor, values: torch.Tensor, c0: int
) -> None:
    """``block[i, target_col[i] - c0] = values[i]`` for targets inside the chunk, in O(N)."""
    local = target_col - c0
    inside = (local >= 0) & (local < block.shape[1])
    index = local.clamp(0, block.shape[1] - 1)[:, None]
    current = block.gather(1, index).squeeze(1)
    block.scatter_(1, index, torch.where(inside, values, current)[:, None])


class ShardedMarginLoss(torch.autograd.Function):
    """Mean over the global batch of ``logsumexp_j(logit_j) - logit_target``, torch kernels.

    This docstring is the contract of every kernel path (also
    ``triton_loss.TritonMarginLoss``, which refers here).

    Shapes (N: global batch, D: embedding width, K: local classes, Ks: used local classes):
      x ``[N, D]``: gathered embeddings in the compute dtype (L2-normalized unless softmax),
      weight ``[K, D]``: this rank's class rows (raw; normalized inside, per chunk or tile),
      task: a :class:`loss_common.LossTask` (used rows, target columns, plan, group,
      margin-health slot).
    Returns the scalar loss (identical on every rank).

    Collectives per call, on ``task.comm``'s group and only through
    :func:`loss_common.global_log_sum_exp`: forward 2 all-reduces (row max: MAX over ``[N]``,
    ``[2, N]`` with ``task.row_stats``; sum-exp and target logit: SUM over ``[2, N]``,
    ``[3, N]`` with ``task.row_stats``); backward none (every rank already holds the global
    log-sum-exp; the embedding gradient is summed over ranks by the all-gather's backward,
    see "Gradient convention" in ``head.py``).
    Gradients: exact d(loss)/dx (this rank's classes' share) and d(loss)/dweight (zero on
    unused rows), both formed from :func:`loss_common.backward_scales` (the target column of
    G and the ``grad_loss / N`` factor).
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, task: LossTask) -> torch.Tensor:
        rows, target_col, plan = task.rows, task.target_col, task.plan
        num_cols = weight.shape[0] if rows is None else rows.shape[0]
        n = x.shape[0]
        # the scale is folded into the small [N, D] operand instead of every logit
        x_scaled = (x.to(plan.stat_dtype) * plan.spec.logit_scale).to(plan.compute_dtype)
        tgt_cos, tgt_logit = target_stats(x, weight, rows, target_col, plan)
        neg_inf = torch.full((n,), float("-inf"), dtype=plan.stat_dtype, device=x.device)
        # the row max starts at the (owned) target logit, so each chunk's max can be taken
        # over its non-target columns only: the same single pass also yields the hardest
        # negative that the margin-health statistics need
        run_max = torch.where(target_col >= 0, tgt_logit, neg_inf)
        run_neg = neg_inf.clone()
        run_sum = torch.zeros(n, dtype=plan.stat_dtype, device=x.device)
        kept = None
        for c0, c1 in column_chunks(num_cols, plan, x):
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
        for c0, c1 in column_chunks(num_cols, plan, x_scaled):
            w, w_hat, inv_norm = _chunk_weight(weight, rows, c0, c1, plan)
            logits = ctx.kept if plan.materialize else _chunk_logits(x_scaled, w_hat, plan)
            probs = logits.sub_(lse[:, None]).exp_()
            _put_targets(probs, target_col, tgt_grad, c0)
            g = probs.to(plan.compute_dtype)
            grad_x += stat_matmul(g, w_hat, plan)
            if grad_w is not None:
                grad_w_hat = stat_matmul(g.t(), x_scaled, plan)  # d(N loss / factor)/d(w_hat)
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
