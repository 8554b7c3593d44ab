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
    class_rows,
    column_chunks,
    global_log_sum_exp,
    margin_param_grad,
    reduce_target_cos,
    stat_matmul,
    target_cosines,
    target_logits,
)
from dist_cosface.classifier.margins import (
    CurricularFace,
    MarginState,
    RowParams,
    margin_of,
    with_threshold,
)


def _chunk_weight(
    weight: torch.Tensor, rows: torch.Tensor | None, c0: int, c1: int, plan: LossPlan
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Weight rows of the classes in columns [c0, c1): raw (stat dtype), matmul operand
    (normalized, compute dtype) and 1/norm (None without normalization).

    With K sub-centers the raw rows are ``[K, c, D]`` (a view of the weight without Partial FC,
    c = c1 - c0) and the operand's rows are sub-center-major: row ``j * c + i`` is sub-center j
    of the chunk's class i, so that each sub-center's logits are one contiguous column block
    (:func:`_class_logits`); :func:`_store_weight_grad` writes them back class-major."""
    if plan.subcenters == 1:
        w = weight[c0:c1] if rows is None else weight[rows[c0:c1]]
    else:
        by_subcenter = class_rows(weight, plan.subcenters).transpose(0, 1)  # [K, classes, D]
        w = by_subcenter[:, c0:c1] if rows is None else by_subcenter[:, rows[c0:c1]]
    w = w.to(plan.stat_dtype)
    dim = weight.shape[1]
    if not plan.spec.normalized:
        return w, w.to(plan.compute_dtype).reshape(-1, dim), None
    inv_norm = w.norm(dim=-1).clamp_min(1e-12).reciprocal()
    w_hat = w.to(plan.compute_dtype, copy=True, memory_format=torch.contiguous_format)
    w_hat = w_hat.mul_(inv_norm.to(plan.compute_dtype)[..., None]).view(-1, dim)
    return w, w_hat, inv_norm


def _class_logits(
    x_scaled: torch.Tensor, w_hat: torch.Tensor, plan: LossPlan
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``s * cos`` (or ``W x`` for softmax) of one chunk's classes, [N, c] in the stat dtype
    (with sub-centers the max over each class's K), and with sub-centers the row logits
    ``[N, K * c]`` (sub-center-major, see :func:`_chunk_weight`; None for K = 1)."""
    logits = stat_matmul(x_scaled, w_hat.t(), plan)
    k = plan.subcenters
    if k == 1:
        return logits, None
    parts = logits.chunk(k, dim=1)
    values = torch.maximum(parts[0], parts[1])
    for part in parts[2:]:
        torch.maximum(values, part, out=values)
    return values, logits


def _nearest_subcenters(row_logits: torch.Tensor, values: torch.Tensor) -> list[torch.Tensor]:
    """K boolean [N, c] masks: where sub-center j is the entry's nearest (the first one on a
    tie), from the row logits and their per-class max given by :func:`_class_logits`."""
    parts = row_logits.chunk(row_logits.shape[1] // values.shape[1], dim=1)
    hits = [parts[0] == values]
    taken = hits[0]
    for part in parts[1:-1]:
        hit = (part == values).logical_and_(~taken)
        hits.append(hit)
        taken = taken | hit
    hits.append(~taken)  # the max is one of the sub-centers: the last one where none before
    return hits


def _spread_to_subcenters(
    g: torch.Tensor,
    hits: list[torch.Tensor] | None,
    target_col: torch.Tensor,
    target_nearest: torch.Tensor,
    c0: int,
) -> torch.Tensor:
    """[N, c] class gradient -> [N, K * c] row gradient (sub-center-major, see
    :func:`_chunk_weight`), on each entry's nearest sub-center (``hits``).

    A target's nearest sub-center is the one :func:`loss_common.target_cosines` chose (the
    two computations may break a near-tie differently in half precision)."""
    if hits is None:
        return g
    c = g.shape[1]
    rows = g.new_empty(g.shape[0], len(hits) * c)
    target = g.gather(1, (target_col - c0).clamp(0, c - 1)[:, None]).squeeze(1)
    zero = torch.zeros_like(target)
    for j, hit in enumerate(hits):
        block = rows[:, j * c : (j + 1) * c]
        torch.mul(g, hit.view(torch.uint8), out=block)  # a uint8 factor is cheaper than bool
        _put_targets(block, target_col, torch.where(target_nearest == j, target, zero), c0)
    return rows


def _put_targets(
    block: torch.Tensor, target_col: torch.Tensor, values: torch.Tensor, c0: int
) -> None:
    """``block[i, target_col[i] - c0] = values[i]`` for targets inside the chunk, in O(N)."""
    local = target_col - c0
    inside = (local >= 0) & (local < block.shape[1])
    index = local.clamp(0, block.shape[1] - 1)[:, None]
    current = block.gather(1, index).squeeze(1)
    block.scatter_(1, index, torch.where(inside, values, current)[:, None])


def _reweight_negatives_(logits: torch.Tensor, params: RowParams, scale: float) -> None:
    """CurricularFace on a chunk of ``s c`` logits, in place: ``s c (t + c)`` where
    ``c > cos(theta_y + m)`` (targets are overwritten afterwards, -inf stays -inf)."""
    CurricularFace.reweight_(logits, params.hard_threshold[:, None], params.t, scale)


def _count_subcenters(
    state: MarginState | None,
    rows: torch.Tensor | None,
    target_col: torch.Tensor,
    nearest: torch.Tensor,
) -> None:
    """Add this forward's owned targets to ``state.subcenter_hits[class, nearest]``."""
    if state is None or state.subcenter_hits is None:
        return
    owned = target_col >= 0
    cls = target_col[owned] if rows is None else rows[target_col[owned]]
    hits = state.subcenter_hits
    flat = cls * hits.shape[1] + nearest[owned]
    hits.view(-1).index_add_(0, flat, torch.ones_like(flat))


class ShardedMarginLoss(torch.autograd.Function):
    """Mean over the global batch of ``logsumexp_j(logit_j) - logit_target``, torch kernels.

    This docstring is the contract of every kernel path (also
    ``triton_loss.TritonMarginLoss``, which refers here).

    Shapes (N: global batch, D: embedding width, K: local classes, Ks: used local classes,
    k: sub-centers per class, ``task.plan.subcenters``):
      x ``[N, D]``: gathered embeddings in the compute dtype (L2-normalized unless softmax),
      weight ``[K * k, D]``: this rank's class rows, a class's k rows consecutive (raw;
      normalized inside, per chunk or tile),
      task: a :class:`loss_common.LossTask` (used classes, target columns, plan, group,
      margin-health slot, per-row margin parameters, margin state),
      margin_param ``[N]`` or None (torch kernels only): the differentiable per-row margin
      (MagFace's m(a), the same values as ``task.params.angle``); its gradient is returned.
    Returns the scalar loss (identical on every rank).

    Collectives per call, on ``task.comm``'s group and only through
    :func:`loss_common.global_log_sum_exp`: forward 2 all-reduces (row max: MAX over ``[N]``,
    ``[2, N]`` with ``task.row_stats``; sum-exp and target logit: SUM over ``[2, N]``,
    ``[3, N]`` with ``task.row_stats``); backward none (every rank already holds the global
    log-sum-exp; the embedding gradient is summed over ranks by the all-gather's backward,
    see "Gradient convention" in ``head.py``). CurricularFace adds one all-reduce SUM of the
    ``[N]`` target cosines before the pass (its hard-negative threshold and t need them).
    Gradients: exact d(loss)/dx (this rank's classes' share) and d(loss)/dweight (zero on
    unused rows, and on the sub-centers that are not an entry's nearest), both formed from
    :func:`loss_common.backward_scales` (the target column of G and the ``grad_loss / N``
    factor); d(loss)/d(margin_param) on the rows whose target this rank owns.
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        task: LossTask,
        margin_param: torch.Tensor | None = None,
    ) -> torch.Tensor:
        rows, target_col, plan = task.rows, task.target_col, task.plan
        num_cols = weight.shape[0] // plan.subcenters if rows is None else rows.shape[0]
        n = x.shape[0]
        scale = plan.spec.logit_scale
        # the scale is folded into the small [N, D] operand instead of every logit
        x_scaled = (x.to(plan.stat_dtype) * scale).to(plan.compute_dtype)
        tgt_cos, tgt_nearest = target_cosines(x, weight, rows, target_col, plan)
        if task.update_state and tgt_nearest is not None:
            _count_subcenters(task.state, rows, target_col, tgt_nearest)
        params = _negative_params(task, tgt_cos)
        tgt_logit = target_logits(tgt_cos, target_col, plan, params)
        reweight = params is not None and params.hard_threshold is not None
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
            logits, row_logits = _class_logits(x_scaled, w_hat, plan)
            if plan.materialize:  # backward reuses them (K masks, not row logits); edits: a copy
                hits = None if row_logits is None else _nearest_subcenters(row_logits, logits)
                kept = (logits, hits)
                logits = logits.clone()
            _put_targets(logits, target_col, neg_inf, c0)
            chunk_neg = logits.amax(dim=1)  # hardest negative by cosine (margin health)
            run_neg = torch.maximum(run_neg, chunk_neg)
            if reweight:
                _reweight_negatives_(logits, params, scale)
                chunk_neg = logits.amax(dim=1)
            _put_targets(logits, target_col, tgt_logit, c0)
            new_max = torch.maximum(run_max, chunk_neg)
            run_sum.mul_(torch.exp(run_max - new_max))
            logits.sub_(new_max[:, None])
            run_sum.add_(logits.exp_().sum(dim=1))
            run_max = new_max
        lse, global_tgt_logit = global_log_sum_exp(
            task.comm, run_max, run_sum, tgt_logit, tgt_cos, run_neg, plan, task.row_stats
        )
        ctx.save_for_backward(
            x_scaled, weight, rows, target_col, tgt_cos, tgt_logit, lse, tgt_nearest
        )
        ctx.plan, ctx.kept, ctx.params = plan, kept, params
        return (lse - global_tgt_logit).mean()

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor) -> tuple[Any, ...]:
        x_scaled, weight, rows, target_col, tgt_cos, tgt_logit, lse, tgt_nearest = ctx.saved_tensors
        plan: LossPlan = ctx.plan
        params: RowParams | None = ctx.params
        k = plan.subcenters
        num_cols = weight.shape[0] // k if rows is None else rows.shape[0]
        tgt_grad, factor = backward_scales(plan, grad_loss, tgt_logit, tgt_cos, lse, params)
        grad_x = torch.zeros(x_scaled.shape, dtype=plan.stat_dtype, device=x_scaled.device)
        grad_w = torch.zeros_like(weight) if ctx.needs_input_grad[1] else None
        for c0, c1 in column_chunks(num_cols, plan, x_scaled):
            w, w_hat, inv_norm = _chunk_weight(weight, rows, c0, c1, plan)
            if plan.materialize:
                logits, hits = ctx.kept
            else:
                logits, row_logits = _class_logits(x_scaled, w_hat, plan)
                hits = None if row_logits is None else _nearest_subcenters(row_logits, logits)
            probs = _probabilities(logits, lse, params, plan.spec.logit_scale)
            _put_targets(probs, target_col, tgt_grad, c0)
            g = probs.to(plan.compute_dtype)
            g = _spread_to_subcenters(g, hits, target_col, tgt_nearest, c0)
            grad_x += stat_matmul(g, w_hat, plan)
            if grad_w is not None:
                grad_w_hat = stat_matmul(g.t(), x_scaled, plan)  # d(N loss / factor)/d(w_hat)
                _store_weight_grad(grad_w, rows, c0, c1, grad_w_hat, w, inv_norm, factor, k)
        ctx.kept = None
        grad_x *= factor * plan.spec.logit_scale
        grad_param = None
        if ctx.needs_input_grad[3]:
            grad_param = margin_param_grad(
                plan, factor, tgt_logit, tgt_cos, lse, target_col, params
            )
        return grad_x.to(x_scaled.dtype), grad_w, None, grad_param


def _negative_params(task: LossTask, tgt_cos: torch.Tensor) -> RowParams | None:
    """The per-row parameters, with CurricularFace's hard threshold and t added (after one
    all-reduce of the target cosines; t updated on training forwards)."""
    margin = margin_of(task.plan.spec)
    params = task.params.detached() if task.params is not None else None
    if not margin.reweights_negatives:
        return params
    global_cos = reduce_target_cos(task.comm, tgt_cos)
    threshold, t = margin.negative_params(global_cos, task.state, task.update_state)
    return with_threshold(params, threshold, t)


def _probabilities(
    logits: torch.Tensor, lse: torch.Tensor, params: RowParams | None, scale: float
) -> torch.Tensor:
    """``softmax`` of one chunk (its logits may be overwritten), times the negatives'
    derivative where CurricularFace reweighted them: ``G`` but for the target column."""
    if params is None or params.hard_threshold is None:
        return logits.sub_(lse[:, None]).exp_()
    threshold = params.hard_threshold[:, None]
    hard, t_plus_c = CurricularFace.reweight_(logits, threshold, params.t, scale)
    probs = logits.sub_(lse[:, None]).exp_()
    return probs.mul_(CurricularFace.reweight_grad_(hard, t_plus_c, params.t))


def _store_weight_grad(
    grad_w: torch.Tensor,
    rows: torch.Tensor | None,
    c0: int,
    c1: int,
    grad_w_hat: torch.Tensor,
    w: torch.Tensor,
    inv_norm: torch.Tensor | None,
    factor: torch.Tensor,
    subcenters: int,
) -> None:
    """Write ``factor * d/dw`` of one chunk's rows, given ``A = d/dw_hat`` (overwritten), the
    raw rows ``w`` and ``inv_norm`` as :func:`_chunk_weight` returned them."""
    grad_w_hat = grad_w_hat.view(w.shape)
    if inv_norm is None:
        grad = grad_w_hat.mul_(factor)
    else:
        # backward of w_hat = w / |w|: (A - w_hat (w_hat . A)) / |w|, computed from the raw
        # rows as inv * A - w * (inv^3 (w . A)) to avoid materializing w_hat in fp32
        dots = (w * grad_w_hat).sum(dim=-1)
        grad = grad_w_hat.addcmul_(w, (dots * inv_norm * inv_norm)[..., None], value=-1.0)
        grad.mul_((inv_norm * factor)[..., None])
    grad = grad.to(grad_w.dtype)
    if subcenters == 1:
        if rows is None:
            grad_w[c0:c1] = grad
        else:
            grad_w.index_copy_(0, rows[c0:c1], grad)
        return
    by_subcenter = class_rows(grad_w, subcenters).transpose(0, 1)  # [K, classes, D]
    if rows is None:
        by_subcenter[:, c0:c1] = grad
    else:
        by_subcenter.index_copy_(1, rows[c0:c1], grad)
