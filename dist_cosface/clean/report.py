"""The cleaning report: one JSON and one CSV per finding, ``summary.json`` (counts,
thresholds, histograms) and the score histograms as one PNG. Written by rank 0 only; nothing in
it depends on time, paths of temporary folders or the order ranks answered in, so a re-run
with the same inputs writes the same bytes."""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

REPORT_DIR = "clean_report"
HISTOGRAMS_PNG = "histograms.png"


@dataclass
class Finding:
    name: str  # file stem
    columns: list[str]
    rows: list[dict]
    what: str  # one line for summary.json


@dataclass
class Histogram:
    name: str  # key in summary.json
    title: str
    xlabel: str
    edges: list[float]
    counts: list[int]
    thresholds: dict[str, float] = field(default_factory=dict)  # label -> x of a vertical line

    def to_json(self) -> dict:
        return {"edges": self.edges, "counts": self.counts, "thresholds": self.thresholds}


def _csv_text(finding: Finding) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(finding.columns)
    for row in finding.rows:
        writer.writerow(
            [
                " ".join(map(str, v)) if isinstance(v, list) else v
                for v in map(row.get, finding.columns)
            ]
        )
    return buf.getvalue()


def write_report(folder: Path, summary: dict, findings: list[Finding], hists: list[Histogram]):
    """Everything under ``folder`` (created); ``summary`` gets the file names and histograms."""
    folder.mkdir(parents=True)
    files = {}
    for finding in findings:
        (folder / f"{finding.name}.json").write_text(
            json.dumps(
                {"what": finding.what, "columns": finding.columns, "rows": finding.rows}, indent=1
            )
            + "\n"
        )
        (folder / f"{finding.name}.csv").write_text(_csv_text(finding))
        files[finding.name] = {
            "rows": len(finding.rows),
            "what": finding.what,
            "json": f"{finding.name}.json",
            "csv": f"{finding.name}.csv",
        }
    plot_histograms(hists, folder / HISTOGRAMS_PNG)
    summary = dict(summary, files=files, histograms={h.name: h.to_json() for h in hists})
    summary["histograms_png"] = HISTOGRAMS_PNG
    (folder / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")


def plot_histograms(hists: list[Histogram], path: Path) -> None:
    """All histograms as the panels of one PNG (log counts; thresholds as dashed lines)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullLocator

    rows = -(-len(hists) // 2)
    fig = Figure(figsize=(11, 3.4 * rows), dpi=90)
    FigureCanvasAgg(fig)  # no pyplot: no display, no global figure state
    fig.subplots_adjust(
        left=0.08, right=0.98, bottom=0.16 / rows, top=1 - 0.08 / rows, hspace=0.5, wspace=0.2
    )
    for n, hist in enumerate(hists):
        ax = fig.add_subplot(rows, 2, n + 1)
        counts = np.asarray(hist.counts, dtype=float)
        # log axis: empty bins sit on the 0.5 baseline
        ax.stairs(
            np.maximum(counts, 0.5), np.asarray(hist.edges), baseline=0.5, fill=True, alpha=0.7
        )
        ax.set_yscale("log")
        # few ticks with plain labels: each tick is costly, and the default 10^n labels go
        # through (slow) mathtext
        ax.yaxis.set_major_locator(LogLocator(numticks=5))
        ax.yaxis.set_minor_locator(NullLocator())
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}" if v >= 1 else ""))
        ax.xaxis.set_major_locator(MaxNLocator(6))
        for label, x in hist.thresholds.items():
            ax.axvline(x, color="tab:red", linestyle="--", label=f"{label} = {x:g}")
        ax.set_title(hist.title, fontsize=10)
        ax.set_xlabel(hist.xlabel, fontsize=9)
        ax.set_ylabel("count", fontsize=9)
        if hist.thresholds:
            ax.legend(loc="upper left", fontsize=8)
    # no Software/date metadata: the PNG bytes depend only on the data
    fig.savefig(path, format="png", metadata={"Software": None})
