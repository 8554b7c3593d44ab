"""Training throughput with the Prometheus exporter and the margin-health statistics on vs
off, in one run.

Runs the same short 2-rank CPU training (configs/quickstart.yaml by default) several times,
rotating three settings so that all see the same machine load:

- ``off``: ``metrics.enabled=false metrics.margin_health=false``
- ``exporter``: ``metrics.enabled=true metrics.margin_health=false``
- ``exporter+health``: ``metrics.enabled=true metrics.margin_health=true`` (the default)

and prints the median samples/s of each and the ratios. Throughput is read from each run's
metrics.jsonl (log lines after the first, which includes start-up).

    python tools/bench_metrics_training.py --rounds 2 --steps 60
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
if str(REPO) not in sys.path:  # runnable as a plain script from a checkout (tools.spawn)
    sys.path.insert(0, str(REPO))


SETTINGS = {
    "off": ("metrics.enabled=false", "metrics.margin_health=false"),
    "exporter": ("metrics.enabled=true", "metrics.margin_health=false"),
    "exporter+health": ("metrics.enabled=true", "metrics.margin_health=true"),
}


def run_once(
    config: str, steps: int, setting: str, out: Path, port: int, log_every: int, extra: list[str]
) -> float:
    from tools.spawn import torchrun_command

    cmd = torchrun_command(
        2,
        "-m",
        "dist_cosface.cli",
        "train",
        config,
        f"train.total_steps={steps}",
        f"train.log_every={log_every}",
        "checkpoint.every_steps=0",
        "checkpoint.resume=none",
        "data.backend=synthetic",  # the exporter's cost, not the input pipeline's
        *SETTINGS[setting],
        f"metrics.port={port}",
        f"train.output_dir={out}",
        "eval.targets=[]",
        *extra,
    )
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    subprocess.run(cmd, check=True, cwd=REPO, env=env, stdout=subprocess.DEVNULL)
    lines = (out / "metrics.jsonl").read_text().splitlines()[1:]
    rates = [json.loads(line)["samples_per_s"] for line in lines]
    if not rates:
        raise ValueError(f"{out}/metrics.jsonl has no log line after the first; raise --steps")
    return statistics.median(rates)


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/quickstart.yaml")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument(
        "--rounds", "--pairs", type=int, default=2, help="rounds of the three settings"
    )
    parser.add_argument("--log-every", type=int, default=10, help="train.log_every")
    parser.add_argument("--port", type=int, default=9470)
    parser.add_argument("overrides", nargs="*", help="more config overrides, key=value")
    args = parser.parse_args(argv)
    if args.steps < 2 * args.log_every or args.rounds < 1 or args.log_every < 1:
        parser.error("need --steps >= 2 * --log-every, --rounds >= 1 and --log-every >= 1")
    names = list(SETTINGS)
    results: dict[str, list[float]] = {name: [] for name in names}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.rounds):
            for name in names[i % 3 :] + names[: i % 3]:  # rotate which setting goes first
                out = Path(tmp) / f"run{i}_{name.replace('+', '_')}"
                rate = run_once(
                    args.config, args.steps, name, out, args.port, args.log_every, args.overrides
                )
                results[name].append(rate)
    medians = {name: statistics.median(rates) for name, rates in results.items()}
    print(f"{'setting':<18}{'samples/s (median)':>20}  runs")
    for name in names:
        print(f"{name:<18}{medians[name]:>20.1f}  {[round(r, 1) for r in results[name]]}")
    ratios = {
        "exporter/off": medians["exporter"] / medians["off"],
        "exporter+health/off": medians["exporter+health"] / medians["off"],
        "exporter+health/exporter": medians["exporter+health"] / medians["exporter"],
    }
    for label, ratio in ratios.items():
        print(f"throughput ratio {label}: {ratio:.3f}")
    return ratios


if __name__ == "__main__":
    main()
