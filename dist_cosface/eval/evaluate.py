"""Embed verification pairs with a backbone and score them (rank 0 only; no collectives)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch
from torch import nn

from dist_cosface.eval.config import EvalConfig
from dist_cosface.eval.metrics import roc_auc, roc_curve, verification_metrics
from dist_cosface.eval.targets import add_target, check_set, load_target, load_targets
from dist_cosface.eval.verification_set import VerificationSet
from dist_cosface.imageio import decode_image, to_uint8, to_unit_range

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


@torch.no_grad()
def embed_set(
    backbone: nn.Module,
    vset: VerificationSet,
    image_size: int,
    device: torch.device | str,
    batch_size: int = 64,
    flip: bool = True,
) -> torch.Tensor:
    """L2-normalised float32 embeddings ``[2 * num_pairs, D]`` on the CPU.

    Pass the bare backbone (not a DDP/DeepSpeed wrapper): this runs on one rank only.

    With ``flip``, each embedding is the sum of the image's and its mirror image's embedding.
    """
    was_training = backbone.training
    backbone.eval()
    dtype = input_dtype(backbone)
    chunks = []
    try:
        for start in range(0, len(vset.images), batch_size):
            indices = range(start, min(start + batch_size, len(vset.images)))
            pil = [decode_image(vset.read_image_bytes(i), vset.image_name(i)) for i in indices]
            x = preprocess(pil, image_size).to(device, dtype)
            emb = backbone(x).float()
            if flip:
                emb = emb + backbone(torch.flip(x, dims=[3])).float()
            chunks.append(emb.cpu())
    finally:
        backbone.train(was_training)
    return torch.nn.functional.normalize(torch.cat(chunks), dim=1)


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


def evaluate(
    backbone: nn.Module,
    target: str | Path | VerificationSet,
    cfg: EvalConfig,
    device: torch.device | str,
    image_size: int,
    roc_path: str | Path | None = None,
) -> dict:
    """Verification metrics of ``backbone`` on one set (optionally writing a ROC PNG).

    Keys: accuracy, accuracy_std, best_threshold, fold_accuracies, tar_at_far {far: tar},
    roc_auc, num_pairs.
    """
    vset = target if isinstance(target, VerificationSet) else load_target(target)
    check_set(vset, cfg)
    embeddings = embed_set(backbone, vset, image_size, device, cfg.batch_size, cfg.flip)
    scores = pair_scores(embeddings)
    issame = np.asarray(vset.issame, dtype=bool)
    result = verification_metrics(scores, issame, cfg.fars, cfg.n_folds)
    if roc_path is not None:
        add_roc_png(result, scores, issame, roc_path, vset)
    return result


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


def run_evaluation(
    backbone: nn.Module,
    cfg: EvalConfig,
    device: torch.device | str,
    image_size: int,
    out_dir: str | Path,
    sets: dict[str, VerificationSet] | None = None,
    *,
    keep_going: bool = False,
) -> dict[str, dict]:
    """Evaluate on every target; writes ``roc_<name>.png`` and ``eval.json`` in ``out_dir``.

    With ``keep_going`` (training's final evaluation: a finished run must not fail because of
    it), a target that cannot be loaded or evaluated is logged and recorded as
    ``{"error": ..., "target": ...}`` and the other targets are still evaluated; without it
    the first failure raises. A ROC plot that fails is never fatal (``roc_png_error``).
    """
    from dist_cosface.data.shards import atomic_write_text

    out_dir = Path(out_dir)
    results: dict[str, dict] = {}
    if sets is None:
        sets = load_each_target(cfg, results) if keep_going else load_targets(cfg)
    for name, vset in sets.items():
        roc_path = out_dir / f"roc_{name}.png" if cfg.roc_png else None
        try:
            results[name] = evaluate(backbone, vset, cfg, device, image_size, roc_path)
        except Exception as exc:
            if not keep_going:
                raise
            results[name] = failure_entry(vset.source or name, exc)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "eval.json", json.dumps(results, indent=2))
    return results
