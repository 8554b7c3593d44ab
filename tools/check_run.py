"""Check that a finished training run left all its results; exit 1 naming what is missing.

A run whose evaluation or plotting failed still exits 0 (training results are worth more than
a picture), so CI checks the folder instead of the exit code:

    python tools/check_run.py runs/quickstart/run --png training.png
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def run_problems(run: Path, extra_pngs: list[str]) -> list[str]:
    """What is missing or failed in ``run``: metrics, a complete checkpoint, eval, plots."""
    problems = []
    if not (run / "metrics.jsonl").is_file() or not (run / "metrics.jsonl").read_text().strip():
        problems.append(f"{run}/metrics.jsonl is missing or empty")
    if not list((run / "checkpoints").glob("step_*/meta.json")):
        problems.append(f"{run}/checkpoints holds no complete checkpoint")
    eval_json = run / "eval.json"
    results = json.loads(eval_json.read_text()) if eval_json.is_file() else {}
    if not results:
        problems.append(f"{eval_json} is missing or empty")
    for name, result in results.items():
        for key in ("error", "roc_png_error"):
            if key in result:
                problems.append(f"{eval_json}: {name}: {key}: {result[key]}")
        if "roc_png" in result and not Path(result["roc_png"]).is_file():
            problems.append(f"{eval_json}: {name}: {result['roc_png']} does not exist")
    problems += [f"{run}/{png} does not exist" for png in extra_pngs if not (run / png).is_file()]
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="the run's output_dir")
    parser.add_argument("--png", action="append", default=[], help="another PNG the run needs")
    args = parser.parse_args(argv)
    problems = run_problems(args.run, args.png)
    for problem in problems:
        print(f"check_run: {problem}", file=sys.stderr)
    if not problems:
        print(f"check_run: {args.run} is complete")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
