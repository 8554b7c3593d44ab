"""Micro-benchmark: cost of the exporter's per-step hook, on vs off.

Calls ``on_step`` N times on a real :class:`PrometheusMetrics` (serving on an ephemeral port)
and on the no-op ``RunMetrics`` the engine gets with ``metrics.enabled=false``, and prints
the time per call, the ratio and the share of a reference step time.

    python tools/bench_metrics.py --steps 200000 --step-ms 10
"""

from __future__ import annotations

import argparse
import time

from dist_cosface.distributed import DistContext
from dist_cosface.metrics import MetricsConfig, RunMetrics, build_metrics


def time_per_call(metrics: RunMetrics, steps: int) -> float:
    start = time.perf_counter()
    for i in range(steps):
        metrics.on_step(
            step=i, samples=128, step_seconds=0.05, data_wait_seconds=0.001, comm_seconds=0.002
        )
    return (time.perf_counter() - start) / steps


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200_000)
    parser.add_argument("--step-ms", type=float, default=10.0, help="reference step time")
    parser.add_argument("--repeats", type=int, default=3, help="best of this many runs")
    args = parser.parse_args(argv)
    if args.steps <= 0 or args.repeats <= 0 or args.step_ms <= 0:
        parser.error("--steps, --repeats and --step-ms must be positive")
    on = build_metrics(MetricsConfig(port=0), DistContext(), {"world_size": 1})
    off = build_metrics(MetricsConfig(enabled=False), DistContext(), {})
    try:
        t_on = min(time_per_call(on, args.steps) for _ in range(args.repeats))
        t_off = min(time_per_call(off, args.steps) for _ in range(args.repeats))
    finally:
        on.close()
    share = t_on / (args.step_ms / 1000)
    print(f"on_step enabled : {t_on * 1e6:8.2f} us/call")
    print(f"on_step disabled: {t_off * 1e6:8.2f} us/call")
    print(f"ratio on/off    : {t_on / t_off:8.1f}x")
    print(f"share of a {args.step_ms:g} ms step: {share * 100:.4f} %")
    return {"on_s": t_on, "off_s": t_off, "share": share}


if __name__ == "__main__":
    main()
