"""Run the CosFace-paper reproductions on ORL / Extended Yale B and print / append results.

Examples (from the repository root)::

    python tools/experiments.py run --dataset yaleb --margin-type cosface --margin 0.35 \
        --seeds 0 1 2 --out results/experiments.jsonl
    python tools/experiments.py suite loss --dataset yaleb --out results/experiments.jsonl
    python tools/experiments.py table results/experiments.jsonl

Every result line is one (configuration, seed) with the exact command that produced it.
Open-set protocol: see docs/experiments.md (evaluation identities are never trained on).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # runnable as a plain script from a checkout
    sys.path.insert(0, str(REPO))

from dist_cosface.configtools import from_mapping, load_yaml, to_mapping  # noqa: E402
from dist_cosface.experiments import ExperimentConfig, run_experiment  # noqa: E402

MARGINS = [0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45]

# name -> list of (row label, overrides); each row runs for every seed
SUITES = {
    "loss": [
        ("softmax", {"margin_type": "softmax"}),
        ("NSL (m=0)", {"margin_type": "nsl", "margin": 0.0}),
        ("LMCL / CosFace (m=0.35)", {"margin_type": "cosface", "margin": 0.35}),
        ("ArcFace (m=0.5)", {"margin_type": "arcface", "margin": 0.5}),
    ],
    # the same normalized losses with s from the CosFace bound instead of the fixed s = 30
    "loss_auto": [
        ("NSL (m=0), s=auto", {"margin_type": "nsl", "margin": 0.0, "scale": "auto"}),
        ("LMCL (m=0.35), s=auto", {"margin_type": "cosface", "margin": 0.35, "scale": "auto"}),
        ("ArcFace (m=0.5), s=auto", {"margin_type": "arcface", "margin": 0.5, "scale": "auto"}),
    ],
    "margin": [(f"LMCL m={m:g}", {"margin_type": "cosface", "margin": m}) for m in MARGINS],
    "scale": [
        (f"LMCL s={s}", {"margin_type": "cosface", "scale": s})
        for s in (1.0, 2.0, "auto", 16.0, 64.0)
    ],
    # the margins the field moved to, same budget (config file) and s = 30 for each; MagFace's
    # norm range is the paper's [10, 110] scaled by 1/10 to this net's BN'd ~8-norm features,
    # with lambda_g scaled by the same 1/10 so that lambda_g g(a) keeps the paper's values
    "margins": [
        ("CosFace (m=0.35)", {"margin_type": "cosface", "margin": 0.35}),
        ("ArcFace (m=0.5)", {"margin_type": "arcface", "margin": 0.5}),
        ("CurricularFace (m=0.5)", {"margin_type": "curricularface", "margin": 0.5}),
        ("AdaFace (m=0.4, h=0.333)", {"margin_type": "adaface", "margin": 0.4}),
        (
            "MagFace (m 0.45-0.8 on |x| 1-11)",
            {
                "margin_type": "magface",
                "magface": {"l_a": 1.0, "u_a": 11.0, "l_m": 0.45, "u_m": 0.8, "lambda_g": 3.5},
            },
        ),
    ],
    # 20% of the training labels flipped to another identity (same flips for both rows)
    "noise": [
        ("CosFace, 20% labels flipped", {"margin_type": "cosface", "label_noise": 0.2}),
        (
            "sub-center CosFace K=3, 20% labels flipped",
            {"margin_type": "cosface", "subcenters": 3, "label_noise": 0.2},
        ),
    ],
    "norm": [
        ("LMCL, features normalized", {"margin_type": "cosface", "feature_norm": True}),
        # the feature norm ||x|| plays the role of s: scale 1 whether or not the head multiplies
        (
            "LMCL, features not normalized",
            {"margin_type": "cosface", "feature_norm": False, "scale": 1.0},
        ),
    ],
}


def _config_args(parser: argparse.ArgumentParser) -> None:
    for f in dataclasses.fields(ExperimentConfig):
        if f.name == "seed":
            continue
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool", bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None)
        else:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            parser.add_argument(flag, default=None, help=f"default {default!r}")


def _build_config(args: argparse.Namespace, overrides: dict, seed: int):
    import yaml

    data = {}
    if args.config:
        data.update(load_yaml(args.config))
    for f in dataclasses.fields(ExperimentConfig):
        raw = getattr(args, f.name, None)
        if raw is not None and f.name != "seed":
            data[f.name] = yaml.safe_load(raw) if isinstance(raw, str) else raw
    data.update(overrides)
    data["seed"] = seed
    return from_mapping(ExperimentConfig, data)


def _run_rows(
    args: argparse.Namespace, rows: list[tuple[str, dict]], suite: str, argv: list[str]
) -> None:
    import torch

    torch.set_num_threads(args.threads)
    command = "python tools/experiments.py " + shlex.join(argv)
    out = Path(args.out) if args.out else None
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
    for label, overrides in rows:
        for seed in args.seeds:
            cfg = _build_config(args, overrides, seed)
            result = run_experiment(cfg, REPO)
            line = {
                "suite": suite,
                "row": label,
                "config": to_mapping(cfg),
                "command": command,
                "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                **result,
            }
            print(json.dumps(line), flush=True)
            if out:
                with out.open("a") as fh:
                    fh.write(json.dumps(line) + "\n")


def _fmt(values: list[float], scale: float = 100.0) -> str:
    import numpy as np

    v = np.asarray(values, dtype=float) * scale
    return f"{v.mean():.2f} ± {v.std(ddof=1) if len(v) > 1 else 0.0:.2f}"


def _row_flags(line: dict) -> str:
    """The ``run`` flags that reproduce one row of a suite: the flags of the command that ran
    it (config file, budget overrides such as ``--epochs``), then the row's own overrides."""
    overrides = dict(SUITES.get(line["suite"], [])).get(line["row"], {})
    flags = _command_flags(line["command"])
    if not any(f.startswith("--config") for f in flags):
        flags.insert(0, f"--config configs/experiments/{line['config']['dataset']}.yaml")
    for key, value in overrides.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            flags.append(flag if value else "--no-" + flag[2:])
        elif isinstance(value, dict):  # a margin section, as YAML flow mapping
            inner = ", ".join(f"{k}: {v:g}" for k, v in value.items())
            flags.append(f"{flag} '{{{inner}}}'")
        else:
            flags.append(f"{flag} {value:g}" if isinstance(value, float) else f"{flag} {value}")
    return " ".join(flags)


def _command_flags(command: str) -> list[str]:
    """``--flag value`` pairs of a recorded command, without the sub-command, its suite name,
    and the seeds / output / thread / row options (the table gives the seeds)."""
    argv = shlex.split(command)[2:]  # python tools/experiments.py
    argv = argv[2:] if argv[:1] == ["suite"] else argv[1:]
    flags, skip = [], False
    for token in argv:
        if token.startswith("--"):
            skip = token in ("--seeds", "--out", "--threads", "--rows")
            if not skip:
                flags.append(token)
        elif not skip and flags:
            flags[-1] += f" {token}"
    return flags


def table(paths: list[str], suite: str | None, dataset: str | None = None) -> str:
    """Markdown table: one line per (suite, row, dataset, split), mean ± sample std over seeds.

    The last column holds the ``python tools/experiments.py run`` flags that reproduce the row
    (add ``--seeds ...``); ``s/run`` is the mean wall time of one seed on the shared CPU.
    """
    groups: dict[tuple, list[dict]] = {}
    for path in paths:
        for raw in Path(path).read_text().splitlines():
            if not raw.strip():
                continue
            line = json.loads(raw)
            c = line["config"]
            if (suite and line["suite"] != suite) or (dataset and c["dataset"] != dataset):
                continue
            key = (line["suite"], line["row"], c["dataset"], c["split"])
            groups.setdefault(key, []).append(line)
    out = [
        "| row | data | seeds | s | 10-fold acc % | TAR@FAR=1e-2 % | AUC % | train loss "
        "| s/run | `run` flags |",
        "|" + "---|" * 10,
    ]
    for (_, row, data, _), lines in groups.items():
        tars = [x["tar_at_far_0.01"] for x in lines if x.get("tar_at_far_0.01") is not None]
        c = lines[0]["config"]
        scale = format(lines[0]["scale"], ".2f")
        if c["margin_type"] == "softmax":
            scale = "-"
        elif not c["feature_norm"]:
            scale = "‖x‖"  # the feature norm takes the place of s
        out.append(
            f"| {row.replace('|', chr(92) + '|')} | {data} | {len(lines)} "
            f"| {scale} "
            f"| {_fmt([x['accuracy'] for x in lines])} | {_fmt(tars) if tars else 'n/a'} "
            f"| {_fmt([x['roc_auc'] for x in lines])} "
            f"| {sum(x['final_loss'] for x in lines) / len(lines):.3f} "
            f"| {sum(x['seconds'] for x in lines) / len(lines):.0f} | `{_row_flags(lines[0])}` |"
        )
    runs = [x for lines in groups.values() for x in lines]
    minutes = sum(x["seconds"] for x in runs) / 60
    out.append(f"\n{len(runs)} runs, {minutes:.1f} min of training + evaluation in total.")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    for name in ("run", "suite"):
        p = sub.add_parser(name)
        if name == "suite":
            p.add_argument("suite", choices=sorted(SUITES))
            p.add_argument(
                "--rows",
                type=int,
                nargs="+",
                default=None,
                help="only these rows of the suite (0-based), e.g. to split it over processes",
            )
        p.add_argument("--config", help="YAML file of ExperimentConfig keys")
        p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
        p.add_argument("--threads", type=int, default=1)
        p.add_argument("--out", help="append one JSON line per run to this file")
        _config_args(p)
    t = sub.add_parser("table")
    t.add_argument("results", nargs="+")
    t.add_argument("--suite", default=None)
    t.add_argument("--dataset", default=None)
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    if args.cmd == "table":
        print(table(args.results, args.suite, args.dataset))
    elif args.cmd == "run":
        _run_rows(args, [("run", {})], "run", argv)
    else:
        rows = SUITES[args.suite]
        if args.rows is not None:
            bad = [i for i in args.rows if not 0 <= i < len(rows)]
            if bad:
                parser.error(f"--rows {bad}: suite {args.suite} has rows 0..{len(rows) - 1}")
            rows = [rows[i] for i in args.rows]
        _run_rows(args, rows, args.suite, argv)


if __name__ == "__main__":
    main()
