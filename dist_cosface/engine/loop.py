"""The training loop: ``train(cfg, ctx) -> summary``.

One optimizer step = ``optim.grad_accum_steps`` micro-batches. Per step the loop issues, in
addition to the model's own collectives, ONE all-reduce of a 4-element tensor that carries
the global gradient norm (each classifier shard counted once), the "SIGTERM received" and
"launcher died" flags and the loader's "bad input data" flag, and reads it on the host: that
single synchronisation gives every rank the same decision about clipping, fp16 overflow skips,
non-finite stops, preemption and stops on bad data.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dist_cosface.config import dump_config
from dist_cosface.configtools import to_mapping
from dist_cosface.data.integrity import raise_data_failure
from dist_cosface.distributed import DistContext
from dist_cosface.engine.amp import autocast
from dist_cosface.engine.checkpoint import Checkpointer, resolve_checkpoint
from dist_cosface.engine.ds import engine_grad_norm, owns_backbone_grads
from dist_cosface.engine.optim import clip_grads_, global_grad_norm_and_flags, lr_at, set_lr
from dist_cosface.engine.parts import Parts, build_parts, check_config, describe_loader
from dist_cosface.engine.progress import ProgressLog
from dist_cosface.engine.runlock import RunLock
from dist_cosface.engine.signals import StopRequest

log = logging.getLogger(__name__)


class EpochStream:
    """Endless (images, labels) stream over epochs that knows its current epoch."""

    def __init__(self, loader, epoch: int, position: dict | None) -> None:
        self.loader, self.epoch = loader, epoch
        loader.set_epoch(epoch)
        if position is not None:
            loader.load_state_dict(position)
        self._it = iter(loader)

    def next(self):
        for _ in range(2):
            try:
                return next(self._it)
            except StopIteration:
                # the loader's own epoch is authoritative (it moves on after a finished epoch)
                self.epoch = getattr(self.loader, "epoch", self.epoch) + 1
                self.loader.set_epoch(self.epoch)
                self._it = iter(self.loader)
        raise ValueError("the data loader yields no batches (len(loader) == 0?)")


def _resolve_resume(cfg, ctx: DistContext, out: Path) -> Path | None:
    """The verified checkpoint to resume (all ranks agree), or None to start fresh."""
    resume = cfg.checkpoint.resume
    if resume == "none":
        return None
    if resume == "auto":
        return resolve_checkpoint(out / "checkpoints", ctx)
    found = resolve_checkpoint(resume, ctx)
    if found is None:
        raise ValueError(f"checkpoint.resume={resume!r}: no complete checkpoint there")
    return found


def _train_state(cfg, ctx: DistContext, parts: Parts, checkpointer: Checkpointer):
    from dist_cosface.classifier.state import ClassifierState
    from dist_cosface.engine.ds import DeepSpeedCheckpoint
    from dist_cosface.engine.train_state import BackboneState, TrainState

    native = None
    if parts.ds_engine is not None:
        native = DeepSpeedCheckpoint(parts.ds_engine, cfg.train.zero_stage, ctx.world_size)
    return TrainState(
        backbone=BackboneState(parts.backbone, parts.backbone_optim),
        classifier=ClassifierState(parts.head, parts.head_optim, checkpointer.mesh),
        scaler=parts.scaler,
        loader=parts.loader,
        rank=ctx.rank,
        native=native,
    )


def _restore(cfg, ctx: DistContext, checkpointer: Checkpointer, state, out: Path) -> dict:
    ckpt = _resolve_resume(cfg, ctx, out)
    if ckpt is None:
        return {"step": 0, "epoch": 0, "position": None, "from": None}
    meta, position = checkpointer.restore(ckpt, state)
    if ctx.is_main:
        log.info("resumed from %s at step %d", ckpt, meta["step"])
    return {"step": meta["step"], "epoch": meta["epoch"], "position": position, "from": ckpt}


def _checkpoint_meta(cfg, ctx: DistContext, epoch: int) -> dict:
    from dist_cosface.classifier import class_range

    classes = cfg.classifier.num_classes
    return {
        "epoch": epoch,
        "engine": cfg.train.engine,
        "model": to_mapping(cfg.model),
        "image_size": cfg.data.image_size,
        "num_classes": classes,
        "class_layout": [class_range(classes, ctx.world_size, r) for r in range(ctx.world_size)],
    }


def _evaluate(cfg, ctx, parts: Parts, out: Path, metrics) -> dict:
    """Every rank embeds its share of the verification images; rank 0 logs and writes."""
    results = _evaluate_all_ranks(cfg, ctx, parts, out)
    if ctx.is_main:
        for target, res in results.items():
            if "error" in res:
                print(
                    f"eval {target}: FAILED ({res['error']}); training results are kept", flush=True
                )
                continue
            metrics.on_eval(target, float(res["accuracy"]))
            print(f"eval {target}: accuracy {res['accuracy']:.4f}", flush=True)
    return results


def _evaluate_all_ranks(cfg, ctx, parts: Parts, out: Path) -> dict:
    """Never raises: an evaluation failure must not turn a trained run into a failed one.

    Targets that fail are logged and recorded with an ``error`` entry (in eval.json too).
    """
    from dist_cosface.eval.pairs_dist import run_evaluation_all_ranks

    parts.backbone.eval()
    try:
        with torch.no_grad():
            return run_evaluation_all_ranks(
                parts.backbone,
                cfg.eval,
                ctx.device,
                cfg.data.image_size,
                out,
                ctx.group,
                keep_going=True,
            )
    except Exception as exc:  # beyond one target: e.g. eval.json cannot be written
        log.exception("evaluation failed; checkpoints and metrics.jsonl are kept")
        return {str(t): {"error": f"{type(exc).__name__}: {exc}"} for t in cfg.eval.targets}
    finally:
        parts.backbone.train()


def _forward_backward(cfg, ctx, parts: Parts, stream: EpochStream) -> tuple[torch.Tensor, float]:
    """Run the micro-batches of one optimizer step; returns (mean loss, data wait seconds)."""
    accum = cfg.optim.grad_accum_steps
    loss_sum = torch.zeros((), device=ctx.device)
    wait = 0.0
    use_no_sync = parts.ds_engine is None and ctx.is_distributed
    # DeepSpeed bf16 keeps the backbone itself in bf16: no autocast on top of it
    precision = "fp32" if parts.ds_engine is not None else cfg.train.precision
    for micro in range(accum):
        t0 = time.perf_counter()
        images, labels = stream.next()
        wait += time.perf_counter() - t0
        if hasattr(parts.head, "set_epoch"):
            parts.head.set_epoch(stream.epoch)  # Partial FC: classes seen this epoch
        images = images.to(ctx.device, non_blocking=True)
        labels = labels.to(ctx.device, non_blocking=True)
        last = micro == accum - 1
        # DDP all-reduces backbone gradients only on the last micro-batch of the step
        sync = parts.model.no_sync() if use_no_sync and not last else contextlib.nullcontext()
        with sync:
            if parts.ds_engine is not None:
                images = images.to(next(parts.backbone.parameters()).dtype)
            with autocast(precision, ctx.device):
                loss = parts.head(parts.model(images), labels)
            if parts.ds_engine is not None:
                parts.ds_engine.backward(loss)  # divides by the accumulation steps itself
                if not last:
                    parts.ds_engine.step()  # DeepSpeed counts micro-steps; no update yet
            else:
                parts.scaler.scale_loss(loss / accum).backward()
        loss_sum += loss.detach().float()
    return loss_sum / accum, wait


def _optimizer_step(cfg, ctx, parts: Parts, stop: StopRequest) -> tuple[float, bool, str | None]:
    """Clip and step; returns (grad norm, skipped for fp16 overflow, why to stop or None)."""
    ds = parts.ds_engine is not None
    head_only = ds and owns_backbone_grads(cfg)  # then DeepSpeed clips the backbone itself
    params = list(parts.head.parameters()) if head_only else parts.params()
    parts.scaler.unscale_(params)
    # a rank's loader that met bad data it must stop for votes here: every rank raises alike
    data_failed = float(getattr(parts.loader, "failure", None) is not None)
    flags = [float(stop.requested), float(stop.launcher_lost), data_failed]
    norm, (stop_votes, lost_votes, data_votes) = global_grad_norm_and_flags(params, ctx, flags)
    if data_votes > 0:
        raise_data_failure(parts.loader, int(data_votes))
    reason = ("launcher_lost" if lost_votes > 0 else "sigterm") if stop_votes > 0 else None
    if not math.isfinite(norm):
        for optimizer in parts.optimizers():
            optimizer.zero_grad(set_to_none=True)
        parts.scaler.update(found_inf=True)
        return norm, True, reason
    if cfg.optim.grad_clip is not None:
        clip_grads_(params, norm, cfg.optim.grad_clip)
    parts.head_optim.step()
    parts.head_optim.zero_grad(set_to_none=True)
    if ds:
        parts.ds_engine.step()
        backbone_norm = engine_grad_norm(parts.ds_engine) if head_only else None
        norm = math.sqrt(norm**2 + backbone_norm**2) if backbone_norm is not None else norm
    else:
        parts.backbone_optim.step()
        parts.backbone_optim.zero_grad(set_to_none=True)
    parts.scaler.update(found_inf=False)
    return norm, False, reason


def _comm_seconds(head) -> float | None:
    """The head's collective time of the last step, when it was asked to measure it."""
    if not getattr(head, "time_collectives", False):
        return None
    return float(head.last_comm_seconds)


def train(cfg, ctx: DistContext, *, backbone=None, loader=None) -> dict:
    """Train per ``cfg``; every rank calls this. ``backbone``/``loader`` override the builders.

    Returns a summary: ``step``, ``loss``, ``samples_per_s``, ``grad_norm`` (last log line),
    ``preempted``, ``launcher_lost`` (stopped because a rank's launcher died), ``resumed_from``,
    ``checkpoint``, ``eval``. An exception is logged with the rank and re-raised, so the
    launcher sees a non-zero exit and stops the other ranks.
    """
    try:
        _check_inputs(cfg, ctx)  # before the lock: a bad config leaves no run folder behind
        with RunLock(cfg.train.output_dir, ctx):  # a second job on this folder fails here
            return _train(cfg, ctx, backbone, loader)
    except Exception:
        log.exception("rank %d: training failed", ctx.rank)
        raise


def _check_inputs(cfg, ctx: DistContext) -> None:
    """Fail in seconds on what would otherwise fail late: config, evaluation targets."""
    check_config(cfg)
    if ctx.is_main and cfg.eval.targets:
        from dist_cosface.eval.targets import check_targets

        check_targets(cfg.eval)  # a bad or unsafe eval file fails now, not after training


@dataclass
class _Run:
    """What the steps of one run share: parts, outputs and the summary being built."""

    cfg: Any
    ctx: DistContext
    parts: Parts
    out: Path
    stream: EpochStream
    metrics: Any
    progress: ProgressLog
    summary: dict
    last_saved: int

    checkpointer: Checkpointer
    state: Any  # TrainState

    def checkpoint(self, step: int) -> None:
        meta = _checkpoint_meta(self.cfg, self.ctx, self.stream.epoch)
        blocked = self.checkpointer.save(step, self.state, meta)
        self.metrics.on_checkpoint(blocked)
        path = self.checkpointer.root / f"step_{step}"
        self.summary["checkpoint"], self.last_saved = str(path), step

    def finish_step(self, step: int, seconds: float, wait: float, loss, lr: float, norm: float):
        """Metrics, the log line, periodic checkpoints and evaluation after optimizer step."""
        cfg, total = self.cfg, self.cfg.train.total_steps
        rank_samples = cfg.data.batch_size * cfg.optim.grad_accum_steps
        global_batch = rank_samples * self.ctx.world_size
        self.metrics.on_step(
            step=step,
            samples=rank_samples,  # per rank: Prometheus sums ranks for the global rate
            step_seconds=seconds,
            data_wait_seconds=wait,
            comm_seconds=_comm_seconds(self.parts.head),
        )
        self.progress.add(seconds, global_batch)
        if _is_log_step(cfg, step):
            self.summary.update(_log(self.progress, self.metrics, self.parts, step, loss, lr, norm))
        every = cfg.checkpoint.every_steps
        if (every and step % every == 0) or step == total:
            self.checkpoint(step)
        ev = cfg.eval.every_steps
        if cfg.eval.targets and ev and step % ev == 0 and step < total:
            self.summary["eval"] = _evaluate(cfg, self.ctx, self.parts, self.out, self.metrics)

    def preempt(self, step: int, reason: str) -> None:
        """SIGTERM agreed by all ranks: make sure this step is checkpointed, then stop."""
        if self.last_saved != step:
            self.checkpoint(step)
        self.checkpointer.wait()  # published before this process exits
        self.summary["preempted"] = True
        self.summary["launcher_lost"] = reason == "launcher_lost"  # the CLI exits non-zero
        if self.ctx.is_main:
            what = "a launcher died" if reason == "launcher_lost" else "SIGTERM"
            log.info("%s: stopped at step %d, checkpoint written", what, step)


def _start(cfg, ctx: DistContext, backbone, loader) -> tuple[_Run, int]:
    """Build everything, resume if asked; returns the run and its first step."""
    from dist_cosface.metrics import build_metrics

    out = Path(cfg.train.output_dir)
    if ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
        dump_config(cfg, out / "config.yaml")
    parts = build_parts(cfg, ctx, backbone, loader)
    if ctx.is_main:
        log.info("data: %s", describe_loader(cfg.data, parts.loader))
    checkpointer = Checkpointer(
        out / "checkpoints",
        ctx,
        keep_last=cfg.checkpoint.keep_last,
        async_save=cfg.checkpoint.async_save,
    )
    state = _train_state(cfg, ctx, parts, checkpointer)
    resumed = _restore(cfg, ctx, checkpointer, state, out)
    step = resumed["step"]
    summary = {
        "step": step,
        "loss": None,
        "samples_per_s": None,
        "grad_norm": None,
        "preempted": False,
        "launcher_lost": False,
        "checkpoint": None,
        "eval": {},
        "resumed_from": str(resumed["from"]) if resumed["from"] else None,
    }
    run = _Run(
        cfg=cfg,
        ctx=ctx,
        parts=parts,
        out=out,
        stream=EpochStream(parts.loader, resumed["epoch"], resumed["position"]),
        metrics=build_metrics(cfg.metrics, ctx, _run_info(cfg, ctx, parts)),
        progress=ProgressLog(out / "metrics.jsonl", ctx.is_main, cfg.train.total_steps),
        summary=summary,
        last_saved=step if resumed["from"] else -1,
        checkpointer=checkpointer,
        state=state,
    )
    return run, step


def _train(cfg, ctx: DistContext, backbone, loader) -> dict:
    run, step = _start(cfg, ctx, backbone, loader)
    parts, total, skipped = run.parts, cfg.train.total_steps, 0
    parts.backbone.train()
    parts.head.train()
    try:
        with StopRequest() as stop:
            while step < total:
                t0 = time.perf_counter()
                lr = lr_at(cfg.optim, step, total)
                set_lr(parts.optimizers(), lr)
                if hasattr(parts.head, "set_step"):
                    parts.head.set_step(step)  # deterministic Partial FC sampling on resume
                _ask_margin_health(cfg, parts.head, step + 1)
                loss, wait = _forward_backward(cfg, ctx, parts, run.stream)
                norm, was_skipped, stop_now = _optimizer_step(cfg, ctx, parts, stop)
                if was_skipped:
                    skipped = _on_skip(cfg, step, skipped, loss, parts)
                else:
                    skipped, step = 0, step + 1
                    run.finish_step(step, time.perf_counter() - t0, wait, loss, lr, norm)
                if stop_now:
                    run.preempt(step, stop_now)
                    break
        run.checkpointer.wait()  # the last save is published before evaluation and return
        if cfg.eval.targets and not run.summary["preempted"]:
            run.summary["eval"] = _evaluate(cfg, ctx, parts, run.out, run.metrics)
    finally:
        run.metrics.close()
    run.summary["step"] = step
    return run.summary


def _on_skip(cfg, step: int, skipped: int, loss: torch.Tensor, parts: Parts) -> int:
    skipped += 1
    if not parts.scaler.enabled or skipped >= cfg.train.max_skipped_steps:
        raise FloatingPointError(
            f"non-finite loss or gradient at step {step} (loss {loss.item():.4g}"
            + (f", {skipped} consecutive fp16 overflow skips" if parts.scaler.enabled else "")
            + ")"
        )
    log.warning("step %d: fp16 overflow, step skipped, loss scale now %g", step, parts.scaler.scale)
    return skipped


def _log(progress: ProgressLog, metrics, parts: Parts, step, loss, lr, norm) -> dict:
    loss_value = float(loss.item())
    grad_norm = norm if math.isfinite(norm) else None
    metrics.on_log(step=step, loss=loss_value, lr=lr, grad_norm=grad_norm)
    stats = getattr(parts.loader, "stats", None) or {}
    if "skipped_samples" in stats:
        metrics.on_bad_samples(int(stats["skipped_samples"]))
    if "bad_shards" in stats:
        metrics.on_bad_shards(int(stats["bad_shards"]))
    health = _margin_health(parts.head)
    if health:
        metrics.on_margin_health(health)
    rate = progress.log(step=step, loss=loss_value, lr=lr, grad_norm=grad_norm, extra=health)
    return {"loss": loss_value, "samples_per_s": rate, "grad_norm": grad_norm}


def _is_log_step(cfg, step: int) -> bool:
    return step % cfg.train.log_every == 0 or step == cfg.train.total_steps


def _ask_margin_health(cfg, head, step: int) -> None:
    """Let the head collect margin statistics during the forwards of log steps only."""
    if hasattr(head, "collect_health"):
        head.collect_health = cfg.metrics.margin_health and _is_log_step(cfg, step)


def _margin_health(head) -> dict[str, float]:
    """Host floats of the head's margin health (one small copy; the step's grad-norm read
    has already synchronised the device), or {} when it has none."""
    health = head.margin_health() if hasattr(head, "margin_health") else None
    return health.to_floats() if health is not None else {}


def _run_info(cfg, ctx: DistContext, parts: Parts) -> dict:
    return {
        "world_size": ctx.world_size,
        "num_classes": cfg.classifier.num_classes,
        "classes_per_rank": parts.head.num_local_classes,
        "model": cfg.model.name,
        "engine": cfg.train.engine,
        "precision": cfg.train.precision,
        "global_batch": cfg.data.batch_size * ctx.world_size * cfg.optim.grad_accum_steps,
    }
