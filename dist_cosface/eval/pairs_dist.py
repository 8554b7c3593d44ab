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
    from dist_cosface.imageio import decode_image

    start, stop = rank_slice(len(vset.images), group, cfg.batch_size)

    def load(i: int):
        return decode_image(vset.read_image_bytes(i), vset.image_name(i))

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
    *,
    keep_going: bool = False,
) -> dict[str, dict]:
    """Collective: every rank calls it and gets the results; rank 0 writes the files.

    ``keep_going`` has the meaning of :func:`dist_cosface.eval.evaluate.run_evaluation`: a
    target that fails is recorded as ``{"error", "target"}`` and the others are still evaluated.
    Every failure inside a collective step is raised on all ranks alike (``run_agreed``), so
    all ranks record the same entry and stay in step.
    """
    from dist_cosface.eval.benchmarks import write_results
    from dist_cosface.eval.evaluate import failure_entry, load_each_target
    from dist_cosface.eval.ranks import run_agreed
    from dist_cosface.eval.targets import load_targets

    results: dict[str, dict] = {}
    if sets is None:
        load = (lambda: load_each_target(cfg, results)) if keep_going else lambda: load_targets(cfg)
        sets = run_agreed(load, group)
    main = group is None or dist.get_rank(group) == 0
    out_dir = Path(out_dir)
    for name, vset in sets.items():
        try:
            results[name] = _evaluate_set(
                backbone, vset, cfg, device, image_size, group, main, out_dir / f"roc_{name}.png"
            )
        except Exception as exc:
            if not keep_going:
                raise
            results[name] = failure_entry(vset.source or name, exc)
    if main:
        write_results(out_dir / "eval.json", results)
    return results


def _evaluate_set(
    backbone: torch.nn.Module,
    vset: VerificationSet,
    cfg: EvalConfig,
    device: torch.device | str,
    image_size: int,
    group: dist.ProcessGroup | None,
    main: bool,
    roc_path: Path,
) -> dict:
    """Collective: the metrics of one set on every rank; rank 0 draws the ROC PNG."""
    from dist_cosface.eval.evaluate import add_roc_png, pair_scores
    from dist_cosface.eval.metrics import verification_metrics

    if vset.num_pairs < cfg.n_folds:
        raise ValueError(f"{vset.source}: {vset.num_pairs} pairs < eval.n_folds={cfg.n_folds}")
    embeddings = embed_pairs(backbone, vset, image_size, device, cfg, group)
    scores = pair_scores(embeddings)
    issame = np.asarray(vset.issame, dtype=bool)
    result = verification_metrics(scores, issame, cfg.fars, cfg.n_folds)
    if cfg.roc_png and main:
        add_roc_png(result, scores, issame, roc_path, vset)
    elif cfg.roc_png:
        result["roc_png"] = str(roc_path)  # where rank 0 draws it; only rank 0's results are kept
    return result
