"""YouTube-Faces-style video verification: pairs of frame folders, mean-pooled embeddings.

The pair list is read by :mod:`dist_cosface.eval.ytf_pairs` (its two forms are described
there). Every frame is embedded (+ mirror image) and L2-normalised; a video's feature is the
L2-normalised mean of at most ``max_frames`` evenly spaced frames; a pair's score is the
cosine of its two videos. Accuracy: per fold, the threshold with the best accuracy on the
other folds (``roc.best_threshold``), applied to the fold; mean and std over folds.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from dist_cosface.agreement import run_agreed
from dist_cosface.eval.embedding import embed_images
from dist_cosface.eval.ranks import gather_rows, rank_slice
from dist_cosface.eval.roc import accuracy_at, best_threshold
from dist_cosface.eval.ytf_pairs import frame_refs, read_video_pairs


def video_features(frame_embeddings: torch.Tensor, owner: np.ndarray, num: int) -> torch.Tensor:
    emb = torch.nn.functional.normalize(frame_embeddings.double(), dim=1)
    index = torch.from_numpy(owner)
    sums = torch.zeros((num, emb.shape[1]), dtype=emb.dtype).index_add_(0, index, emb)
    return torch.nn.functional.normalize(sums, dim=1)  # the mean's direction


def fold_accuracy(scores: np.ndarray, issame: np.ndarray, folds: np.ndarray) -> dict:
    accuracies = []
    for fold in np.unique(folds):
        test = folds == fold
        threshold, _ = best_threshold(scores[~test], issame[~test])
        accuracies.append(accuracy_at(scores[test], issame[test], threshold))
    return {
        "accuracy": float(np.mean(accuracies)),
        "accuracy_std": float(np.std(accuracies)),
        "fold_accuracies": [float(a) for a in accuracies],
        "num_pairs": int(scores.size),
    }


def run_ytf(
    backbone: torch.nn.Module,
    pairs_path: str | Path,
    root: str | Path,
    image_size: int,
    device: torch.device | str,
    group: dist.ProcessGroup | None,
    *,
    batch_size: int = 64,
    flip: bool = True,
    max_frames: int = 100,
) -> dict:
    """Frames embedded over all ranks; same result on every rank."""
    pairs = run_agreed(lambda: read_video_pairs(pairs_path, root), group)
    refs, owner = run_agreed(lambda: frame_refs(pairs.videos, max_frames), group)
    start, stop = rank_slice(len(refs), group, batch_size)
    local = run_agreed(
        lambda: embed_images(backbone, refs[start:stop], image_size, device, batch_size, flip),
        group,
    )
    features = video_features(gather_rows(local, group), owner, len(pairs.videos))
    scores = (features[pairs.pairs[:, 0]] * features[pairs.pairs[:, 1]]).sum(1).numpy()
    result = fold_accuracy(scores, pairs.issame, pairs.folds)
    result["num_videos"] = len(pairs.videos)
    result["num_frames"] = len(refs)
    return result
