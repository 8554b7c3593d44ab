"""The CosFace paper's toy (its Fig. 3 at small scale): 2-D features of 8 identities trained
with softmax, NSL and LMCL, side by side.

Trains the small conv net with a 2-D embedding (no dropout) on the first 8 TRAINING identities
of ORL through the project's ``ShardedClassifier`` and plots the training features: softmax
on the plane, NSL / LMCL normalized onto the unit circle (where those losses compare them).
For 8 classes in 2-D the margin can be at most ``1 - cos(2 pi / 8) = 0.29`` (paper, Sec. 3.4),
hence the default ``--margin 0.2``. (Extended Yale B's extreme lighting does not fit through a
2-D bottleneck of this small net: training loss stays > 1.2, so the toy uses ORL.)

    python tools/plot_features_2d.py --out docs/figures/features_2d.png"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from dist_cosface.experiments import ExperimentConfig, train_model  # noqa: E402
from dist_cosface.experiments.runner import embed, split_sets  # noqa: E402


def angular_stats(features, labels) -> dict:
    """Median over classes of (smallest angle to another class, largest angle within class).

    Angles are of the feature directions in degrees; a margin should raise the first and
    shrink the second.
    """
    import numpy as np

    angle = np.arctan2(features[:, 1], features[:, 0])
    diff = np.abs(angle[:, None] - angle[None, :])
    diff = np.degrees(np.minimum(diff, 2 * np.pi - diff))
    same = labels[:, None] == labels[None, :]
    gaps, spreads = [], []
    for c in np.unique(labels):
        rows = labels == c
        gaps.append(diff[rows][:, ~same[rows][0]].min())
        spreads.append(diff[rows][:, rows].max())
    return {
        "inter_class_gap_deg": float(np.median(gaps)),
        "intra_class_spread_deg": float(np.median(spreads)),
    }


def train_2d(margin_type: str, margin: float, seed: int, args: argparse.Namespace):
    import torch

    cfg = ExperimentConfig(
        dataset=args.dataset,
        embedding_size=2,
        margin_type=margin_type,
        margin=margin,
        scale=args.scale,
        epochs=args.epochs,
        seed=seed,
        max_identities=args.identities,
        max_per_identity=args.max_per_identity,
        lr=args.lr,
        dropout=args.dropout,
        batch_size=args.batch_size,
        augment=args.augment,
    )
    train, _ = split_sets(cfg, REPO)
    model, _, summary = train_model(cfg, train)
    feats = embed(model, train.images) / 2  # embed() sums image + mirror
    return feats.numpy(), train.labels.numpy(), summary, torch.get_num_threads()


def plot(panels: list[tuple[str, object, object, dict]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 4.2))
    colours = plt.get_cmap("tab10").colors
    for ax, (title, feats, labels, stats) in zip(axes, panels):
        if title.startswith("softmax"):
            pts = feats
        else:
            pts = feats / np.linalg.norm(feats, axis=1, keepdims=True)
            t = np.linspace(0, 2 * np.pi, 200)
            ax.plot(np.cos(t), np.sin(t), color="0.8", lw=0.8)
        for c in np.unique(labels):
            sel = labels == c
            ax.scatter(pts[sel, 0], pts[sel, 1], s=6, alpha=0.6, color=colours[c % 10])
        ax.set_aspect("equal")
        ax.set_title(
            f"{title}\ngap {stats['inter_class_gap_deg']:.1f}°, "
            f"spread {stats['intra_class_spread_deg']:.0f}° (median/class)",
            fontsize=9,
        )
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="docs/figures/features_2d.png")
    parser.add_argument("--dataset", default="orl", choices=["yaleb", "orl"])
    parser.add_argument("--identities", type=int, default=8)
    parser.add_argument("--max-per-identity", type=int, default=None)
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--scale", type=float, default=10.0)
    parser.add_argument("--margin", type=float, default=0.2)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--dropout", type=float, default=0.0)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--augment", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    panels, report = [], {}
    for title, margin_type, margin in (
        ("softmax", "softmax", 0.0),
        ("NSL", "nsl", 0.0),
        (f"LMCL (m={args.margin:g})", "cosface", args.margin),
    ):
        runs = []
        for seed in args.seeds:  # the first seed is plotted; stats are averaged over all
            start = time.perf_counter()
            feats, labels, summary, _ = train_2d(margin_type, margin, seed, args)
            stats = angular_stats(feats, labels)
            runs.append({**stats, **summary, "seconds": time.perf_counter() - start})
            if seed == args.seeds[0]:
                panels.append((title, feats, labels, stats))
        report[title] = {k: sum(r[k] for r in runs) / len(runs) for k in runs[0]}
        report[title]["per_seed"] = runs
    plot(panels, Path(args.out))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
