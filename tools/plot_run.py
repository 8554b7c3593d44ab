"""PNG charts of a run's throughput and loss, and its margin health when logged.

From the run's own log (rank 0 writes one JSON object per log line with ``step``, ``time``,
``samples_per_s``, ``loss``, ``lr``):

    python tools/plot_run.py --metrics-log runs/quickstart/metrics.jsonl --out run.png

or from Prometheus range queries over the exporter's series:

    python tools/plot_run.py --prometheus http://localhost:9090 --job dist_cosface \\
        --start now-2h --end now --out run.png
"""

from __future__ import annotations

import argparse
import json
import math
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

_REL_TIME = re.compile(r"^now(?:-(\d+(?:\.\d+)?)([smhd]))?$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}
# margin-health fields of metrics.jsonl (classifier/health.py) -> Prometheus gauge
HEALTH_SERIES = {
    "target_cos_mean": "dist_cosface_target_cos_mean",
    "target_cos_p10": "dist_cosface_target_cos_p10",
    "hardest_neg_cos_mean": "dist_cosface_hardest_negative_cos_mean",
    "margin_violation_rate": "dist_cosface_margin_violation_rate",
    "margin": "dist_cosface_margin",
}


@dataclass
class Series:
    """x/y points of one chart, with the x axis' meaning."""

    x: list[float] = field(default_factory=list)
    y: list[float] = field(default_factory=list)
    xlabel: str = "step"


def load_metrics_log(path: str | Path) -> dict[str, Series]:
    """Throughput, loss and margin health by step from ``metrics.jsonl``; lines without a
    key are skipped for that chart (e.g. evaluation lines, runs without margin health)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"metrics log {path} does not exist")
    out = {"samples_per_s": Series(), "loss": Series(), **{k: Series() for k in HEALTH_SERIES}}
    for lineno, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{lineno}: not a JSON object: {exc}") from exc
        if not isinstance(row, dict) or "step" not in row:
            raise ValueError(f"{path}:{lineno}: expected an object with a 'step' key")
        for key, series in out.items():
            if row.get(key) is not None:
                series.x.append(float(row["step"]))
                series.y.append(float(row[key]))
    if not any(s.x for s in out.values()):
        raise ValueError(f"{path}: no samples_per_s or loss values found")
    return out


def parse_time(text: str, now: float | None = None) -> float:
    """Unix seconds from ``1700000000``, ``now`` or ``now-30m`` (s/m/h/d)."""
    now = time.time() if now is None else now
    match = _REL_TIME.match(text.strip())
    if match:
        amount, unit = match.groups()
        return now - (float(amount) * _UNIT_S[unit] if amount else 0.0)
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"time {text!r} is not unix seconds, 'now' or 'now-<N>[smhd]'") from None


def query_range(url: str, expr: str, start: float, end: float, step: float) -> list[list]:
    """``/api/v1/query_range`` result: a list of ``[labels, [(t, v), ...]]``."""
    params = urllib.parse.urlencode({"query": expr, "start": start, "end": end, "step": step})
    full = f"{url.rstrip('/')}/api/v1/query_range?{params}"
    try:
        with urllib.request.urlopen(full, timeout=30) as resp:
            body = json.load(resp)
    except urllib.error.HTTPError as exc:
        raise RuntimeError(f"Prometheus rejected {expr!r}: {exc.read().decode()}") from exc
    except urllib.error.URLError as exc:
        raise RuntimeError(f"cannot reach Prometheus at {url}: {exc.reason}") from exc
    if body.get("status") != "success":
        raise RuntimeError(f"Prometheus query {expr!r} failed: {body}")
    return [
        [r["metric"], [(float(t), float(v)) for t, v in r["values"]]]
        for r in body["data"]["result"]
    ]


def load_prometheus(
    url: str, job: str, start: float, end: float, step: float, rate_window: str
) -> dict[str, Series]:
    """Global samples/s and the mean loss over ranks, by minutes since ``start``."""
    sel = f'job="{job}"'
    exprs = {
        "samples_per_s": f"sum(rate(dist_cosface_samples_total{{{sel}}}[{rate_window}]))",
        "loss": f"avg(dist_cosface_loss{{{sel}}})",
        # global statistics, identical on every rank
        **{key: f"max({name}{{{sel}}})" for key, name in HEALTH_SERIES.items()},
    }
    out = {}
    for key, expr in exprs.items():
        series = Series(xlabel="minutes since start")
        for _, points in query_range(url, expr, start, end, step):
            for t, v in points:
                series.x.append((t - start) / 60)
                series.y.append(v)
        out[key] = series
    if not any(s.x for s in out.values()):
        raise ValueError(f"Prometheus at {url} has no dist_cosface data for job {job!r}")
    return out


def _finite(s: Series) -> list[tuple[float, float]]:
    return [(x, y) for x, y in zip(s.x, s.y) if math.isfinite(y)]


def _draw(ax, lines: list[tuple[Series, str, str, str]], ylabel: str) -> None:
    """``lines``: (series, label, color, linestyle); "no data" when none has a point."""
    drawn = False
    for s, label, color, style in lines:
        points = _finite(s)
        if points:
            ax.plot(*zip(*points), color=color, linestyle=style, linewidth=1.2, label=label)
            drawn = True
    if not drawn:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
    elif len(lines) > 1:
        ax.legend(loc="best", fontsize="small")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)


def _gap(series: dict[str, Series]) -> Series:
    """Mean target cosine minus mean hardest-negative cosine, at the steps having both."""
    neg = dict(zip(series["hardest_neg_cos_mean"].x, series["hardest_neg_cos_mean"].y))
    tgt = series["target_cos_mean"]
    pairs = [(x, y - neg[x]) for x, y in zip(tgt.x, tgt.y) if x in neg]
    return Series([x for x, _ in pairs], [y for _, y in pairs], tgt.xlabel)


def plot(series: dict[str, Series], out: str | Path, title: str) -> Path:
    """Stacked charts written as PNG: throughput, loss and, when the run logged margin
    health, the target / hardest-negative cosines with their gap against m, and the
    margin-violation rate."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    health = bool(series.get("target_cos_mean", Series()).x)
    rows = 4 if health else 2
    fig, axes = plt.subplots(rows, 1, figsize=(9, 11 if health else 6.5), sharex=True)
    _draw(axes[0], [(series["samples_per_s"], "samples/s", "tab:blue", "-")], "samples/s")
    _draw(axes[1], [(series["loss"], "loss", "tab:red", "-")], "loss")
    if health:
        cosines = [
            (series["target_cos_mean"], "target cos (mean)", "tab:green", "-"),
            (series["target_cos_p10"], "target cos (10th pct)", "tab:green", ":"),
            (series["hardest_neg_cos_mean"], "hardest negative cos (mean)", "tab:purple", "-"),
            (_gap(series), "gap: target - hardest negative", "black", "-"),
            (series["margin"], "margin m", "gray", "--"),
        ]
        _draw(axes[2], cosines, "cosine")
        violation = [(series["margin_violation_rate"], "violation rate", "tab:orange", "-")]
        _draw(axes[3], violation, "margin violation rate")
        axes[3].set_ylim(-0.02, 1.02)
    axes[-1].set_xlabel(series["loss"].xlabel)
    fig.suptitle(title)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--metrics-log", help="<output_dir>/metrics.jsonl of a run")
    source.add_argument("--prometheus", help="Prometheus base URL, e.g. http://localhost:9090")
    parser.add_argument("--job", default="dist_cosface", help="Prometheus job label")
    parser.add_argument("--start", default="now-1h")
    parser.add_argument("--end", default="now")
    parser.add_argument("--step", type=float, default=15.0, help="query resolution, seconds")
    parser.add_argument("--rate-window", default="1m", help="window of rate(), e.g. 1m")
    parser.add_argument("--out", required=True, help="PNG file to write")
    args = parser.parse_args(argv)
    try:
        if args.metrics_log:
            series = load_metrics_log(args.metrics_log)
            title = str(args.metrics_log)
        else:
            now = time.time()
            start, end = parse_time(args.start, now), parse_time(args.end, now)
            if end <= start or args.step <= 0:
                raise ValueError("need --start before --end and a positive --step")
            series = load_prometheus(
                args.prometheus, args.job, start, end, args.step, args.rate_window
            )
            title = f"{args.job} @ {args.prometheus}"
    except (ValueError, RuntimeError) as exc:
        parser.error(str(exc))
    print(f"wrote {plot(series, args.out, title)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
