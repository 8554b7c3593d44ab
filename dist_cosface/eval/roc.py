"""Threshold statistics of pair similarity scores: best-threshold and k-fold accuracy,
TAR@FAR, the ROC curve, its area and its plot (numpy only, no torch; matplotlib for the plot).

A pair is predicted "same identity" when its score is strictly above the threshold.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _check(scores: np.ndarray, issame: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(scores, dtype=np.float64).ravel()
    issame = np.asarray(issame, dtype=bool).ravel()
    if scores.shape != issame.shape:
        raise ValueError(f"{scores.size} scores for {issame.size} labels")
    if scores.size == 0:
        raise ValueError("no pairs to evaluate")
    return scores, issame


def best_threshold(scores: np.ndarray, issame: np.ndarray) -> tuple[float, float]:
    """Threshold with the highest accuracy on these pairs, and that accuracy.

    Candidates are the midpoints between consecutive distinct scores plus one threshold
    above and one below all scores. Ties go to the highest threshold.
    """
    scores, issame = _check(scores, issame)
    order = np.argsort(-scores, kind="stable")
    s, y = scores[order], issame[order]
    num_neg = int((~y).sum())
    # correct[k] = accuracy count when the top k+1 scores are predicted "same".
    correct = np.cumsum(y) + (num_neg - np.cumsum(~y))
    cut_ok = np.append(s[:-1] > s[1:], True)  # only cut between distinct scores
    candidates = np.concatenate(([num_neg], np.where(cut_ok, correct, -1)))
    k = int(np.argmax(candidates))
    if k == 0:
        threshold = s[0] + 1.0
    elif k == len(s):
        threshold = s[-1] - 1.0
    else:
        threshold = (s[k - 1] + s[k]) / 2.0
    return float(threshold), float(candidates[k] / len(s))


def accuracy_at(scores: np.ndarray, issame: np.ndarray, threshold: float) -> float:
    scores, issame = _check(scores, issame)
    return float(np.mean((scores > threshold) == issame))


def kfold_accuracy(scores: np.ndarray, issame: np.ndarray, n_folds: int = 10) -> dict:
    """Accuracy on each of ``n_folds`` contiguous folds at the threshold chosen on the others.

    Returns mean and (population) std over folds and the mean chosen threshold, the protocol
    used for LFW-style benchmarks.
    """
    scores, issame = _check(scores, issame)
    if not 2 <= n_folds <= scores.size:
        raise ValueError(f"n_folds must be in [2, {scores.size}], got {n_folds}")
    folds = np.array_split(np.arange(scores.size), n_folds)
    accuracies, thresholds = [], []
    for test in folds:
        train = np.setdiff1d(np.arange(scores.size), test)
        threshold, _ = best_threshold(scores[train], issame[train])
        thresholds.append(threshold)
        accuracies.append(accuracy_at(scores[test], issame[test], threshold))
    return {
        "accuracy": float(np.mean(accuracies)),
        "accuracy_std": float(np.std(accuracies)),
        "best_threshold": float(np.mean(thresholds)),
        "fold_accuracies": [float(a) for a in accuracies],
    }


def tar_at_far(scores: np.ndarray, issame: np.ndarray, far: float) -> float:
    """True-accept rate at the lowest threshold whose false-accept rate is <= ``far``."""
    scores, issame = _check(scores, issame)
    if not 0.0 < far < 1.0:
        raise ValueError(f"far must be in (0, 1), got {far}")
    negatives = np.sort(scores[~issame])[::-1]
    positives = scores[issame]
    if negatives.size == 0 or positives.size == 0:
        raise ValueError("TAR@FAR needs both same and different pairs")
    # At threshold negatives[k], at most k negatives score strictly above it.
    threshold = negatives[int(np.floor(far * negatives.size))]
    return float(np.mean(positives > threshold))


def roc_curve(scores: np.ndarray, issame: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(false-accept rates, true-accept rates), from threshold +inf down to -inf."""
    scores, issame = _check(scores, issame)
    num_pos, num_neg = int(issame.sum()), int((~issame).sum())
    if num_pos == 0 or num_neg == 0:
        raise ValueError("a ROC curve needs both same and different pairs")
    order = np.argsort(-scores, kind="stable")
    s, y = scores[order], issame[order]
    last_of_tie = np.append(s[:-1] > s[1:], True)
    tpr = np.concatenate(([0.0], np.cumsum(y)[last_of_tie] / num_pos))
    fpr = np.concatenate(([0.0], np.cumsum(~y)[last_of_tie] / num_neg))
    return fpr, tpr


def roc_auc(scores: np.ndarray, issame: np.ndarray) -> float:
    fpr, tpr = roc_curve(scores, issame)
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2.0))


def verification_metrics(
    scores: np.ndarray, issame: np.ndarray, fars: list[float], n_folds: int = 10
) -> dict:
    scores, issame = _check(scores, issame)
    result = kfold_accuracy(scores, issame, n_folds)
    result["tar_at_far"] = {far: tar_at_far(scores, issame, far) for far in fars}
    result["roc_auc"] = roc_auc(scores, issame)
    result["num_pairs"] = int(scores.size)
    return result


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
