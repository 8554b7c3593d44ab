"""The per-rank Prometheus exporter: served values, labels, ports, push mode, config checks."""

from __future__ import annotations

import bisect
import http.server
import math
import threading
import time

import pytest
import torch
import torch.distributed as dist
from prometheus_client.parser import text_string_to_metric_families

from dist_cosface.configtools import ConfigError, from_mapping
from dist_cosface.distributed import DistContext, context_from_group
from dist_cosface.metrics import (
    EXPORTED_NAMES,
    MetricsConfig,
    PrometheusMetrics,
    RunMetrics,
    build_metrics,
)
from dist_cosface.metrics.exporter import STEP_BUCKETS
from tests.multiproc import run_ranks
from tests.prom_scrape import scrape, value
from tools.spawn import free_port, free_port_range


@pytest.fixture
def metrics():
    created = []

    def make(cfg=None, ctx=None, run_info=None):
        m = build_metrics(
            cfg or MetricsConfig(port=0, node="n1"), ctx or DistContext(), run_info or {}
        )
        created.append(m)
        return m

    yield make
    for m in created:
        m.close()


def test_served_values_match_the_calls(metrics):
    m = metrics(run_info={"world_size": 8, "num_classes": 1000, "model": "iresnet50"})
    steps = [(0.004, 0.001), (0.03, 0.01), (0.3, 0.2), (7.0, 0.5), (75.0, 1.0)]
    for i, (sec, wait) in enumerate(steps, start=1):
        m.on_step(step=i, samples=64, step_seconds=sec, data_wait_seconds=wait, comm_seconds=0.5)
    before = time.time()
    m.on_step(step=6, samples=10, step_seconds=0.02, data_wait_seconds=0.0)
    m.on_log(step=6, loss=12.5, lr=0.05, grad_norm=3.25)
    m.on_checkpoint(2.0)
    m.on_eval("lfw", 0.9875)
    m.on_eval("cfp_fp", 0.91)
    m.on_bad_samples(3)
    m.on_bad_samples(7)
    assert value(scrape(m.port), "dist_cosface_bad_shards", node="n1", rank="0") == 0
    m.on_bad_shards(2)
    s = scrape(m.port)
    lab = {"node": "n1", "rank": "0"}
    assert value(s, "dist_cosface_samples_total", **lab) == 5 * 64 + 10
    all_secs = [sec for sec, _ in steps] + [0.02]
    assert value(s, "dist_cosface_step_duration_seconds_count", **lab) == 6
    assert value(s, "dist_cosface_step_duration_seconds_sum", **lab) == pytest.approx(sum(all_secs))
    for le in STEP_BUCKETS:
        expected = bisect.bisect_right(sorted(all_secs), le)
        got = value(s, "dist_cosface_step_duration_seconds_bucket", le=str(le), **lab)
        assert got == expected, le
    assert value(s, "dist_cosface_data_wait_seconds_total", **lab) == pytest.approx(1.711)
    assert value(s, "dist_cosface_classifier_comm_seconds_total", **lab) == pytest.approx(2.5)
    assert value(s, "dist_cosface_loss", **lab) == 12.5
    assert value(s, "dist_cosface_learning_rate", **lab) == 0.05
    assert value(s, "dist_cosface_grad_norm", **lab) == 3.25
    assert value(s, "dist_cosface_checkpoint_duration_seconds_sum", **lab) == 2.0
    assert value(s, "dist_cosface_eval_accuracy", target="lfw", **lab) == 0.9875
    assert value(s, "dist_cosface_eval_accuracy", target="cfp_fp", **lab) == 0.91
    assert value(s, "dist_cosface_skipped_samples_total", **lab) == 7
    assert value(s, "dist_cosface_bad_shards", **lab) == 2
    assert value(s, "dist_cosface_step", **lab) == 6
    assert before <= value(s, "dist_cosface_last_step_timestamp_seconds", **lab) <= time.time()
    info = {"world_size": "8", "num_classes": "1000", "model": "iresnet50", **lab}
    assert value(s, "dist_cosface_run_info", **info) == 1
    # every exported series name is one the dashboard/alert checks know about
    exported = {n for n, _ in s if not n.endswith("_created")}
    assert exported <= set(EXPORTED_NAMES)
    # CPU run: no GPU memory series at all rather than a misleading 0
    assert not any(n.startswith("dist_cosface_gpu_memory") for n in exported)


def test_log_gauges_absent_until_first_log_and_nan_loss_exported(metrics):
    m = metrics()
    m.on_step(step=1, samples=4, step_seconds=0.1, data_wait_seconds=0.0)
    names = {n for n, _ in scrape(m.port)}
    assert "dist_cosface_loss" not in names and "dist_cosface_grad_norm" not in names
    assert "dist_cosface_classifier_comm_seconds_total" not in names
    m.on_log(step=1, loss=float("nan"), lr=0.1, grad_norm=None)
    s = scrape(m.port)
    assert math.isnan(value(s, "dist_cosface_loss"))
    assert "dist_cosface_grad_norm" not in {n for n, _ in s}
    m.on_log(step=2, loss=float("inf"), lr=0.1, grad_norm=1.0)
    assert value(scrape(m.port), "dist_cosface_loss") == math.inf


def test_skipped_counter_follows_a_restarting_loader_total(metrics):
    m = metrics()
    for total in (2, 5, 5, 1, 4):  # the loader's count restarts after 5
        m.on_bad_samples(total)
    assert value(scrape(m.port), "dist_cosface_skipped_samples_total") == 5 + 4


def test_disabled_is_a_silent_no_op():
    m = build_metrics(MetricsConfig(enabled=False), DistContext(), {"world_size": 1})
    assert type(m) is RunMetrics and m.port is None
    m.on_step(step=1, samples=1, step_seconds=0.1, data_wait_seconds=0.0, comm_seconds=0.1)
    m.on_log(step=1, loss=1.0, lr=0.1, grad_norm=None)
    m.on_checkpoint(1.0)
    m.on_eval("lfw", 0.5)
    m.on_bad_samples(1)
    m.on_bad_shards(1)
    m.close()


def test_port_is_base_plus_local_rank_and_collisions_are_reported(metrics):
    base = free_port_range(2)
    m = metrics(MetricsConfig(port=base), DistContext(rank=5, local_rank=1))
    assert m.port == base + 1
    assert value(scrape(m.port), "dist_cosface_step", rank="5") == 0
    with pytest.raises(OSError, match="metrics.port"):
        PrometheusMetrics(MetricsConfig(port=base), DistContext(rank=6, local_rank=1), {})


def test_instances_have_independent_registries(metrics):
    a, b = metrics(), metrics()
    a.on_step(step=1, samples=100, step_seconds=0.1, data_wait_seconds=0.0)
    b.on_step(step=1, samples=7, step_seconds=0.1, data_wait_seconds=0.0)
    assert value(scrape(a.port), "dist_cosface_samples_total") == 100
    assert value(scrape(b.port), "dist_cosface_samples_total") == 7
    a.close()
    with pytest.raises(OSError):
        scrape(a.port)
    a.close()  # idempotent


class _PushRecorder(http.server.BaseHTTPRequestHandler):
    def do_PUT(self):  # noqa: N802 - http.server's naming
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.server.pushes.append((self.path, body.decode()))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_pushgateway_mode_pushes_periodically_and_at_close():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _PushRecorder)
    server.pushes = []
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}"
        cfg = MetricsConfig(pushgateway=url, push_every_s=0.05, job="faces", node="gpu7")
        m = build_metrics(cfg, DistContext(rank=3, local_rank=3), {"world_size": 4})
        assert m.port is None  # push mode does not serve
        m.on_step(step=1, samples=16, step_seconds=0.1, data_wait_seconds=0.0)
        deadline = time.time() + 10
        while not server.pushes and time.time() < deadline:
            time.sleep(0.02)
        assert server.pushes, "no periodic push"
        m.on_step(step=2, samples=16, step_seconds=0.1, data_wait_seconds=0.0)
        m.close()
        path, body = server.pushes[-1]
        assert path == "/metrics/job/faces/node/gpu7/rank/3"
        samples = {
            (s.name, frozenset(s.labels.items())): s.value
            for f in text_string_to_metric_families(body)
            for s in f.samples
        }
        assert value(samples, "dist_cosface_samples_total", rank="3") == 32
    finally:
        server.shutdown()
        server.server_close()


def test_push_failure_is_logged_not_raised(caplog):
    dead = free_port()  # nobody listens there: connection refused
    cfg = MetricsConfig(pushgateway=f"http://127.0.0.1:{dead}", push_every_s=60)
    m = build_metrics(cfg, DistContext(), {})
    assert m.push() is False
    m.close()
    assert "metrics push" in caplog.text


@pytest.mark.parametrize(
    "data, key",
    [
        ({"prot": 1}, "metrics.prot"),
        ({"port": 70000}, "port"),
        ({"port": "9400"}, "metrics.port"),
        ({"push_every_s": 0}, "push_every_s"),
        ({"pushgateway": "gateway:9091"}, "pushgateway"),
        ({"job": "a b"}, "job"),
        ({"node": ""}, "node"),
    ],
)
def test_config_errors_name_the_key(data, key):
    with pytest.raises(ConfigError, match=key):
        from_mapping(MetricsConfig, data, "metrics")


@pytest.mark.parametrize("run_info", [{"rank": 1}, {"bad-key": 1}, {"x": [1]}, {"x": True}])
def test_bad_run_info_is_rejected(run_info):
    with pytest.raises((ValueError, TypeError)):
        build_metrics(MetricsConfig(port=0), DistContext(), run_info)


def _two_ranks_serve(rank, world_size, base):
    ctx = context_from_group(dist.group.WORLD, torch.device("cpu"))
    m = build_metrics(MetricsConfig(port=base, node="n0"), ctx, {"world_size": world_size})
    try:
        m.on_step(step=1, samples=10 * (rank + 1), step_seconds=0.1, data_wait_seconds=0.0)
        dist.barrier(group=ctx.group)  # both servers are up and have counted
        seen = {}
        for r in range(world_size):
            s = scrape(base + r)
            seen[r] = (value(s, "dist_cosface_samples_total", rank=str(r)), m.port)
        dist.barrier(group=ctx.group)  # nobody closes before everyone scraped
        return seen
    finally:
        m.close()


@pytest.mark.multiproc
def test_ranks_of_one_node_serve_distinct_ports():
    base = free_port_range(2)
    results = run_ranks(2, _two_ranks_serve, base, timeout_s=120)
    for rank, seen in enumerate(results):
        assert seen == {0: (10.0, base + rank), 1: (20.0, base + rank)}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_memory_is_exported_without_device_synchronisation(metrics):
    device = torch.device("cuda", torch.cuda.current_device())
    m = metrics(ctx=DistContext(device=device))
    block = torch.empty(64 * 2**20, dtype=torch.uint8, device=device)  # 64 MiB
    torch.cuda.synchronize()
    # "error" turns any synchronising CUDA call into an exception
    torch.cuda.set_sync_debug_mode("error")
    try:
        for step in range(1, 4):
            block.add_(1)  # queued work in flight while the hooks run
            m.on_step(step=step, samples=8, step_seconds=0.01, data_wait_seconds=0.0)
            m.on_log(step=step, loss=1.0, lr=0.1, grad_norm=1.0)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    s = scrape(m.port)
    in_use = value(s, "dist_cosface_gpu_memory_bytes")
    peak = value(s, "dist_cosface_gpu_memory_peak_bytes")
    assert in_use >= block.numel() and peak >= in_use
    assert in_use == torch.cuda.memory_allocated(device)
