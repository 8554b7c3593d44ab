"""Write the Prometheus file_sd target file for a multi-node run.

Each rank serves /metrics on ``base_port + local_rank``; this lists ``host:port`` for every
rank of every node, one target group per node, in the JSON format of Prometheus'
``file_sd_configs``. Prometheus re-reads the file when it changes, so a launcher can call this
at job start (and delete the file at the end):

    python tools/write_prometheus_targets.py --nodes node01,node02 --ranks-per-node 8 \\
        --base-port 9400 --label run=r50_glint --out monitoring/targets/r50_glint.json
    scontrol show hostnames "$SLURM_JOB_NODELIST" > nodes.txt
    python tools/write_prometheus_targets.py --nodes-file nodes.txt --ranks-per-node 8 ...
"""

from __future__ import annotations

import argparse
import json
import os
import re
import tempfile
from pathlib import Path

_LABEL_RE = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
_HOST_RE = re.compile(r"^[A-Za-z0-9._-]+$")
# Labels every exported series already carries: a target label of the same name would make
# Prometheus rename the series' own label to exported_<name>.
_RESERVED = {"node", "rank", "instance"}


def build_targets(
    nodes: list[str], ranks_per_node: int, base_port: int, labels: dict[str, str] | None = None
) -> list[dict]:
    """One file_sd target group per node: ``{"targets": ["host:port", ...], "labels": {...}}``."""
    if not nodes:
        raise ValueError("no nodes given")
    for host in nodes:
        if not _HOST_RE.match(host):
            raise ValueError(f"node {host!r} is not a plain host name or address")
    duplicates = sorted({h for h in nodes if nodes.count(h) > 1})
    if duplicates:
        raise ValueError(f"nodes listed more than once: {duplicates}")
    if ranks_per_node < 1:
        raise ValueError(f"ranks_per_node must be >= 1, got {ranks_per_node}")
    if base_port < 1 or base_port + ranks_per_node - 1 > 65535:
        raise ValueError(
            f"base_port {base_port} + {ranks_per_node} ranks does not fit in ports 1..65535"
        )
    labels = dict(labels or {})
    for name, value in labels.items():
        if not _LABEL_RE.match(name) or name.startswith("__") or name in _RESERVED:
            raise ValueError(f"label {name!r} is not usable as a target label")
        if not isinstance(value, str):
            raise TypeError(f"label {name!r} value must be a string, got {value!r}")
    return [
        {
            "targets": [f"{host}:{base_port + i}" for i in range(ranks_per_node)],
            "labels": labels,
        }
        for host in nodes
    ]


def write_targets(path: str | Path, groups: list[dict]) -> None:
    """Write atomically: Prometheus watches the file and must never read half of it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(groups, f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _read_nodes(args: argparse.Namespace) -> list[str]:
    if args.nodes_file:
        nodes_file = Path(args.nodes_file)
        if not nodes_file.is_file():
            raise ValueError(f"--nodes-file {nodes_file} does not exist")
        return [line.strip() for line in nodes_file.read_text().splitlines() if line.strip()]
    return [n.strip() for n in args.nodes.split(",") if n.strip()]


def _parse_labels(items: list[str]) -> dict[str, str]:
    labels = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--label {item!r} is not of the form name=value")
        labels[name] = value
    return labels


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--nodes", help="comma-separated host names")
    source.add_argument("--nodes-file", help="file with one host name per line")
    parser.add_argument("--ranks-per-node", type=int, required=True)
    parser.add_argument("--base-port", type=int, default=9400, help="metrics.port of the run")
    parser.add_argument("--label", action="append", default=[], help="extra name=value label")
    parser.add_argument("--out", required=True, help="target JSON file to (re)write")
    args = parser.parse_args(argv)
    try:
        groups = build_targets(
            _read_nodes(args), args.ranks_per_node, args.base_port, _parse_labels(args.label)
        )
    except (ValueError, TypeError) as exc:
        parser.error(str(exc))
    write_targets(args.out, groups)
    n = sum(len(g["targets"]) for g in groups)
    print(f"wrote {n} targets on {len(groups)} nodes to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
