"""``ShardedClassifier``: the class-sharded margin softmax head (CosFace, ArcFace, combined,
CurricularFace, AdaFace, MagFace, NSL, softmax; K sub-centers per class).

Classes are split in contiguous ranges over the process group, in chunks of
``ceil(num_classes / world)`` classes (DTensor ``Shard(0)``, see ``class_range``); with K
sub-centers a class's K weight rows are consecutive and on the same rank. Each step
all-gathers the local embeddings and labels, computes logits against the local weight rows
only, and forms the exact global softmax cross-entropy with two all-reduces (see
``loss.ShardedMarginLoss``).

Feature norms
-------------
The head takes the backbone's raw (unnormalized) embeddings and normalizes them itself. The
norm ``a = |x|`` of each embedding is what AdaFace (detached: it only sets the margin) and
MagFace (differentiable: through its margin m(a) and its regulariser lambda_g g(a), which the
returned loss includes) read; the other margin types ignore it. A backbone that normalizes
its output would leave AdaFace and MagFace with a constant norm.

Gradient convention
-------------------
The loss is the mean over the GLOBAL batch. The gradient that reaches ``local_embeddings``
is ``world_size * d(loss)/d(local_embeddings)``: the data-parallel wrapper AVERAGES backbone
gradients over ranks, and that average then equals one process's gradient on the
concatenated global batch (also for uneven local batches, since the loss is the global
mean). The weight shard's gradient is exactly ``d(loss)/d(weight_shard)``; it must never be
averaged over ranks (the parameter is marked sharded).

Per-step collectives with a group: forward 3 all-gathers (the input check every rank agrees
on, ``inputs.agree_on_batch``; embeddings; labels) and 2 all-reduces; backward 1
reduce-scatter.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from dist_cosface.classifier.comm import Comm, GatherBatch, gather_labels
from dist_cosface.classifier.config import ClassifierConfig
from dist_cosface.classifier.health import MarginHealth, margin_health
from dist_cosface.classifier.inputs import agree_on_batch, check_batch
from dist_cosface.classifier.loss import ShardedMarginLoss
from dist_cosface.classifier.loss_common import LossPlan, LossTask, RowStats, RowStatsSlot
from dist_cosface.classifier.margins import (
    MarginState,
    RowParams,
    margin_of,
    scale_lower_bound,
)
from dist_cosface.classifier.sampling import columns_of_targets, sample_rows, sampling_seed
from dist_cosface.classifier.triton_loss import TritonMarginLoss, use_triton
from dist_cosface.classifier.unnormalized import unnormalized_feature_loss
from dist_cosface.seeding import stable_seed
from dist_cosface.sharding import mark_sharded

_INIT_BLOCK = 65536  # rows per init RNG block: the full matrix does not depend on world size
_HALF = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class HeadStepReport:
    """What the head measured during one optimizer step (see :meth:`ShardedClassifier.step_report`).

    ``comm_seconds``: seconds in the head's collectives during the step's last forward and its
    backward; None unless the head was built with ``time_collectives=True``.
    ``health``: margin statistics of the step's last forward; None unless the step began with
    ``collect_health=True`` (device tensors: :meth:`MarginHealth.to_floats` copies to the host).
    """

    comm_seconds: float | None
    health: MarginHealth | None


def class_range(num_classes: int, world_size: int, rank: int) -> tuple[int, int]:
    """``(class_start, num_local_classes)`` of ``rank``: DTensor's ``Shard(0)`` layout.

    Every rank but the last few owns ``ceil(num_classes / world_size)`` rows (torch.chunk),
    so a checkpoint's rows are a DTensor that torch.distributed.checkpoint re-shards for any
    other world size. Raises ValueError when that layout leaves a rank without rows.
    """
    start, stop = shard_chunk(num_classes, world_size, rank)
    per_rank = -(-num_classes // world_size)
    if (world_size - 1) * per_rank >= num_classes:
        raise ValueError(
            f"num_classes={num_classes} on {world_size} ranks: rows are split in chunks of "
            f"ceil({num_classes}/{world_size})={per_rank}, which leaves rank {world_size - 1} "
            "without classes; use more classes or fewer ranks"
        )
    return start, stop - start


def shard_chunk(num_rows: int, world_size: int, rank: int) -> tuple[int, int]:
    """``[start, stop)`` of ``rank``'s piece of ``num_rows`` in DTensor's ``Shard(0)`` layout
    (torch.chunk: ``ceil(num_rows / world_size)`` each; the last ranks may be short or empty)."""
    per_rank = -(-num_rows // world_size)
    start = min(rank * per_rank, num_rows)
    return start, min(start + per_rank, num_rows)


def _check_group(group: dist.ProcessGroup | None) -> dist.ProcessGroup | None:
    """The head's group exactly as the caller passed it: never the default group implicitly.

    None means one process without torch.distributed; with torch.distributed initialized it
    is refused, since each rank would silently train a full, unshared head of its own.
    """
    if group is None:
        if dist.is_available() and dist.is_initialized():
            raise ValueError(
                "process_group is None but torch.distributed is initialized: pass the group "
                "the classes are sharded over (DistContext.group, or dist.group.WORLD); None "
                "means one process without torch.distributed"
            )
        return None
    if dist.get_rank(group) < 0:
        raise ValueError(
            f"this process (global rank {dist.get_rank()}) is not a member of the "
            f"classifier's process_group (ranks {dist.get_process_group_ranks(group)})"
        )
    return group


class ShardedClassifier(nn.Module):
    """Margin softmax head whose ``[num_classes, D]`` weight is split by rows over a group.

    ``cfg`` was validated when it was built (``ClassifierConfig.__post_init__``); the head
    keeps its own copy and checks here only what needs the group (its size, membership).
    """

    def __init__(
        self,
        cfg: ClassifierConfig,
        embedding_size: int,
        process_group: dist.ProcessGroup | None,
        *,
        time_collectives: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(cfg, ClassifierConfig):
            raise TypeError(f"cfg must be a ClassifierConfig, got {type(cfg).__name__}")
        if (
            isinstance(embedding_size, bool)
            or not isinstance(embedding_size, int)
            or (embedding_size < 1)
        ):
            raise ValueError(f"embedding_size must be a positive integer, got {embedding_size!r}")
        self.cfg = copy.copy(cfg)  # later edits of the caller's config do not reach the head
        self.comm = Comm(_check_group(process_group))
        world, classes = self.comm.world_size, cfg.num_classes
        if classes < world:
            raise ValueError(f"num_classes={classes} is smaller than the group size {world}")
        if not cfg.feature_norm and world > 1:
            raise ValueError(
                "feature_norm=False (the paper's unnormalized-feature ablation) is implemented "
                f"for one process only; got world size {world}"
            )
        self.num_classes, self.embedding_size = classes, embedding_size
        self.spec = cfg.margin_spec()
        self.margin = margin_of(self.spec)
        self.subcenters = cfg.subcenters
        self.class_start, self.num_local_classes = class_range(classes, world, self.comm.rank)
        # a class's K sub-center rows are consecutive: rows [k * K, (k + 1) * K) of class k
        shard = torch.empty(self.num_local_classes * self.subcenters, embedding_size)
        self.weight = mark_sharded(nn.Parameter(shard))
        # rows that received gradient since the optimizer's last step (row-sparse updates)
        self.register_buffer(
            "touched", torch.zeros(shard.shape[0], dtype=torch.bool), persistent=False
        )
        # running statistics (replicated) and sub-center hits: checkpointed by ClassifierState
        self.margin_state = MarginState(
            self.margin.initial_stats(), self.num_local_classes, self.subcenters
        )
        # timing adds device syncs around every collective: opt-in, fixed for the head's life
        self.time_collectives = bool(time_collectives)
        self.last_sampled_rows: torch.Tensor | None = None
        # margin health (classifier/health.py): begin_step(..., collect_health=True) before the
        # forwards whose statistics are wanted; rows used this epoch are tracked on every
        # training forward
        self._collect_health = False
        self.last_row_stats: RowStats | None = None
        self._last_rows: tuple[RowParams | None, torch.Tensor | None] = (None, None)
        self.register_buffer(
            "seen", torch.zeros(self.num_local_classes, dtype=torch.bool), persistent=False
        )
        self.epoch: int | None = None
        self.step, self._micro_step = 0, 0
        self.reset_parameters()

    @property
    def scale(self) -> float:
        return self.spec.scale

    def _apply(self, fn, recurse=True):  # .to() / .cuda(): the margin state follows the weight
        super()._apply(fn, recurse)
        self.margin_state.to(self.weight.device)
        return self

    def begin_step(self, step: int, *, collect_health: bool = False) -> None:
        """Start optimizer step ``step``: call once before the step's first forward.

        Keys Partial FC sampling to the step: the i-th forward after ``begin_step(t)`` samples
        with ``stable_seed(sample_seed, t, i, class_start)``, so a run resumed at step t
        repeats the original negatives exactly. ``collect_health`` makes this step's forwards
        gather margin statistics (read them with :meth:`step_report`). The data epoch is not
        an argument: it can change between two micro-batches of one step (see
        :meth:`set_epoch`).
        """
        self.step, self._micro_step = int(step), 0
        self._collect_health = bool(collect_health)

    def step_report(self) -> HeadStepReport:
        """Collective time and margin health of the step; call once after its backward.

        The health statistics are consumed: a second call (or a step begun without
        ``collect_health``) reports None. Computing them queues a few device ops (row norms of
        the shard, reductions over ``[N]``); nothing is copied to the host.
        """
        seconds = float(self.comm.seconds) if self.time_collectives else None
        return HeadStepReport(comm_seconds=seconds, health=self._margin_health())

    def reset_parameters(self, seed: int | None = None) -> None:
        """N(0, 0.01) rows; the full matrix depends only on ``seed``, not on the world size.

        ``seed=None`` draws one from torch's default generator (same on every rank when the
        ranks were seeded alike).
        """
        if seed is None:
            seed = int(torch.randint(2**62, (), dtype=torch.int64))
        first = self.class_start * self.subcenters  # global index of this rank's first row
        end = first + self.weight.shape[0]
        parts = []
        for block in range(first // _INIT_BLOCK, (end - 1) // _INIT_BLOCK + 1):
            gen = torch.Generator().manual_seed(stable_seed(seed, block))
            rows = torch.randn(_INIT_BLOCK, self.embedding_size, generator=gen) * 0.01
            lo = max(first - block * _INIT_BLOCK, 0)
            hi = min(end - block * _INIT_BLOCK, _INIT_BLOCK)
            parts.append(rows[lo:hi])
        with torch.no_grad():
            self.weight.copy_(torch.cat(parts))

    def take_touched_rows(self) -> slice | torch.Tensor | None:
        """Rows that received gradient since the last call, and forget them (for the row
        optimizer's step): ``slice(None)`` for all rows (plain slicing avoids gathering and
        scattering K x D copies), an index tensor for some, None for none."""
        touched = self.touched
        if bool(touched.all()):
            rows = slice(None)
        elif bool(touched.any()):
            rows = touched.nonzero().squeeze(1)
        else:
            rows = None
        touched.zero_()
        return rows

    def forward(self, local_embeddings: torch.Tensor, local_labels: torch.Tensor) -> torch.Tensor:
        if not self.cfg.feature_norm:
            check_batch(local_embeddings, local_labels, self.embedding_size, self.num_classes)
            self._mark_touched(None)
            return unnormalized_feature_loss(self.spec, local_embeddings, self.weight, local_labels)
        comm = self.comm
        comm.timed, comm.seconds = self.time_collectives, 0.0
        sizes = agree_on_batch(
            comm,
            local_embeddings,
            local_labels,
            self.embedding_size,
            self.num_classes,
            self.weight.device,
        )
        embeddings = GatherBatch.apply(local_embeddings, sizes, comm)
        labels = gather_labels(local_labels, sizes, comm)
        cfg, dtype = self.cfg, _compute_dtype(local_embeddings)
        plan = LossPlan(self.spec, cfg.chunk_size, cfg.materialize, dtype, self.subcenters)
        raw = embeddings.to(plan.stat_dtype)
        margin, update = self.margin, self.training
        norms = _feature_norms(raw, margin) if self.spec.normalized else None  # [N]
        x = F.normalize(raw, dim=1) if self.spec.normalized else raw
        params = margin.row_params(norms, self.margin_state, update) if margin.uses_norms else None
        local_labels_all = labels - self.class_start
        rows = self._pick_rows(local_labels_all)
        target_col = columns_of_targets(local_labels_all, rows, self.num_local_classes)
        self._mark_touched(rows)
        if self.training:
            self._mark_seen(rows)
        slot = RowStatsSlot() if self._collect_health else None
        task = LossTask(
            rows, target_col, plan, comm, slot, params, self.margin_state, update_state=update
        )
        if cfg.triton_supported and use_triton(cfg.kernel, x.device, plan.compute_dtype):
            loss = TritonMarginLoss.apply(x.to(plan.compute_dtype), self.weight, task)
        else:  # the margins and sub-centers the Triton kernels lack run here (kernel: auto)
            margin_param = params.angle if margin.param_requires_grad else None
            loss = ShardedMarginLoss.apply(
                x.to(plan.compute_dtype), self.weight, task, margin_param
            )
        regulariser = margin.regulariser(norms) if norms is not None else None
        if regulariser is not None:
            loss = loss + _global_mean_own_grad(regulariser, sizes, comm.rank)
        self.last_row_stats = slot.value if slot is not None else None
        if slot is not None:
            detached = params.detached() if params is not None else None
            self._last_rows = (detached, norms.detach() if norms is not None else None)
        return loss

    def set_epoch(self, epoch: int) -> None:
        """The data epoch of the next training forward; call before every one of them.

        The count of classes seen this epoch (margin health) starts afresh when ``epoch``
        changes, which can happen between two micro-batches of one optimizer step.
        """
        if epoch != self.epoch:
            self.seen.zero_()
            self.margin_state.new_epoch()
            self.epoch = epoch

    def _margin_health(self) -> MarginHealth | None:
        """Statistics of the last forward run with ``collect_health`` (None without one)."""
        if self.last_row_stats is None:
            return None
        if self.last_sampled_rows is None:
            sampled = self.num_local_classes
        else:
            sampled = self.last_sampled_rows.shape[0]
        bound = scale_lower_bound(self.num_classes, self.cfg.scale_p_w)
        stats, self.last_row_stats = self.last_row_stats, None
        (params, norms), self._last_rows = self._last_rows, (None, None)
        return margin_health(
            self.spec,
            stats,
            self.weight,
            self.seen,
            sampled,
            bound,
            params=params,
            norms=norms,
            state=self.margin_state,
        )

    def _mark_seen(self, rows: torch.Tensor | None) -> None:
        if rows is None:
            self.seen.fill_(True)
        else:
            self.seen[rows] = True

    def _pick_rows(self, local_labels_all: torch.Tensor) -> torch.Tensor | None:
        sample_rate = self.cfg.sample_rate
        if sample_rate >= 1.0 or not self.training:
            self.last_sampled_rows = None
            return None
        seed = sampling_seed(self.cfg.sample_seed, self.step, self._micro_step, self.class_start)
        self._micro_step += 1
        rows = sample_rows(local_labels_all, self.num_local_classes, sample_rate, seed)
        self.last_sampled_rows = rows
        return rows

    def _mark_touched(self, classes: torch.Tensor | None) -> None:
        """Mark the weight rows of ``classes`` (local indices; None: all) as touched."""
        if not (torch.is_grad_enabled() and self.weight.requires_grad):
            return
        if classes is None:
            self.touched.fill_(True)
        else:
            self.touched.view(-1, self.subcenters)[classes] = True


def _feature_norms(raw: torch.Tensor, margin) -> torch.Tensor:
    """``|x|`` of every gathered row: in the graph only for a margin that trains it (MagFace)."""
    if margin.param_requires_grad:
        return raw.norm(dim=1)
    with torch.no_grad():
        return raw.norm(dim=1)


def _global_mean_own_grad(values: torch.Tensor, sizes: list[int], rank: int) -> torch.Tensor:
    """Mean of ``values [N]`` over the global batch, differentiated through this rank's own
    rows only.

    Every rank computes the same per-row values from the gathered batch; the all-gather's
    backward sums the ranks' gradients, so each row's gradient must come from one rank (its
    own) for the gradient convention (``world_size x`` the true gradient) to hold.
    """
    start = sum(sizes[:rank])
    own = torch.zeros_like(values, dtype=torch.bool)
    own[start : start + sizes[rank]] = True
    fixed = values.detach()
    moving = torch.where(own, values - fixed, torch.zeros_like(values))
    return (fixed.sum() + moving.sum()) / values.shape[0]


def _compute_dtype(embeddings: torch.Tensor) -> torch.dtype:
    device_type = embeddings.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    if embeddings.dtype in _HALF or embeddings.dtype == torch.float64:
        return embeddings.dtype
    return torch.float32
