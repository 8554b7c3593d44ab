"""What the torch and the Triton loss paths share: one module that both import.

The loss's inputs (:class:`LossPlan`, :class:`LossTask`), its column chunks, the matmul with
a stat-dtype result, the per-sample target statistics, the loss's own two collectives
(:func:`reduce_row_max`, :func:`reduce_row_sums`, combined in :func:`global_log_sum_exp`) and
the backward's scales. The contract every kernel path keeps (shapes, collectives, gradients)
is stated once, on :class:`dist_cosface.classifier.loss.ShardedMarginLoss`.

Columns are classes. With K sub-centers (``plan.subcenters``) a class owns K consecutive
weight rows (``weight.view(-1, K, D)``) and its cosine is the max over them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from dist_cosface.classifier.comm import Comm
from dist_cosface.classifier.margins import (
    MarginSpec,
    MarginState,
    RowParams,
    margin_of,
    target_fn,
    target_fn_grad,
)

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
    subcenters: int = 1  # K weight rows per class (column); the class cosine is their max

    @property
    def stat_dtype(self) -> torch.dtype:
        return torch.promote_types(self.compute_dtype, torch.float32)


@dataclass(frozen=True)
class LossTask:
    """The non-differentiable inputs of one margin-loss forward (torch or Triton kernels).

    rows ``[Ks]`` int64 or None: local rows in use (Partial FC), None means all K;
    target_col ``[N]`` int64: column of the sample's class among the used rows, -1 when
    another rank owns it; plan: the maths and dtypes; comm: the group the two all-reduces run
    on; row_stats: a :class:`RowStatsSlot` to receive the global per-row target and
    hardest-negative cosines (margin health), or None; params: the per-row margin parameters
    of the global batch (AdaFace, MagFace), or None; state: the head's
    :class:`margins.MarginState` (running statistics, sub-center hits), updated by the
    forward when ``update_state`` (training forwards).
    """

    rows: torch.Tensor | None
    target_col: torch.Tensor
    plan: LossPlan
    comm: Comm
    row_stats: RowStatsSlot | None = None
    params: RowParams | None = None
    state: MarginState | None = None
    update_state: bool = False


@dataclass
class RowStats:
    """Per-row statistics of the global batch, identical on every rank (margin health's
    input: see ``health.py``)."""

    target_cos: torch.Tensor  # [N]
    hardest_neg_cos: torch.Tensor  # [N]


class RowStatsSlot:
    """Where a loss forward leaves its :class:`RowStats` when the caller asked for them."""

    def __init__(self) -> None:
        self.value: RowStats | None = None


def auto_chunk_size(num_rows: int, device: torch.device) -> int:
    """Classes per chunk so that one chunk's fp32 logits take ~4 MiB (CPU) or ~256 MiB (GPU)."""
    budget = _CHUNK_LOGIT_BYTES.get(device.type, _CHUNK_LOGIT_BYTES["cpu"])
    return max(256, budget // (4 * max(num_rows, 1)))


def column_chunks(num_cols: int, plan: LossPlan, x: torch.Tensor) -> list[tuple[int, int]]:
    """``[(c0, c1), ...]``: the column (class) ranges one pass visits (one with materialize).

    The automatic size keeps a chunk's row logits (``K`` per class) near the same budget."""
    if plan.materialize:
        size = max(num_cols, 1)
    else:
        size = plan.chunk_size or max(1, auto_chunk_size(x.shape[0], x.device) // plan.subcenters)
    return [(c0, min(c0 + size, num_cols)) for c0 in range(0, num_cols, size)]


def class_rows(weight: torch.Tensor, subcenters: int) -> torch.Tensor:
    """``[K_classes, subcenters, D]`` view of the ``[K_classes * subcenters, D]`` weight."""
    return weight.view(-1, subcenters, weight.shape[1])


def stat_matmul(a: torch.Tensor, b: torch.Tensor, plan: LossPlan) -> torch.Tensor:
    """``a @ b`` in the compute dtype with a result in the stat dtype (fp32 for half).

    On CUDA a half-precision GEMM writes its fp32 accumulator directly (``out_dtype``), which
    is both more accurate and cheaper than rounding to half and casting back.
    """
    if a.is_cuda and plan.compute_dtype != plan.stat_dtype:
        return torch.mm(a, b, out_dtype=plan.stat_dtype)
    return (a @ b).to(plan.stat_dtype)


def reduce_row_max(
    comm: Comm, row_max: torch.Tensor, local_neg: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Global row max (the log-sum-exp shift) and, if given, the global hardest negative.

    One all-reduce MAX either way: ``[N]`` without statistics, ``[2, N]`` with them.
    """
    if local_neg is None:
        out = row_max.clone()
        comm.all_reduce_(out, dist.ReduceOp.MAX)
        return out, None
    packed = torch.stack([row_max, local_neg])
    comm.all_reduce_(packed, dist.ReduceOp.MAX)
    return packed[0], packed[1]


def reduce_row_sums(
    comm: Comm, sum_exp: torch.Tensor, target_logit: torch.Tensor, target_cos: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Global (sum-exp, target logit[, target cosine]): one all-reduce SUM of ``[2|3, N]``.

    Each input is this rank's share (0 for rows whose target another rank owns)."""
    parts = [sum_exp, target_logit] if target_cos is None else [sum_exp, target_logit, target_cos]
    sums = torch.stack(parts)
    comm.all_reduce_(sums)
    return sums[0], sums[1], (sums[2] if target_cos is not None else None)


def reduce_target_cos(comm: Comm, target_cos: torch.Tensor) -> torch.Tensor:
    """The global target cosines from this rank's share (0 where another rank owns the
    target): one all-reduce SUM of ``[N]``. Only CurricularFace needs them before its pass."""
    out = target_cos.clone()
    comm.all_reduce_(out)
    return out


def target_cosines(
    x: torch.Tensor,
    weight: torch.Tensor,
    rows: torch.Tensor | None,
    target_col: torch.Tensor,
    plan: LossPlan,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-sample target cosine (the max over the class's sub-centers) and, with sub-centers,
    the index of the nearest one; 0 / -1 where another rank owns the target."""
    owned = target_col >= 0
    col = target_col.clamp_min(0)
    cls = col if rows is None else rows[col]
    k = plan.subcenters
    w = class_rows(weight, k)[cls].to(plan.stat_dtype)  # [N, K, D]
    if plan.spec.normalized:
        w = w / w.norm(dim=2, keepdim=True).clamp_min(1e-12)
    cos = (w * x.to(plan.stat_dtype)[:, None, :]).sum(dim=2)
    if k == 1:
        return torch.where(owned, cos[:, 0], torch.zeros_like(cos[:, 0])), None
    cos, nearest = cos.max(dim=1)
    return (
        torch.where(owned, cos, torch.zeros_like(cos)),
        torch.where(owned, nearest, torch.full_like(nearest, -1)),
    )


def target_stats(
    x: torch.Tensor,
    weight: torch.Tensor,
    rows: torch.Tensor | None,
    target_col: torch.Tensor,
    plan: LossPlan,
    params: RowParams | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample target cosine and margin logit; zero where another rank owns the target."""
    cos, _ = target_cosines(x, weight, rows, target_col, plan)
    return cos, target_logits(cos, target_col, plan, params)


def target_logits(
    cos: torch.Tensor, target_col: torch.Tensor, plan: LossPlan, params: RowParams | None
) -> torch.Tensor:
    """``s f(c)`` of the owned targets, 0 elsewhere."""
    logit = target_fn(plan.spec, cos, params) * plan.spec.logit_scale
    return torch.where(target_col >= 0, logit, torch.zeros_like(logit))


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
    params: RowParams | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(target column of G [N], factor)`` for the backward of both kernels (torch, Triton).

    G = d(N * loss)/d(logit) with the target column rescaled to dlogit = s f'(c) dcos, so
    that d/dx_hat = s G W_hat and d/dW_hat = G^T (s x_hat) hold for every column; G is in
    [-f'(c), 1] (fp16 safe) and ``factor`` = grad_loss / N is applied after the matmuls in
    fp32.
    """
    tgt_grad = (torch.exp(tgt_logit - lse) - 1.0) * target_fn_grad(plan.spec, tgt_cos, params)
    if plan.compute_dtype == torch.float16:
        # ArcFace's f'(c) is unbounded as c -> 1; keep G finite in fp16
        tgt_grad = tgt_grad.clamp(-6e4, 6e4)
    return tgt_grad, grad_loss.to(plan.stat_dtype) / tgt_logit.shape[0]


def margin_param_grad(
    plan: LossPlan,
    factor: torch.Tensor,
    tgt_logit: torch.Tensor,
    tgt_cos: torch.Tensor,
    lse: torch.Tensor,
    target_col: torch.Tensor,
    params: RowParams,
) -> torch.Tensor:
    """d(loss)/d(per-row margin) ``[N]`` (MagFace): ``factor s (p_t - 1) df/dm`` on the rows
    whose target this rank owns, 0 elsewhere (the all-gather's backward sums the ranks)."""
    margin = margin_of(plan.spec)
    dfdm = margin.target_grad_param(tgt_cos, params)
    grad = factor * plan.spec.logit_scale * (torch.exp(tgt_logit - lse) - 1.0) * dfdm
    return torch.where(target_col >= 0, grad, torch.zeros_like(grad))
