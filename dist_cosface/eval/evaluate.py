"""Helpers of pair verification: preprocessing, pair scores, the ROC PNG, failure entries.

The evaluation itself (one process or all ranks) is :mod:`dist_cosface.eval.pairs_dist`.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from torch import nn

from dist_cosface.eval.config import EvalConfig
from dist_cosface.eval.metrics import roc_auc, roc_curve
from dist_cosface.eval.targets import add_target, load_target
from dist_cosface.eval.verification_set import VerificationSet
from dist_cosface.imageio import to_uint8, to_unit_range

log = logging.getLogger(__name__)


def preprocess(images: list, image_size: int) -> torch.Tensor:
    """RGB PIL images -> ``[B, 3, S, S]`` float in [-1, 1], as the training loaders produce."""
    return to_unit_range(torch.stack([to_uint8(image, image_size) for image in images]))


def input_dtype(backbone: nn.Module) -> torch.dtype:
    """Feed images in the weights' dtype: a DeepSpeed fp16/bf16 engine holds half weights."""
    for param in backbone.parameters():
        if param.is_floating_point():
            return param.dtype
    return torch.float32


def pair_scores(embeddings: torch.Tensor) -> np.ndarray:
    """Cosine similarity of rows 2i and 2i+1 of L2-normalised embeddings."""
    e = embeddings.double()
    return (e[0::2] * e[1::2]).sum(dim=1).numpy()


def save_roc_png(scores: np.ndarray, issame: np.ndarray, path: str | Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # never needs a display
    import matplotlib.pyplot as plt

    fpr, tpr = roc_curve(scores, issame)
    # A log axis cannot show FAR = 0: draw it at half the smallest non-zero FAR, 1/(2 N_neg).
    floor = 0.5 / int((~np.asarray(issame, dtype=bool)).sum())
    marker = "."
    if fpr.size > 4000:  # millions of pairs (IJB-C): ~2000 points evenly spaced on the log axis
        picks = np.searchsorted(fpr, np.geomspace(floor, 1.0, 2000))
        keep = np.unique(np.concatenate([[0, fpr.size - 1], np.minimum(picks, fpr.size - 1)]))
        fpr, tpr, marker = fpr[keep], tpr[keep], None
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.plot(np.maximum(fpr, floor), tpr, marker=marker, label=f"AUC {roc_auc(scores, issame):.4f}")
    ax.set_xscale("log")
    ax.set(xlabel="false accept rate", ylabel="true accept rate", title=title)
    ax.set(xlim=(floor, 1.0), ylim=(0, 1.01))
    ax.legend(loc="lower right")
    ax.grid(True, which="both", alpha=0.3)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


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
