"""Per-rank Prometheus exporter for the training loop.

Every rank owns one :class:`PrometheusMetrics` with its own ``CollectorRegistry`` (never the
process-global one, so several instances can live in one process, e.g. in tests). It either
serves ``/metrics`` on ``metrics.host:metrics.port + local_rank`` or, with
``metrics.pushgateway`` set, pushes to a Pushgateway from a background thread.

Every series carries the constant labels ``node`` and ``rank``. The ``job`` label is the
target's: Prometheus sets it from the scrape job, the Pushgateway from the grouping key
(``job``/``node``/``rank``). Exposing ``job`` ourselves would clash with the scrape job and be
renamed to ``exported_job``.

The hooks take python numbers that the engine already has on the host; nothing here touches
a CUDA tensor, and the GPU memory figures come from the allocator's counters, which do not
synchronise the device.
"""

from __future__ import annotations

import logging
import re
import socket
import threading
import time
from typing import TYPE_CHECKING

from dist_cosface.metrics.margin import MARGIN_HEALTH_NAMES, MarginHealthGauges
from dist_cosface.metrics.sink import StepRecord

if TYPE_CHECKING:
    from dist_cosface.distributed import DistContext
    from dist_cosface.metrics.config import MetricsConfig

log = logging.getLogger(__name__)

PREFIX = "dist_cosface"
# Steps of a face-recognition model take from ~10 ms (small model, big GPU) to tens of
# seconds (huge batch on CPU); roughly x2.5 spacing keeps quantile error moderate.
STEP_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
CHECKPOINT_BUCKETS = (0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
_LABEL_RE = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
_CONST_LABELS = ("node", "rank")

# Every series name the exporter can expose (after the client adds _total/_bucket/...).
# The dashboard and alert tests check their expressions against this list.
EXPORTED_NAMES = (
    f"{PREFIX}_samples_total",
    f"{PREFIX}_step_duration_seconds_bucket",
    f"{PREFIX}_step_duration_seconds_sum",
    f"{PREFIX}_step_duration_seconds_count",
    f"{PREFIX}_data_wait_seconds_total",
    f"{PREFIX}_classifier_comm_seconds_total",
    f"{PREFIX}_loss",
    f"{PREFIX}_learning_rate",
    f"{PREFIX}_grad_norm",
    f"{PREFIX}_gpu_memory_bytes",
    f"{PREFIX}_gpu_memory_peak_bytes",
    f"{PREFIX}_checkpoint_duration_seconds_bucket",
    f"{PREFIX}_checkpoint_duration_seconds_sum",
    f"{PREFIX}_checkpoint_duration_seconds_count",
    f"{PREFIX}_skipped_samples_total",
    f"{PREFIX}_bad_shards",
    f"{PREFIX}_eval_accuracy",
    f"{PREFIX}_step",
    f"{PREFIX}_last_step_timestamp_seconds",
    f"{PREFIX}_run_info",
)
EXPORTED_NAMES += MARGIN_HEALTH_NAMES


class RunMetrics:
    """The exporter interface the engine calls; this base class does nothing (metrics off).

    A :class:`~dist_cosface.metrics.sink.MetricsSink`: :meth:`write` hands each step's record
    to the hooks below (``on_step`` every step; ``on_log``, ``on_bad_samples``,
    ``on_bad_shards``, ``on_margin_health`` on log steps). ``on_checkpoint`` and ``on_eval``
    are called by the trainer when it saves or evaluates.
    """

    port: int | None = None  # bound /metrics port, None when not serving

    def write(self, record: StepRecord) -> None:
        """One step's record, spread over the hooks (the subclasses implement the hooks)."""
        self.on_step(
            step=record.step,
            samples=record.samples,
            step_seconds=record.step_seconds,
            data_wait_seconds=record.data_wait_seconds,
            comm_seconds=record.comm_seconds,
        )
        logged = record.logged
        if logged is None:
            return
        self.on_log(step=record.step, loss=logged.loss, lr=logged.lr, grad_norm=logged.grad_norm)
        if logged.skipped_samples is not None:
            self.on_bad_samples(logged.skipped_samples)
        if logged.bad_shards is not None:
            self.on_bad_shards(logged.bad_shards)
        if logged.health:
            self.on_margin_health(logged.health)

    def on_step(
        self,
        *,
        step: int,
        samples: int,
        step_seconds: float,
        data_wait_seconds: float,
        comm_seconds: float | None = None,
    ) -> None:
        """After every optimizer step (python numbers only).

        ``samples``: samples this rank consumed in the step; ``step_seconds``: wall time of
        the whole iteration, the wait for its batch included; ``data_wait_seconds``: the part
        of it spent waiting for the batch (the dashboards and the DataStarvation alert divide
        the two); ``comm_seconds``: time in the classifier's collectives, if measured.
        """

    def on_log(self, *, step: int, loss: float, lr: float, grad_norm: float | None) -> None:
        """At log steps, with values the engine has already copied to the host."""

    def on_checkpoint(self, seconds: float) -> None:
        """After a checkpoint save returned, with the seconds it blocked training (the host
        snapshot with ``checkpoint.async_save``, the whole write otherwise)."""

    def on_eval(self, target: str, accuracy: float) -> None:
        """After evaluating on ``target`` (e.g. ``lfw``)."""

    def on_bad_samples(self, total: int) -> None:
        """The loader's cumulative count of skipped (undecodable) samples."""

    def on_bad_shards(self, total: int) -> None:
        """How many shards the loader found bad so far (dropped, short or unreadable)."""

    def on_margin_health(self, health: dict[str, float]) -> None:
        """At log steps: ``MarginHealth.to_floats()`` of the classifier (host floats)."""

    def close(self) -> None:
        """Stop serving/pushing (pushes a final time in Pushgateway mode)."""


def build_metrics(
    cfg: MetricsConfig, ctx: DistContext, run_info: dict[str, str | int]
) -> RunMetrics:
    """The exporter for this rank, or a no-op :class:`RunMetrics` when ``cfg.enabled`` is off."""
    if not cfg.enabled:
        return RunMetrics()
    return PrometheusMetrics(cfg, ctx, run_info)


def _check_run_info(run_info: dict[str, str | int]) -> dict[str, str]:
    if not isinstance(run_info, dict):
        raise TypeError(f"run_info must be a dict, got {type(run_info).__name__}")
    out = {}
    for key, value in run_info.items():
        if not isinstance(key, str) or not _LABEL_RE.match(key) or key in _CONST_LABELS:
            raise ValueError(f"run_info key {key!r} is not a usable Prometheus label name")
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise TypeError(f"run_info[{key!r}] must be a string or a number, got {value!r}")
        out[key] = str(value)
    return out


class PrometheusMetrics(RunMetrics):
    """Real exporter: one registry per instance, served over HTTP or pushed."""

    def __init__(
        self, cfg: MetricsConfig, ctx: DistContext, run_info: dict[str, str | int]
    ) -> None:
        from prometheus_client import CollectorRegistry

        self.cfg = cfg
        self.node = cfg.node or socket.gethostname()
        self.rank = ctx.rank
        self.registry = CollectorRegistry(auto_describe=True)
        self._cuda_device = ctx.device if ctx.device.type == "cuda" else None
        self._skipped_seen = 0
        self._closed = False
        self._server = None
        self._pusher: threading.Thread | None = None
        self._stop = threading.Event()
        self._build_instruments(_check_run_info(run_info))
        if cfg.pushgateway:
            self._start_pusher()
        else:
            self._serve(cfg.host, cfg.port + ctx.local_rank if cfg.port else 0)

    # --- construction -------------------------------------------------------------------
    def _build_instruments(self, info: dict[str, str]) -> None:
        from prometheus_client import Counter, Gauge, Histogram, Info

        reg, labels = self.registry, _CONST_LABELS
        self._values = {"node": self.node, "rank": str(self.rank)}

        def make(kind, name, doc, extra=(), **kw):
            return kind(f"{PREFIX}_{name}", doc, (*labels, *extra), registry=reg, **kw)

        # Series of the per-step path exist from the start (rate() needs the initial 0).
        # Log-time gauges appear on first use so a run never shows a fake loss/norm of 0.
        self._samples = make(Counter, "samples", "Training samples consumed by this rank")
        self._step_time = make(
            Histogram,
            "step_duration_seconds",
            "Wall time of one optimizer step",
            buckets=STEP_BUCKETS,
        )
        self._data_wait = make(
            Counter, "data_wait_seconds", "Time the step loop spent waiting for the next batch"
        )
        self._step = make(Gauge, "step", "Last completed optimizer step")
        self._last_step_ts = make(
            Gauge, "last_step_timestamp_seconds", "Unix time of the last completed step"
        )
        for name in ("_samples", "_step_time", "_data_wait", "_step", "_last_step_ts"):
            setattr(self, name, getattr(self, name).labels(**self._values))
        self._comm_family = make(
            Counter,
            "classifier_comm_seconds",
            "Time in the sharded classifier's collectives (when the engine measures it)",
        )
        self._comm = None
        self._loss = make(Gauge, "loss", "Training loss at the last log step")
        self._lr = make(Gauge, "learning_rate", "Learning rate at the last log step")
        self._grad_norm = make(Gauge, "grad_norm", "Global gradient norm at the last log step")
        self._gpu_mem = make(Gauge, "gpu_memory_bytes", "CUDA memory allocated by tensors")
        self._gpu_peak = make(Gauge, "gpu_memory_peak_bytes", "Peak CUDA memory allocated")
        self._ckpt = make(
            Histogram,
            "checkpoint_duration_seconds",
            "Seconds a checkpoint save blocked training",
            buckets=CHECKPOINT_BUCKETS,
        )
        self._skipped = make(
            Counter, "skipped_samples", "Samples the loader skipped (undecodable/corrupt)"
        ).labels(**self._values)
        self._bad_shards = make(
            Gauge, "bad_shards", "Shards the loader found bad (dropped, short or unreadable)"
        ).labels(**self._values)
        self._eval = make(
            Gauge, "eval_accuracy", "Verification accuracy by target", extra=("target",)
        )
        run = make(Info, "run", "Static facts about the run")
        run.labels(**self._values).info(info)
        self._margin_health = MarginHealthGauges(make, self._values)

    def _serve(self, host: str, port: int) -> None:
        from prometheus_client import start_http_server

        try:
            self._server, _ = start_http_server(port, addr=host, registry=self.registry)
        except OSError as exc:
            raise OSError(
                f"rank {self.rank}: cannot serve metrics on {host}:{port} ({exc}); set "
                "metrics.port to a free base port (0 = ephemeral) or metrics.enabled=false"
            ) from exc
        self.port = self._server.server_port
        # with metrics.port 0 (a free port per rank) this line is how to find the endpoint
        log.info("rank %d: metrics at http://%s:%d/metrics", self.rank, host, self.port)

    def _start_pusher(self) -> None:
        self._pusher = threading.Thread(
            target=self._push_loop, name=f"metrics-push-rank{self.rank}", daemon=True
        )
        self._pusher.start()

    def _push_loop(self) -> None:
        while not self._stop.wait(self.cfg.push_every_s):
            self.push()

    def push(self) -> bool:
        """Push the registry once; failures are logged (a monitoring outage must not kill
        training) and reported as False."""
        from prometheus_client import push_to_gateway

        try:
            push_to_gateway(
                self.cfg.pushgateway,
                job=self.cfg.job,
                registry=self.registry,
                grouping_key={"node": self.node, "rank": str(self.rank)},
                timeout=5,
            )
        except OSError as exc:
            log.warning("metrics push to %s failed: %s", self.cfg.pushgateway, exc)
            return False
        return True

    # --- hooks ----------------------------------------------------------------------------
    def on_step(
        self,
        *,
        step: int,
        samples: int,
        step_seconds: float,
        data_wait_seconds: float,
        comm_seconds: float | None = None,
    ) -> None:
        self._samples.inc(samples)
        self._step_time.observe(step_seconds)
        self._data_wait.inc(data_wait_seconds)
        if comm_seconds is not None:
            if self._comm is None:
                self._comm = self._comm_family.labels(**self._values)
            self._comm.inc(comm_seconds)
        self._step.set(step)
        self._last_step_ts.set(time.time())

    def on_log(self, *, step: int, loss: float, lr: float, grad_norm: float | None) -> None:
        # A NaN/inf loss is exported as is: the NonFiniteLoss alert looks for exactly that.
        self._loss.labels(**self._values).set(loss)
        self._lr.labels(**self._values).set(lr)
        if grad_norm is not None:
            self._grad_norm.labels(**self._values).set(grad_norm)
        if self._cuda_device is not None:
            import torch

            # Allocator bookkeeping on the host: no device synchronisation.
            mem = torch.cuda.memory_allocated(self._cuda_device)
            peak = torch.cuda.max_memory_allocated(self._cuda_device)
            self._gpu_mem.labels(**self._values).set(mem)
            self._gpu_peak.labels(**self._values).set(peak)

    def on_checkpoint(self, seconds: float) -> None:
        self._ckpt.labels(**self._values).observe(seconds)

    def on_eval(self, target: str, accuracy: float) -> None:
        if not isinstance(target, str) or not target:
            raise ValueError(f"eval target must be a non-empty string, got {target!r}")
        self._eval.labels(**self._values, target=target).set(accuracy)

    def on_bad_samples(self, total: int) -> None:
        # The loader reports a running total; a counter only goes up, so add the increase.
        # A smaller total means the loader's own count restarted: count it from zero again.
        delta = total - self._skipped_seen if total >= self._skipped_seen else total
        if delta > 0:
            self._skipped.inc(delta)
        self._skipped_seen = total

    def on_bad_shards(self, total: int) -> None:
        self._bad_shards.set(total)

    def on_margin_health(self, health: dict[str, float]) -> None:
        self._margin_health.set(health)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        if self._pusher is not None:
            self._pusher.join(timeout=10)
            self.push()  # the final values of a short job
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
