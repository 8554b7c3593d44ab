"""Pair verification (``.bin`` / pairs.txt targets): the one evaluation entry point.

With a process group, the images are split over its ranks: each rank embeds a batch-aligned
slice, the embeddings are gathered, every rank computes the metrics and rank 0 writes
``eval.json`` and the ROC PNGs, so that no rank idles at a barrier during training. With
``group=None`` everything runs in this process (``dist-cosface eval`` without torchrun, tools,
tests); the figures are the same whatever the number of ranks.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from dist_cosface.agreement import run_agreed
from dist_cosface.eval.config import EvalConfig
from dist_cosface.eval.embedding import embed_images
from dist_cosface.eval.ranks import gather_rows, rank_slice
from dist_cosface.eval.results import write_results
from dist_cosface.eval.roc import save_roc_png, verification_metrics
from dist_cosface.eval.targets import add_target, check_set, load_target, load_targets
from dist_cosface.eval.verification_set import VerificationSet
from dist_cosface.imageio import decode_image

log = logging.getLogger(__name__)


def pair_scores(embeddings: torch.Tensor) -> np.ndarray:
    """Cosine similarity of rows 2i and 2i+1 of L2-normalised embeddings."""
    e = embeddings.double()
    return (e[0::2] * e[1::2]).sum(dim=1).numpy()


def embed_set(
    backbone: torch.nn.Module,
    vset: VerificationSet,
    image_size: int,
    device: torch.device | str,
    batch_size: int = 64,
    flip: bool = True,
    group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """L2-normalised float32 embeddings ``[2 * num_pairs, D]`` on the CPU, on every rank.

    Pass the bare backbone (not a DDP/DeepSpeed wrapper): each rank runs it on its own slice.
    With ``flip``, each embedding is the sum of the image's and its mirror image's embedding.
    """
    start, stop = rank_slice(len(vset.images), group, batch_size)

    def load(i: int):
        return decode_image(vset.read_image_bytes(i), vset.image_name(i))

    local = run_agreed(
        lambda: embed_images(
            backbone, list(range(start, stop)), image_size, device, batch_size, flip, load=load
        ),
        group,
    )
    return torch.nn.functional.normalize(gather_rows(local, group), dim=1)


def evaluate(
    backbone: torch.nn.Module,
    target: str | Path | VerificationSet,
    cfg: EvalConfig,
    device: torch.device | str,
    image_size: int,
    roc_path: str | Path | None = None,
    group: dist.ProcessGroup | None = None,
) -> dict:
    """Verification metrics of ``backbone`` on one set (collective with a ``group``).

    Keys: accuracy, accuracy_std, best_threshold, fold_accuracies, tar_at_far {far: tar},
    roc_auc, num_pairs; with ``roc_path``, rank 0 draws the ROC PNG there (``roc_png``, or
    ``roc_png_error`` if the plot failed) and the other ranks record where it is drawn.
    """
    if isinstance(target, VerificationSet):
        vset = target
    else:
        vset = run_agreed(lambda: load_target(target), group)
    check_set(vset, cfg)
    embeddings = embed_set(backbone, vset, image_size, device, cfg.batch_size, cfg.flip, group)
    scores = pair_scores(embeddings)
    issame = np.asarray(vset.issame, dtype=bool)
    result = verification_metrics(scores, issame, cfg.fars, cfg.n_folds)
    if roc_path is not None and _is_main(group):
        add_roc_png(result, scores, issame, roc_path, vset)
    elif roc_path is not None:
        result["roc_png"] = str(roc_path)  # where rank 0 draws it; only rank 0's results are kept
    return result


def run_evaluation_all_ranks(
    backbone: torch.nn.Module,
    cfg: EvalConfig,
    device: torch.device | str,
    image_size: int,
    out_dir: str | Path,
    group: dist.ProcessGroup | None = None,
    sets: dict[str, VerificationSet] | None = None,
    *,
    keep_going: bool = False,
) -> dict[str, dict]:
    """Evaluate on every target; writes ``roc_<name>.png`` and ``eval.json`` in ``out_dir``.

    Collective with a ``group``: every rank calls it and gets the results; rank 0 writes the
    files. ``sets`` (from ``load_targets``) avoids re-reading the files at every evaluation.
    With ``keep_going`` (training's final evaluation: a finished run must not fail because of
    it), a target that cannot be loaded or evaluated is logged and recorded as
    ``{"error": ..., "target": ...}`` and the other targets are still evaluated; without it
    the first failure raises. A ROC plot that fails is never fatal (``roc_png_error``). Every
    failure inside a collective step is raised on all ranks alike (``run_agreed``), so all
    ranks record the same entry and stay in step.
    """
    results: dict[str, dict] = {}
    if sets is None:
        load = (lambda: load_each_target(cfg, results)) if keep_going else lambda: load_targets(cfg)
        sets = run_agreed(load, group)
    out_dir = Path(out_dir)
    for name, vset in sets.items():
        roc_path = out_dir / f"roc_{name}.png" if cfg.roc_png else None
        try:
            results[name] = evaluate(backbone, vset, cfg, device, image_size, roc_path, group)
        except Exception as exc:
            if not keep_going:
                raise
            results[name] = failure_entry(vset.source or name, exc)
    if _is_main(group):
        write_results(out_dir / "eval.json", results)
    return results


def _is_main(group: dist.ProcessGroup | None) -> bool:
    return group is None or dist.get_rank(group) == 0


def add_roc_png(result: dict, scores, issame, roc_path: str | Path, vset: VerificationSet) -> None:
    """Write the ROC PNG and record it in ``result``; a failed plot is recorded, never raised."""
    try:
        result["roc_png"] = str(save_roc_png(scores, issame, roc_path, vset.name))
    except Exception as exc:  # a picture never costs the numbers (matplotlib, disk, ...)
        result["roc_png_error"] = _describe(exc)
        log.warning(
            "%s: ROC plot not written (%s); metrics kept", vset.source, result["roc_png_error"]
        )


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def failure_entry(target: object, exc: Exception) -> dict:
    """The eval.json entry of a target that could not be evaluated (the error is logged)."""
    log.error("evaluation on %s failed: %s", target, _describe(exc), exc_info=exc)
    return {"error": _describe(exc), "target": str(target)}


def load_each_target(cfg: EvalConfig, failures: dict[str, dict]) -> dict[str, VerificationSet]:
    """Like ``load_targets``, but a target that fails to load goes to ``failures``."""
    sets: dict[str, VerificationSet] = {}
    for target in cfg.targets:
        try:
            add_target(sets, load_target(target), target)
        except Exception as exc:
            failures[str(target)] = failure_entry(target, exc)
    return sets
