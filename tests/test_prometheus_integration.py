"""End to end with a real Prometheus server: a 2-rank CPU training run is scraped through the
project's prometheus.yml (static and file_sd jobs), alert rules load, every dashboard
expression is accepted by the server, and tools/plot_run.py reads the run back."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from tools.spawn import free_port, free_port_range

ROOT = Path(__file__).resolve().parent.parent
MONITORING = ROOT / "monitoring"
PROMETHEUS = shutil.which("prometheus")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.multiproc,
    pytest.mark.skipif(
        PROMETHEUS is None,
        reason="the Prometheus server is not installed (tools/install.sh test installs it)",
    ),
]


def write_prometheus_config(tmp: Path, rank_base: int, ranks: int) -> Path:
    """The project's prometheus.yml with this test's ports, 1 s scrapes and absolute paths."""
    from tools.write_prometheus_targets import build_targets, write_targets

    cfg = yaml.safe_load((MONITORING / "prometheus.yml").read_text())
    cfg["global"].update(scrape_interval="1s", evaluation_interval="1s")
    cfg["rule_files"] = [str(MONITORING / f) for f in cfg["rule_files"]]
    jobs = {j["job_name"]: j for j in cfg["scrape_configs"]}
    static = jobs["dist_cosface"]
    static["scrape_interval"] = "1s"
    static["static_configs"] = [{"targets": [f"127.0.0.1:{rank_base + r}" for r in range(ranks)]}]
    cluster = jobs["dist_cosface_cluster"]
    cluster["scrape_interval"] = "1s"
    cluster["file_sd_configs"][0].update(files=[str(tmp / "targets" / "*.json")])
    write_targets(tmp / "targets" / "run.json", build_targets(["127.0.0.1"], ranks, rank_base))
    path = tmp / "prometheus.yml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def api(url: str, path: str, **params) -> dict:
    full = f"{url}/api/v1/{path}?{urllib.parse.urlencode(params)}"
    try:
        with urllib.request.urlopen(full, timeout=10) as resp:
            return json.load(resp)
    except urllib.error.HTTPError as exc:
        return json.loads(exc.read())


def is_ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/-/ready", timeout=2) as resp:
            return resp.status == 200
    except (urllib.error.URLError, ConnectionError):
        return False


def by_job_rank(result: list[dict], key: str = "rank") -> dict[tuple[str, str], float]:
    return {(r["metric"]["job"], r["metric"].get(key, "")): float(r["value"][1]) for r in result}


def wait_until(check, timeout_s: float, procs: list[subprocess.Popen], what: str):
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        for p in procs:
            if p.poll() is not None:
                out = p.stdout.read().decode(errors="replace") if p.stdout else ""
                raise AssertionError(
                    f"{p.args[:3]} exited with {p.returncode} while waiting "
                    f"for {what}:\n{out[-4000:]}"
                )
        last = check()
        if last:
            return last
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}; last: {last}")


def stop(proc: subprocess.Popen | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)  # own session: reaches torchrun's workers too
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


PER_RANK_BATCH = 32  # data.batch_size of configs/quickstart.yaml, no gradient accumulation


def train_command(rank_base: int, out_dir: Path) -> list[str]:
    """The quickstart model on 2 CPU ranks (in-memory synthetic data instead of the shards
    launch/quickstart.sh writes, the head an AdaFace with sub-centers); far more steps than
    needed: the test stops it."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(free_port()),
        "-m",
        "dist_cosface.cli",
        "train",
        str(ROOT / "configs" / "quickstart.yaml"),
        "train.total_steps=100000",
        "train.log_every=2",
        f"metrics.port={rank_base}",
        f"train.output_dir={out_dir}",
        "checkpoint.every_steps=0",
        f"data.batch_size={PER_RANK_BATCH}",
        "data.backend=synthetic",
        # AdaFace with 2 sub-centers: every margin-health panel has data (running statistics,
        # dominant sub-center share)
        "classifier.margin_type=adaface",
        "classifier.subcenters=2",
    ]


def test_two_rank_run_is_scraped_alerts_load_and_dashboard_queries_parse(tmp_path):
    ranks = 2
    rank_base, prom_port = free_port_range(ranks), free_port()
    config = write_prometheus_config(tmp_path, rank_base, ranks)
    url = f"http://127.0.0.1:{prom_port}"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    prom = train = None
    try:
        prom = subprocess.Popen(
            [
                PROMETHEUS,
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{prom_port}",
                "--log.level=warn",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        train = subprocess.Popen(
            train_command(rank_base, tmp_path / "run"),
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        procs = [prom, train]
        wait_until(lambda: is_ready(url), 30, procs, "Prometheus to be ready")

        def ranks_up():
            res = api(url, "query", query='up{job=~"dist_cosface.*"} == 1')
            got = {(r["metric"]["job"], r["metric"]["instance"]) for r in res["data"]["result"]}
            return got if len(got) == 2 * ranks else None

        wait_until(ranks_up, 60, procs, "both ranks up in both jobs")

        def both_ranks_progress():
            res = api(url, "query", query="rate(dist_cosface_samples_total[5s]) > 0")
            got = by_job_rank(res["data"]["result"])
            want = {
                (j, str(r)) for j in ("dist_cosface", "dist_cosface_cluster") for r in range(ranks)
            }
            return got if set(got) == want else None

        rates = wait_until(both_ranks_progress, 60, procs, "positive samples rate on both ranks")
        assert all(v > 0 for v in rates.values())

        def loss_on_both_ranks():
            res = api(url, "query", query='dist_cosface_loss{job="dist_cosface"}')
            got = by_job_rank(res["data"]["result"])
            return got if len(got) == ranks else None

        wait_until(loss_on_both_ranks, 30, procs, "a logged loss on both ranks")

        # samples_total counts this rank's own samples: the per-rank batch per step (a scrape
        # between the two updates of one on_step may already hold that step's samples)
        at = time.time()
        samples = by_job_rank(
            api(url, "query", query="dist_cosface_samples_total", time=at)["data"]["result"]
        )
        steps = by_job_rank(api(url, "query", query="dist_cosface_step", time=at)["data"]["result"])
        assert set(samples) == set(steps) and len(samples) == 2 * ranks
        for key, n in samples.items():
            assert PER_RANK_BATCH * steps[key] <= n <= PER_RANK_BATCH * (steps[key] + 1), (
                f"{key}: {n} samples after {steps[key]} steps; on_step(samples=) must be the "
                f"rank's own {PER_RANK_BATCH}, not the global batch"
            )

        res = api(url, "query", query='dist_cosface_run_info{job="dist_cosface"}')
        infos = [r["metric"] for r in res["data"]["result"]]
        assert sorted(i["rank"] for i in infos) == ["0", "1"]
        assert all(i["world_size"] == "2" for i in infos), infos

        # the alert rules were loaded and evaluate without errors against live data
        groups = api(url, "rules")["data"]["groups"]
        rules = [r for g in groups for r in g["rules"]]
        assert len(rules) == 10 and all(r["health"] in ("ok", "unknown") for r in rules), rules

        # every dashboard expression is valid PromQL for this server, with variables filled in
        dash = json.loads((MONITORING / "grafana" / "dist_cosface.json").read_text())
        subst = {"$__rate_interval": "5s", "$job": ".+", "$node": ".+", "$rank": ".+"}
        health_y = max(p["gridPos"]["y"] for p in dash["panels"] if p["type"] == "row")
        for panel in dash["panels"]:
            for target in panel.get("targets", []):
                expr = target["expr"]
                for var, val in subst.items():
                    expr = expr.replace(var, val)
                res = api(url, "query", query=expr)
                assert res["status"] == "success", (panel["title"], expr, res)
                if panel["gridPos"]["y"] > health_y:  # margin health: set at every log step
                    assert res["data"]["result"], (panel["title"], expr, "no data")
        throughput = api(
            url, "query", query='sum(rate(dist_cosface_samples_total{job="dist_cosface"}[5s]))'
        )
        assert float(throughput["data"]["result"][0]["value"][1]) > 0

        # tools/plot_run.py reads the same run back through range queries
        from tools import plot_run

        now = time.time()
        series = plot_run.load_prometheus(url, "dist_cosface", now - 60, now, 1.0, "5s")
        assert any(v > 0 for v in series["samples_per_s"].y)
        png = plot_run.plot(series, tmp_path / "run.png", "integration")
        assert png.stat().st_size > 1000
        # ... and the run's own metrics.jsonl (rank 0 writes it at log steps)
        log = tmp_path / "run" / "metrics.jsonl"
        from_log = plot_run.load_metrics_log(log)
        assert from_log["loss"].x and all(v > 0 for v in from_log["samples_per_s"].y)
        assert plot_run.main(["--metrics-log", str(log), "--out", str(tmp_path / "log.png")]) == 0
    finally:
        stop(train)
        stop(prom)
