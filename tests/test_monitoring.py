"""Monitoring assets: Prometheus config and alert rules (promtool), file_sd target writer,
Grafana dashboard structure, and the run plotter."""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from dist_cosface.metrics import EXPORTED_NAMES
from tools import plot_run, write_prometheus_targets

ROOT = Path(__file__).resolve().parent.parent
MONITORING = ROOT / "monitoring"
DASHBOARD = MONITORING / "grafana" / "dist_cosface.json"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed")


def promtool(*args: str, cwd: Path = MONITORING) -> subprocess.CompletedProcess:
    return subprocess.run(
        [PROMTOOL, *args], cwd=cwd, capture_output=True, text=True, timeout=120, check=False
    )


# --- Prometheus config and rules -------------------------------------------------------------
def test_prometheus_config_lists_eight_local_ranks_and_file_sd():
    cfg = yaml.safe_load((MONITORING / "prometheus.yml").read_text())
    assert cfg["rule_files"] == ["alerts.yml"]
    jobs = {j["job_name"]: j for j in cfg["scrape_configs"]}
    static = jobs["dist_cosface"]["static_configs"][0]["targets"]
    assert static == [f"localhost:{9400 + i}" for i in range(8)]
    assert jobs["dist_cosface_cluster"]["file_sd_configs"][0]["files"] == ["targets/*.json"]


@needs_promtool
def test_promtool_checks_config_with_generated_targets(tmp_path):
    for name in ("prometheus.yml", "alerts.yml"):
        shutil.copy(MONITORING / name, tmp_path / name)
    groups = write_prometheus_targets.build_targets(["node01", "node02"], 8, 9400)
    write_prometheus_targets.write_targets(tmp_path / "targets" / "run.json", groups)
    res = promtool("check", "config", "prometheus.yml", cwd=tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "WARNING" not in res.stdout + res.stderr  # the target file was found and parsed


@needs_promtool
def test_promtool_rejects_a_broken_target_file(tmp_path):
    for name in ("prometheus.yml", "alerts.yml"):
        shutil.copy(MONITORING / name, tmp_path / name)
    (tmp_path / "targets").mkdir()
    (tmp_path / "targets" / "bad.json").write_text('[{"targets": "node01:9400"}]')
    assert promtool("check", "config", "prometheus.yml", cwd=tmp_path).returncode != 0


@needs_promtool
def test_alert_rules_are_valid_and_their_unit_tests_pass():
    res = promtool("check", "rules", "alerts.yml")
    assert res.returncode == 0, res.stdout + res.stderr
    res = promtool("test", "rules", "alerts_test.yml")
    assert res.returncode == 0, res.stdout + res.stderr


def test_every_alert_has_a_firing_and_a_silent_unit_test():
    rules = yaml.safe_load((MONITORING / "alerts.yml").read_text())
    names = {r["alert"] for g in rules["groups"] for r in g["rules"]}
    assert {
        "DistCosfaceThroughputDrop",
        "DistCosfaceRankStalled",
        "DistCosfaceNonFiniteLoss",
        "DistCosfaceDataStarvation",
        "DistCosfaceRankSkew",
        "DistCosfaceMarginCollapse",
        "DistCosfaceMarginViolationsStuck",
        "DistCosfaceScaleBelowBound",
    } <= names
    tests = yaml.safe_load((MONITORING / "alerts_test.yml").read_text())["tests"]
    cases = [c for t in tests for c in t["alert_rule_test"]]
    for name in names:
        outcomes = {bool(c["exp_alerts"]) for c in cases if c["alertname"] == name}
        assert outcomes == {True, False}, name


def test_rules_only_use_exported_metrics():
    text = (MONITORING / "alerts.yml").read_text()
    used = set(re.findall(r"\bdist_cosface_[a-z0-9_]+", text)) - {"dist_cosface_cluster"}
    assert used and used <= set(EXPORTED_NAMES)


# --- file_sd target writer -------------------------------------------------------------------
def test_targets_cover_every_rank_of_every_node(tmp_path):
    out = tmp_path / "t" / "run.json"
    rc = write_prometheus_targets.main(
        [
            "--nodes",
            "gpu-a,gpu-b,gpu-c",
            "--ranks-per-node",
            "4",
            "--base-port",
            "9500",
            "--label",
            "run=r50",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    groups = json.loads(out.read_text())
    assert [g["targets"] for g in groups] == [
        [f"{h}:{p}" for p in range(9500, 9504)] for h in ("gpu-a", "gpu-b", "gpu-c")
    ]
    assert all(g["labels"] == {"run": "r50"} for g in groups)
    assert [p.name for p in out.parent.iterdir()] == ["run.json"]  # no temp file left


def test_targets_from_a_nodes_file(tmp_path):
    nodes = tmp_path / "nodes.txt"
    nodes.write_text("n1\n\nn2\n")
    out = tmp_path / "run.json"
    write_prometheus_targets.main(
        ["--nodes-file", str(nodes), "--ranks-per-node", "2", "--out", str(out)]
    )
    targets = [t for g in json.loads(out.read_text()) for t in g["targets"]]
    assert targets == ["n1:9400", "n1:9401", "n2:9400", "n2:9401"]


@pytest.mark.parametrize(
    "nodes, ranks, port, labels, match",
    [
        ([], 8, 9400, {}, "no nodes"),
        (["a", "a"], 8, 9400, {}, "more than once"),
        (["a b"], 8, 9400, {}, "a b"),
        (["a"], 0, 9400, {}, "ranks_per_node"),
        (["a"], 8, 65530, {}, "65530"),
        (["a"], 8, 9400, {"rank": "1"}, "'rank'"),
        (["a"], 8, 9400, {"__address__": "x"}, "__address__"),
    ],
)
def test_bad_target_settings_are_rejected(nodes, ranks, port, labels, match):
    with pytest.raises(ValueError, match=match):
        write_prometheus_targets.build_targets(nodes, ranks, port, labels)


# --- Grafana dashboard -----------------------------------------------------------------------
def load_dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def dashboard_exprs(dash: dict) -> list[str]:
    return [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]


def test_dashboard_structure():
    dash = load_dashboard()
    for key in ("uid", "title", "schemaVersion", "panels", "templating", "time"):
        assert key in dash, key
    panels = dash["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)) and all(isinstance(i, int) for i in ids)
    cells = set()
    for p in panels:
        g = p["gridPos"]
        assert {"x", "y", "w", "h"} <= set(g) and g["w"] > 0 and g["h"] > 0, p["title"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24, p["title"]
        own = {
            (x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])
        }
        assert not own & cells, f"panel {p['title']!r} overlaps another"
        cells |= own
        if p["type"] == "row":  # a section header: full width, no queries
            assert g["w"] == 24 and g["h"] == 1 and "targets" not in p, p["title"]
            continue
        ref_ids = [t["refId"] for t in p["targets"]]
        assert p["targets"] and len(ref_ids) == len(set(ref_ids)), p["title"]
        assert p["datasource"]["uid"] == "${datasource}", p["title"]
    variables = {v["name"] for v in dash["templating"]["list"]}
    assert {"datasource", "job", "node", "rank"} <= variables


def test_dashboard_covers_the_required_views_with_exported_metrics():
    exprs = " ".join(dashboard_exprs(load_dashboard()))
    used = set(re.findall(r"\bdist_cosface_[a-z0-9_]+", exprs))
    assert used <= set(EXPORTED_NAMES), used - set(EXPORTED_NAMES)
    for needed in (
        "dist_cosface_samples_total",
        "dist_cosface_step_duration_seconds_bucket",
        "dist_cosface_data_wait_seconds_total",
        "dist_cosface_loss",
        "dist_cosface_learning_rate",
        "dist_cosface_gpu_memory_bytes",
        "dist_cosface_eval_accuracy",
    ):
        assert needed in used, needed
    assert "histogram_quantile(" in exprs and "sum by (node, rank)" in exprs


def test_dashboard_has_a_margin_health_row_with_every_health_metric():
    from dist_cosface.metrics.margin import MARGIN_HEALTH_NAMES

    panels = load_dashboard()["panels"]
    rows = [p for p in panels if p["type"] == "row"]
    assert [r["title"] for r in rows][-1:] == ["margin health"]
    below = [p for p in panels if p["gridPos"]["y"] > rows[-1]["gridPos"]["y"]]
    exprs = " ".join(t["expr"] for p in below for t in p["targets"])
    assert set(re.findall(r"\bdist_cosface_[a-z0-9_]+", exprs)) == set(MARGIN_HEALTH_NAMES)


def test_dashboard_exprs_have_balanced_brackets_and_quotes():
    # The live parse check of every expression is in test_prometheus_integration.py.
    for expr in dashboard_exprs(load_dashboard()):
        for open_, close in ("()", "{}", "[]"):
            assert expr.count(open_) == expr.count(close), expr
        assert expr.count('"') % 2 == 0, expr


# --- plot_run ------------------------------------------------------------------------------
def _png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")


def test_plot_from_metrics_log(tmp_path):
    log = tmp_path / "metrics.jsonl"
    rows = [
        {"step": s, "time": 100.0 + s, "samples_per_s": 500.0 + s, "loss": 20.0 / s, "lr": 0.1}
        for s in range(1, 21)
    ]
    rows.append({"step": 20, "time": 130.0, "eval": {"lfw": 0.5}})  # a non-training line
    rows.append({"step": 21, "time": 131.0, "samples_per_s": 510.0, "loss": math.nan, "lr": 0.1})
    log.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    series = plot_run.load_metrics_log(log)
    assert series["samples_per_s"].x == [float(s) for s in range(1, 22)]
    assert series["loss"].y[:2] == [20.0, 10.0] and math.isnan(series["loss"].y[-1])
    out = tmp_path / "plots" / "run.png"
    assert plot_run.main(["--metrics-log", str(log), "--out", str(out)]) == 0
    assert _png_size(out) == (900, 650)


def test_plot_draws_margin_health_when_logged(tmp_path):
    log = tmp_path / "metrics.jsonl"
    rows = [
        {
            "step": s,
            "samples_per_s": 500.0,
            "loss": 20.0 / s,
            "target_cos_mean": 0.03 * s,
            "target_cos_p10": 0.02 * s,
            "hardest_neg_cos_mean": 0.3 - 0.01 * s,
            "margin_violation_rate": 1.0 - 0.04 * s,
            "margin": 0.35,
        }
        for s in range(1, 21)
    ]
    del rows[4]["hardest_neg_cos_mean"]  # a line without it: no gap point at step 5
    log.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    series = plot_run.load_metrics_log(log)
    assert series["margin_violation_rate"].y[-1] == pytest.approx(0.2)
    gap = plot_run._gap(series)
    assert 5.0 not in gap.x and len(gap.x) == 19
    assert gap.y[0] == pytest.approx(0.03 - 0.29)
    out = tmp_path / "health.png"
    assert plot_run.main(["--metrics-log", str(log), "--out", str(out)]) == 0
    assert _png_size(out) == (900, 1100)


def test_plot_log_errors_name_the_file_and_line(tmp_path):
    log = tmp_path / "metrics.jsonl"
    log.write_text('{"step": 1, "loss": 2.0}\nnot json\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2"):
        plot_run.load_metrics_log(log)
    with pytest.raises(ValueError, match="does not exist"):
        plot_run.load_metrics_log(tmp_path / "missing.jsonl")


def test_parse_time():
    assert plot_run.parse_time("now", now=1000.0) == 1000.0
    assert plot_run.parse_time("now-2m", now=1000.0) == 880.0
    assert plot_run.parse_time("1700000000") == 1.7e9
    with pytest.raises(ValueError, match="yesterday"):
        plot_run.parse_time("yesterday")
