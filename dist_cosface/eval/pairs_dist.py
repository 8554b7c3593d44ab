"""Pair verification (``.bin`` / pairs.txt targets) with the images split over all ranks.

The same figures as :func:`dist_cosface.eval.evaluate.run_evaluation`, which runs on one rank:
each rank embeds its slice (whole batches), the embeddings are gathered, every rank computes
the metrics and rank 0 writes ``eval.json`` and the ROC PNGs. Used by evaluation during
training so that no rank idles at a barrier.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from dist_cosface.eval.config import EvalConfig
from dist_cosface.eval.verification_set import VerificationSet


def embed_pairs(
    backbone: torch.nn.Module,
    vset: VerificationSet,
    image_size: int,
    device: torch.device | str,
    cfg: EvalConfig,
    group: dist.ProcessGroup | None,
) -> torch.Tensor:
    """L2-normalised embeddings of every image of the set, on every rank."""
    from dist_cosface.eval.images import embed_images, rank_slice
    from dist_cosface.eval.ranks import gather_rows, run_agreed
    from dist_cosface.eval.verification_set import decode_image

    start, stop = rank_slice(len(vset.images), group, cfg.batch_size)

    def load(i: int):
        return decode_image(vset.read_image_bytes(i), f"{vset.source}[{i}]")

    local = run_agreed(
        lambda: embed_images(
            backbone,
            list(range(start, stop)),
            image_size,
            device,
            cfg.batch_size,
            cfg.flip,
            load=load,
        ),
        group,
    )
    return torch.nn.functional.normalize(gather_rows(local, group), dim=1)


def run_evaluation_all_ranks(
    backbone: torch.nn.Module,
    cfg: EvalConfig,
    device: torch.device | str,
    image_size: int,
    out_dir: str | Path,
    group: dist.ProcessGroup | None,
    sets: dict[str, VerificationSet] | None = None,
) -> dict[str, dict]:
    """Collective: every rank calls it and gets the results; rank 0 writes the files."""
    from dist_cosface.eval.benchmarks import write_results
    from dist_cosface.eval.evaluate import pair_scores, save_roc_png
    from dist_cosface.eval.metrics import verification_metrics
    from dist_cosface.eval.ranks import run_agreed
    from dist_cosface.eval.targets import load_targets

    sets = run_agreed(lambda: load_targets(cfg), group) if sets is None else sets
    main = group is None or dist.get_rank(group) == 0
    out_dir = Path(out_dir)
    results = {}
    for name, vset in sets.items():
        if vset.num_pairs < cfg.n_folds:
            raise ValueError(f"{vset.source}: {vset.num_pairs} pairs < eval.n_folds={cfg.n_folds}")
        embeddings = embed_pairs(backbone, vset, image_size, device, cfg, group)
        scores = pair_scores(embeddings)
        issame = np.asarray(vset.issame, dtype=bool)
        results[name] = verification_metrics(scores, issame, cfg.fars, cfg.n_folds)
        if cfg.roc_png:
            path = out_dir / f"roc_{name}.png"
            if main:
                save_roc_png(scores, issame, path, vset.name)
            results[name]["roc_png"] = str(path)
    if main:
        write_results(out_dir / "eval.json", results)
    return results
