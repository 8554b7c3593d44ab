"""The training loop: ``train(cfg, ctx) -> RunSummary`` runs one :class:`Trainer`.

One optimizer step = ``optim.grad_accum_steps`` micro-batches. Per step the trainer issues, in
addition to the model's own collectives, ONE all-reduce of a 5-element tensor that carries
the global gradient norm (each classifier shard counted once) and the ranks' votes
(``_STEP_VOTES``, an ``agreement.Ballot``: "SIGTERM received", "launcher died", the loader's
"bad input data", "checkpoint writer failed"), and reads it on the host: that single
synchronisation gives every rank the same decision about clipping, fp16 overflow skips,
non-finite stops, preemption and stops on bad data or a failed asynchronous save.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from dist_cosface.agreement import Ballot
from dist_cosface.classifier import HeadStepReport, class_range
from dist_cosface.classifier.state import ClassifierState
from dist_cosface.configtools import to_mapping, to_yaml
from dist_cosface.data.integrity import raise_data_failure
from dist_cosface.data.protocol import TrainLoader
from dist_cosface.distributed import DistContext
from dist_cosface.engine.builders import (
    build_checked_loader,
    build_head_and_optimizer,
    check_config,
    describe_loader,
    seed_everything,
)
from dist_cosface.engine.checkpoint import Checkpointer, CheckpointWriteError
from dist_cosface.engine.checkpoint.train_state import TrainState
from dist_cosface.engine.epochs import EpochStream
from dist_cosface.engine.grad_norm import clip_grads_, global_grad_norm_and_votes
from dist_cosface.engine.lr_schedule import lr_at, set_lr
from dist_cosface.engine.progress import ProgressLog
from dist_cosface.engine.runlock import RunLock
from dist_cosface.engine.signals import StopRequest
from dist_cosface.engine.strategy import build_strategy, check_compiler
from dist_cosface.engine.training_eval import evaluate_backbone
from dist_cosface.eval.targets import check_targets
from dist_cosface.metrics import LogValues, MetricsSink, StepRecord, build_metrics
from dist_cosface.models import build_backbone

if TYPE_CHECKING:  # the run config imports the engine's sections, so the engine, at its top
    from dist_cosface.config import RunConfig
    from dist_cosface.metrics.exporter import RunMetrics

log = logging.getLogger(__name__)

# what each rank votes on in the step's one all-reduce (summed over the ranks)
_STEP_VOTES = Ballot("sigterm", "launcher_lost", "bad_data", "save_failed")


@dataclass
class RunSummary:
    """What :func:`train` returns on every rank: where the run ended and its last log line."""

    step: int = 0  # optimizer steps done (resumed ones included)
    loss: float | None = None  # at the last log step (None before the first)
    samples_per_s: float | None = None  # global rate over the last log interval
    grad_norm: float | None = None  # at the last log step; None when it was not finite
    preempted: bool = False  # stopped early by an agreed stop (SIGTERM, a launcher died)
    launcher_lost: bool = False  # the stop was a dead launcher: the CLI exits non-zero
    checkpoint: str | None = None  # folder of the last checkpoint this run saved
    eval: dict[str, dict] = field(default_factory=dict)  # per target (an "error" entry if failed)
    resumed_from: str | None = None  # the checkpoint folder the run resumed from


def train(
    cfg: RunConfig,
    ctx: DistContext,
    *,
    backbone: torch.nn.Module | None = None,
    loader: TrainLoader | None = None,
) -> RunSummary:
    """Train per ``cfg``; every rank calls this. ``backbone``/``loader`` override the builders.

    Returns this rank's :class:`RunSummary`. An exception is re-raised, so the launcher sees a
    non-zero exit and stops the other ranks; the CLI prints it as one line naming the rank (its
    traceback is logged here at DEBUG, which ``dist-cosface --debug`` turns on).
    """
    try:
        check_inputs(cfg, ctx)  # before the lock: a bad config leaves no run folder behind
        with RunLock(cfg.train.output_dir, ctx):  # a second job on this folder fails here
            return Trainer(cfg, ctx, backbone=backbone, loader=loader).run()
    except CheckpointWriteError as exc:  # one line says it all (a full disk, the folder)
        log.error("rank %d: training stopped: %s", ctx.rank, exc)
        raise
    except Exception:
        log.debug("rank %d: training failed", ctx.rank, exc_info=True)
        raise


def check_inputs(cfg: RunConfig, ctx: DistContext) -> None:
    """Fail in seconds on what would otherwise fail late: config, evaluation targets."""
    check_config(cfg)
    check_compiler(cfg.train, ctx.device)  # train.compile: a missing compiler fails here
    if ctx.is_main and cfg.eval.targets:
        check_targets(cfg.eval)  # a bad or unsafe eval file fails now, not after training


class Trainer:
    """One training run on this rank: built once, then :meth:`run` (or :meth:`train_step`).

    Construction builds the loader, the classifier (``head``, ``head_optim``) and the
    backbone's :mod:`strategy <dist_cosface.engine.strategy>`; it writes nothing. ``run``
    creates the output folder, resumes, steps to ``train.total_steps`` and evaluates.
    """

    # set by run() (its _start): they need the resumed state or write files
    stream: EpochStream
    metrics: RunMetrics
    progress: ProgressLog
    sinks: list[MetricsSink]  # every step's record goes to each: metrics, progress

    def __init__(
        self,
        cfg: RunConfig,
        ctx: DistContext,
        *,
        backbone: torch.nn.Module | None = None,
        loader: TrainLoader | None = None,
    ) -> None:
        self.cfg, self.ctx = cfg, ctx
        self.out = Path(cfg.train.output_dir)
        self.loader: TrainLoader = build_checked_loader(cfg, ctx, loader)
        seed_everything(cfg.train.seed)  # identical backbone init on every rank
        backbone = backbone if backbone is not None else build_backbone(cfg.model)
        backbone = backbone.to(ctx.device)
        self.head, self.head_optim = build_head_and_optimizer(cfg, ctx)
        self.strategy = build_strategy(cfg, ctx, backbone)
        self.checkpointer = Checkpointer.from_config(
            cfg.checkpoint, self.out, ctx, timeout_s=cfg.dist.timeout_s
        )
        self.state = self._train_state()
        seed_everything(cfg.train.seed + 7919 * (ctx.rank + 1))  # per-rank dropout/augment
        self.step = 0  # optimizer steps done
        self.skipped = 0  # consecutive fp16 overflow skips
        self.last_saved = -1  # step of the last checkpoint written or resumed from
        self.summary = RunSummary()

    # ---- the run ---------------------------------------------------------------------------

    def run(self) -> RunSummary:
        """Train to ``train.total_steps`` (or an agreed stop); returns the summary.

        On every way out, success or error, the checkpoint writer thread is joined and its
        group destroyed before this returns (``Checkpointer.close``).
        """
        try:
            self._start()
            try:
                self._loop()
            finally:
                for sink in self.sinks:
                    sink.close()
        finally:
            self.checkpointer.close()
        self.summary.step = self.step
        return self.summary

    def _loop(self) -> None:
        with StopRequest() as stop:
            while self.step < self.cfg.train.total_steps:
                reason = self.train_step(stop)
                if reason is not None:
                    self._preempt(reason)
                    break
        self.checkpointer.wait()  # the last checkpoint is published before evaluating
        if self.cfg.eval.targets and not self.summary.preempted:
            self.summary.eval = self._evaluate()

    def train_step(self, stop: StopRequest) -> str | None:
        """One optimizer step; returns why every rank stops now ("sigterm", ...) or None.

        Reads top to bottom: begin (LR, head), data / forward / loss / backward per micro-batch,
        global norm with the stop votes, clip, step (or the agreed fp16 skip), metrics,
        checkpoint, evaluation.
        """
        t0 = time.perf_counter()
        lr = self._begin_step()
        loss, wait = self._forward_backward()  # data, forward, loss, backward per micro-batch
        params = self.strategy.clip_params(list(self.head.parameters()))
        norm, reason = self._grad_norm_and_votes(params, stop)
        if not math.isfinite(norm):
            self._skip_step(loss)
            return reason
        self._clip(params, norm)
        norm = self._optimizer_step(norm)
        self.step, self.skipped = self.step + 1, 0
        self._record_metrics(time.perf_counter() - t0, wait, loss, lr, norm)
        self._checkpoint_if_due()
        self._evaluate_if_due()
        return reason

    # ---- the steps of train_step, in order -------------------------------------------------

    def _begin_step(self) -> float:
        """Learning rate of this step; the head learns the step and whether to collect health."""
        lr = lr_at(self.cfg.optim, self.step, self.cfg.train.total_steps)
        set_lr([*self.strategy.optimizers(), self.head_optim], lr)
        health = self.cfg.metrics.margin_health and self._is_log_step(self.step + 1)
        self.head.begin_step(self.step, collect_health=health)
        return lr

    def _forward_backward(self) -> tuple[torch.Tensor, float]:
        """Run the micro-batches of one optimizer step; returns (mean loss, data wait seconds)."""
        accum = self.cfg.optim.grad_accum_steps
        loss_sum = torch.zeros((), device=self.ctx.device)
        wait = 0.0
        for micro in range(accum):
            images, labels, waited = self._next_batch()
            last = micro == accum - 1
            with self.strategy.micro_batch(last):
                embeddings = self._forward(images)
                loss = self._loss(embeddings, labels)
                self.strategy.backward(loss, last)
            loss_sum += loss.detach().float()
            wait += waited
        return loss_sum / accum, wait

    def _next_batch(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        """The next micro-batch on the device and the seconds spent waiting for it."""
        t0 = time.perf_counter()
        images, labels = self.stream.next()
        waited = time.perf_counter() - t0
        self.head.set_epoch(self.stream.epoch)  # Partial FC: classes seen this epoch
        device = self.ctx.device
        return images.to(device, non_blocking=True), labels.to(device, non_blocking=True), waited

    def _forward(self, images: torch.Tensor) -> torch.Tensor:
        with self.strategy.autocast():
            return self.strategy.model(self.strategy.cast_inputs(images))

    def _loss(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        with self.strategy.autocast():
            return self.head(embeddings, labels)

    def _grad_norm_and_votes(
        self, params: list[torch.nn.Parameter], stop: StopRequest
    ) -> tuple[float, str | None]:
        """Global gradient norm and the ranks' stop votes, in the step's one all-reduce."""
        self.strategy.scaler.unscale_(params)
        votes = _STEP_VOTES.cast(
            self.ctx.device,
            sigterm=stop.requested,
            launcher_lost=stop.launcher_lost,
            # a rank's loader that met bad data it must stop for: every rank raises alike
            bad_data=self.loader.failure is not None,
            save_failed=self.checkpointer.failed(),  # an asynchronous save, written or not
        )
        norm, summed = global_grad_norm_and_votes(params, self.ctx, votes)
        tally = _STEP_VOTES.read(summed)
        if tally["bad_data"] > 0:
            raise_data_failure(self.loader, int(tally["bad_data"]))
        if tally["save_failed"] > 0:  # every rank's writer agreed on the failure: each re-raises
            self.checkpointer.wait()
            raise CheckpointWriteError("an asynchronous checkpoint failed on another rank")
        if tally["sigterm"] == 0:
            return norm, None
        return norm, "launcher_lost" if tally["launcher_lost"] > 0 else "sigterm"

    def _clip(self, params: list[torch.nn.Parameter], norm: float) -> None:
        if self.cfg.optim.grad_clip is not None:
            clip_grads_(params, norm, self.cfg.optim.grad_clip)

    def _optimizer_step(self, norm: float) -> float:
        """Step classifier and backbone; returns the norm with DeepSpeed's backbone share."""
        self.head_optim.step()
        self.head_optim.zero_grad(set_to_none=True)
        self.strategy.step()
        self.strategy.scaler.update(found_inf=False)
        backbone_norm = self.strategy.backbone_grad_norm()
        return math.sqrt(norm**2 + backbone_norm**2) if backbone_norm is not None else norm

    def _skip_step(self, loss: torch.Tensor) -> None:
        """Non-finite gradients (agreed by all ranks): drop them; fp16 retries, others stop."""
        self.strategy.zero_grad()
        self.head_optim.zero_grad(set_to_none=True)
        scaler = self.strategy.scaler
        scaler.update(found_inf=True)
        self.skipped += 1
        if not scaler.enabled or self.skipped >= self.cfg.train.max_skipped_steps:
            raise FloatingPointError(
                f"non-finite loss or gradient at step {self.step} (loss {loss.item():.4g}"
                + (f", {self.skipped} consecutive fp16 overflow skips" if scaler.enabled else "")
                + ")"
            )
        log.warning(
            "step %d: fp16 overflow, step skipped, loss scale now %g", self.step, scaler.scale
        )

    def _record_metrics(
        self, seconds: float, wait: float, loss: torch.Tensor, lr: float, norm: float
    ) -> None:
        """One record of the step to every sink; log steps add the loss, LR, norm, health."""
        cfg, report = self.cfg, self.head.step_report()
        logged = self._log_values(loss, lr, norm, report) if self._is_log_step(self.step) else None
        record = StepRecord(
            step=self.step,
            samples=cfg.data.batch_size * cfg.optim.grad_accum_steps,  # this rank's
            world_size=self.ctx.world_size,
            step_seconds=seconds,
            data_wait_seconds=wait,
            comm_seconds=report.comm_seconds,
            logged=logged,
        )
        for sink in self.sinks:
            sink.write(record)
        if logged is not None:
            self.summary.loss, self.summary.grad_norm = logged.loss, logged.grad_norm
            self.summary.samples_per_s = self.progress.rate

    def _log_values(
        self, loss: torch.Tensor, lr: float, norm: float, report: HeadStepReport
    ) -> LogValues:
        """The host values of a log step (one small copy each: the step's grad-norm read has
        already synchronised the device)."""
        stats = self.loader.stats
        skipped, bad_shards = stats.get("skipped_samples"), stats.get("bad_shards")
        return LogValues(
            loss=float(loss.item()),
            lr=lr,
            grad_norm=norm if math.isfinite(norm) else None,
            skipped_samples=int(skipped) if skipped is not None else None,
            bad_shards=int(bad_shards) if bad_shards is not None else None,
            health=report.health.to_floats() if report.health is not None else {},
        )

    def _checkpoint_if_due(self) -> None:
        every = self.cfg.checkpoint.every_steps
        if (every and self.step % every == 0) or self.step == self.cfg.train.total_steps:
            self._save_checkpoint(self.step)

    def _evaluate_if_due(self) -> None:
        cfg, every = self.cfg, self.cfg.eval.every_steps
        if cfg.eval.targets and every and self.step % every == 0:
            if self.step < cfg.train.total_steps:  # the last step is evaluated by run()
                self.summary.eval = self._evaluate()

    def _is_log_step(self, step: int) -> bool:
        return step % self.cfg.train.log_every == 0 or step == self.cfg.train.total_steps

    # ---- start, stop, checkpoints ----------------------------------------------------------

    def _start(self) -> None:
        """Output folder, resume, the batch stream, metrics; training mode."""
        cfg, ctx = self.cfg, self.ctx
        if ctx.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.yaml").write_text(to_yaml(cfg))
            log.info("data: %s", describe_loader(cfg.data, self.loader))
        resumed = self.checkpointer.resume(self.state)
        self.step = resumed.step
        self.last_saved = self.step if resumed.source else -1
        self.summary = RunSummary(
            step=self.step, resumed_from=str(resumed.source) if resumed.source else None
        )
        self.stream = EpochStream(self.loader, resumed.epoch, resumed.position)
        self.metrics = build_metrics(cfg.metrics, ctx, self._run_info())
        self.progress = ProgressLog(self.out / "metrics.jsonl", ctx.is_main, cfg.train.total_steps)
        self.sinks = [self.metrics, self.progress]
        self.strategy.backbone.train()
        self.head.train()

    def _preempt(self, reason: str) -> None:
        """A stop agreed by all ranks: make sure this step is checkpointed, then stop."""
        if self.last_saved != self.step:
            self._save_checkpoint(self.step)
        self.checkpointer.wait()  # published before this process exits
        self.summary.preempted = True
        self.summary.launcher_lost = reason == "launcher_lost"  # the CLI exits non-zero
        if self.ctx.is_main:
            what = "a launcher died" if reason == "launcher_lost" else "SIGTERM"
            log.info("%s: stopped at step %d, checkpoint written", what, self.step)

    def _save_checkpoint(self, step: int) -> None:
        """Checkpoint this step (returns after the host snapshot when saves are async)."""
        cfg, classes = self.cfg, self.cfg.classifier.num_classes
        world = self.ctx.world_size
        meta = {
            "epoch": self.stream.epoch,
            "engine": cfg.train.engine,
            "model": to_mapping(cfg.model),
            "image_size": cfg.data.image_size,
            "num_classes": classes,
            "num_subcenters": cfg.classifier.subcenters,
            "class_layout": [class_range(classes, world, r) for r in range(world)],
        }
        blocked = self.checkpointer.save(step, self.state, meta)
        self.metrics.on_checkpoint(blocked)
        self.summary.checkpoint = str(self.checkpointer.root / f"step_{step}")
        self.last_saved = step

    def _train_state(self) -> TrainState:
        """The owners of everything a checkpoint holds (engine/checkpoint/train_state.py)."""
        return TrainState(
            backbone=self.strategy.checkpoint_state(),
            classifier=ClassifierState(self.head, self.head_optim, self.checkpointer.mesh),
            scaler=self.strategy.scaler,
            loader=self.loader,
            rank=self.ctx.rank,
            native=self.strategy.native_checkpoint(),
        )

    # ---- evaluation and run info -----------------------------------------------------------

    def _evaluate(self) -> dict:
        """Every rank embeds its share of the verification images; rank 0 logs and writes."""
        # eager and plain (train.compile's graph is for training; FSDP: an unsharded copy)
        with self.strategy.evaluation() as backbone:
            results = evaluate_backbone(self.cfg, self.ctx, backbone, self.out)
        if self.ctx.is_main:
            for target, res in results.items():
                if "error" not in res:
                    self.metrics.on_eval(target, float(res["accuracy"]))
                self.progress.log_eval(target, res)
        return results

    def _run_info(self) -> dict:
        cfg, ctx = self.cfg, self.ctx
        return {
            "world_size": ctx.world_size,
            "num_classes": cfg.classifier.num_classes,
            "classes_per_rank": self.head.num_local_classes,
            "model": cfg.model.name,
            "engine": cfg.train.engine,
            "precision": cfg.train.precision,
            "global_batch": cfg.data.batch_size * ctx.world_size * cfg.optim.grad_accum_steps,
        }
