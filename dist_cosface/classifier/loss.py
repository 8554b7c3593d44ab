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
import torch.distributed as dist

from dist_cosface.classifier.comm import Comm
from dist_cosface.classifier.margins import MarginSpec, target_fn, target_fn_grad

# fp32 logits per automatic chunk: near cache size on CPU; on GPU large enough that the
# matmuls stay efficient and the per-chunk kernel launches are amortized
_CHUNK_LOGIT_BYTES = {"cpu": 8 * 2**20, "cuda": 256 * 2**20}


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
    """Classes per chunk so that one chunk's fp32 logits take ~8 MiB (CPU) or ~256 MiB (GPU)."""
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
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Weight rows of columns [c0, c1) in fp32, normalized if needed, and their 1/norm."""
    w = weight[c0:c1] if rows is None else weight[rows[c0:c1]]
    w = w.to(plan.stat_dtype)
    if not plan.spec.normalized:
        return w, None
    inv_norm = w.norm(dim=1).clamp_min(1e-12).reciprocal()
    return w * inv_norm[:, None], inv_norm


def _chunk_logits(
    x: torch.Tensor,
    w_hat: torch.Tensor,
    target_col: torch.Tensor,
    target_logit: torch.Tensor,
    c0: int,
    plan: LossPlan,
) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 logits [N, c] of one chunk with the margin target logit in place, and the mask."""
    cos = (x @ w_hat.to(plan.compute_dtype).t()).to(plan.stat_dtype)
    cols = torch.arange(c0, c0 + w_hat.shape[0], device=x.device)
    is_target = cols[None, :] == target_col[:, None]
    logits = cos * plan.spec.logit_scale
    return torch.where(is_target, target_logit[:, None], logits), is_target


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


class ShardedMarginLoss(torch.autograd.Function):
    """Mean over the global batch of ``logsumexp_j(logit_j) - logit_target``.

    Shapes (N: global batch, D: embedding width, K: local classes, Ks: used local classes):
      x ``[N, D]``: gathered embeddings in the compute dtype (L2-normalized unless softmax),
      weight ``[K, D]``: this rank's class rows (raw, normalized per chunk),
      rows ``[Ks]`` int64 or None: local rows in use (Partial FC), None means all K,
      target_col ``[N]`` int64: column of the sample's class among the used rows, -1 when
      another rank owns it.
    Returns the scalar loss (identical on every rank).

    Collectives per call: forward 2 all-reduces on ``plan``'s group (row max: MAX over
    ``[N]``; sum-exp and target logit: SUM over ``[2, N]``); backward none (every rank
    already holds the global log-sum-exp, the embedding gradient is summed by the
    all-gather's backward).
    Gradients: exact d(loss)/dx (this rank's classes' share) and d(loss)/dweight (zero on
    unused rows).
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        rows: torch.Tensor | None,
        target_col: torch.Tensor,
        plan: LossPlan,
        comm: Comm,
    ) -> torch.Tensor:
        num_cols = weight.shape[0] if rows is None else rows.shape[0]
        n = x.shape[0]
        tgt_cos, tgt_logit = _target_stats(x, weight, rows, target_col, plan)
        run_max = torch.full((n,), float("-inf"), dtype=plan.stat_dtype, device=x.device)
        run_sum = torch.zeros(n, dtype=plan.stat_dtype, device=x.device)
        kept = []
        for c0, c1 in _chunks(num_cols, plan, x):
            w_hat, _ = _chunk_weight(weight, rows, c0, c1, plan)
            logits, _ = _chunk_logits(x, w_hat, target_col, tgt_logit, c0, plan)
            new_max = torch.maximum(run_max, logits.amax(dim=1))
            run_sum = run_sum * torch.exp(run_max - new_max) + torch.exp(
                logits - new_max[:, None]
            ).sum(dim=1)
            run_max = new_max
            if plan.materialize:
                kept.append(logits)
        global_max = run_max.clone()
        comm.all_reduce_(global_max, dist.ReduceOp.MAX)
        sums = torch.stack([run_sum * torch.exp(run_max - global_max), tgt_logit])
        comm.all_reduce_(sums)
        lse = global_max + sums[0].log()
        ctx.save_for_backward(x, weight, rows, target_col, tgt_cos, tgt_logit, lse)
        ctx.plan, ctx.kept = plan, kept
        return (lse - sums[1]).mean()

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor) -> tuple[Any, ...]:
        x, weight, rows, target_col, tgt_cos, tgt_logit, lse = ctx.saved_tensors
        plan: LossPlan = ctx.plan
        num_cols = weight.shape[0] if rows is None else rows.shape[0]
        scale = grad_loss.to(plan.stat_dtype) / x.shape[0]
        # dlogit/dcos: s everywhere, s * f'(c) at the target column
        tgt_slope = target_fn_grad(plan.spec, tgt_cos) * plan.spec.logit_scale
        grad_x = torch.zeros(x.shape, dtype=plan.stat_dtype, device=x.device)
        grad_w = torch.zeros_like(weight)
        for i, (c0, c1) in enumerate(_chunks(num_cols, plan, x)):
            w_hat, inv_norm = _chunk_weight(weight, rows, c0, c1, plan)
            if plan.materialize:
                logits = ctx.kept[i]
                is_target = _target_mask(target_col, c0, c1)
            else:
                logits, is_target = _chunk_logits(x, w_hat, target_col, tgt_logit, c0, plan)
            grad_cos = _grad_cos(logits, lse, is_target, tgt_slope, plan.spec.logit_scale)
            # grad_cos is O(s), safe in fp16; the 1/N factor is applied after the matmul in
            # fp32 so small probabilities do not underflow
            gc = grad_cos.to(plan.compute_dtype)
            grad_x += (gc @ w_hat.to(plan.compute_dtype)).to(grad_x.dtype) * scale
            grad_w_hat = (gc.t() @ x).to(grad_x.dtype) * scale
            _store_weight_grad(grad_w, rows, c0, c1, grad_w_hat, w_hat, inv_norm)
        ctx.kept = None
        return grad_x.to(x.dtype), grad_w, None, None, None, None


def _target_mask(target_col: torch.Tensor, c0: int, c1: int) -> torch.Tensor:
    cols = torch.arange(c0, c1, device=target_col.device)
    return cols[None, :] == target_col[:, None]


def _grad_cos(
    logits: torch.Tensor,
    lse: torch.Tensor,
    is_target: torch.Tensor,
    tgt_slope: torch.Tensor,
    logit_scale: float,
) -> torch.Tensor:
    """``N * d(loss)/d(cos)`` of one chunk: (softmax - onehot) times dlogit/dcos."""
    probs = torch.exp(logits - lse[:, None])
    at_target = (probs - 1.0) * tgt_slope[:, None]
    return torch.where(is_target, at_target, probs * logit_scale)


def _store_weight_grad(
    grad_w: torch.Tensor,
    rows: torch.Tensor | None,
    c0: int,
    c1: int,
    grad_w_hat: torch.Tensor,
    w_hat: torch.Tensor,
    inv_norm: torch.Tensor | None,
) -> None:
    if inv_norm is not None:
        # backward of w / |w|: (g - w_hat (w_hat . g)) / |w|
        radial = (grad_w_hat * w_hat).sum(dim=1, keepdim=True)
        grad_w_hat = (grad_w_hat - w_hat * radial) * inv_norm[:, None]
    grad = grad_w_hat.to(grad_w.dtype)
    if rows is None:
        grad_w[c0:c1] = grad
    else:
        grad_w.index_copy_(0, rows[c0:c1], grad)
