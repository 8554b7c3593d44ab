"""Training throughput with the Prometheus exporter on vs off, in one run.

Runs the same short 2-rank CPU training (configs/quickstart.yaml by default) several times,
alternating ``metrics.enabled`` so both settings see the same machine load, and prints the
median samples/s of each and their ratio. Throughput is read from each run's metrics.jsonl
(log lines after the first, which includes start-up).

    python tools/bench_metrics_training.py --pairs 2 --steps 60
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_once(config: str, steps: int, enabled: bool, out: Path, port: int) -> float:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "dist_cosface.cli",
        "train",
        config,
        f"train.total_steps={steps}",
        "train.log_every=10",
        "checkpoint.every_steps=0",
        "checkpoint.resume=none",
        "data.backend=synthetic",  # the exporter's cost, not the input pipeline's
        f"metrics.enabled={str(enabled).lower()}",
        f"metrics.port={port}",
        f"train.output_dir={out}",
        "eval.targets=[]",
    ]
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    subprocess.run(cmd, check=True, cwd=REPO, env=env, stdout=subprocess.DEVNULL)
    lines = (out / "metrics.jsonl").read_text().splitlines()[1:]
    rates = [json.loads(line)["samples_per_s"] for line in lines]
    if not rates:
        raise ValueError(f"{out}/metrics.jsonl has no log line after the first; raise --steps")
    return statistics.median(rates)


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/quickstart.yaml")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--pairs", type=int, default=2, help="on/off pairs to alternate")
    parser.add_argument("--port", type=int, default=9470)
    args = parser.parse_args(argv)
    if args.steps < 20 or args.pairs < 1:
        parser.error("--steps must be >= 20 and --pairs >= 1")
    results: dict[bool, list[float]] = {True: [], False: []}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.pairs):
            for enabled in (i % 2 == 0, i % 2 != 0):  # alternate which setting goes first
                out = Path(tmp) / f"run{i}_{enabled}"
                results[enabled].append(run_once(args.config, args.steps, enabled, out, args.port))
    on, off = statistics.median(results[True]), statistics.median(results[False])
    print(f"{'metrics':<10}{'samples/s (median)':>20}  runs")
    print(f"{'off':<10}{off:>20.1f}  {[round(r, 1) for r in results[False]]}")
    print(f"{'on':<10}{on:>20.1f}  {[round(r, 1) for r in results[True]]}")
    print(f"throughput ratio on/off: {on / off:.3f}")
    return on / off


if __name__ == "__main__":
    main()
