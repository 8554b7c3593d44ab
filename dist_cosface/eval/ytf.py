"""YouTube-Faces-style video verification: pairs of frame folders, mean-pooled embeddings.

Pair list (``PAIRS``), paths relative to the frames root, in either form:

* ``folder1 folder2 label`` (whitespace separated; label 1 same, 0 different), folds are 10
  contiguous blocks of the list;
* the YTF ``splits.txt`` CSV (header line, then ``split, pair, video1, video2, ..., is_same``):
  the first field is the fold, the two fields holding a ``/`` are the videos, the last field
  is the label.

Every frame is embedded (+ mirror image) and L2-normalised; a video's feature is the
L2-normalised mean of at most ``max_frames`` evenly spaced frames; a pair's score is the
cosine of its two videos. Accuracy: per fold, the threshold with the best accuracy on the
other folds (``metrics.best_threshold``), applied to the fold; mean and std over folds.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from dist_cosface.eval.images import ImageRef, read_lines
from dist_cosface.imageio import is_image_file


@dataclass
class VideoPairs:
    videos: list[Path]  # unique frame folders
    pairs: np.ndarray  # [P, 2] indices into videos
    issame: np.ndarray  # [P] bool
    folds: np.ndarray  # [P] fold id of each pair


def _parse_line(line: str, where: str) -> tuple[int | None, str, str, str]:
    if "," in line:
        fields = [f.strip() for f in line.split(",")]
        videos = [f for f in fields if "/" in f]
        if len(videos) != 2 or len(fields) < 4:
            raise ValueError(f"{where}: expected 'split, ..., video1, video2, ..., is_same'")
        try:
            split = int(fields[0])
        except ValueError as exc:
            raise ValueError(f"{where}: split {fields[0]!r} is not an integer") from exc
        return split, videos[0], videos[1], fields[-1]
    fields = line.split()
    if len(fields) != 3:
        raise ValueError(f"{where}: {len(fields)} fields, expected 'folder1 folder2 label'")
    return None, *fields


def read_video_pairs(pairs_path: str | Path, root: str | Path, n_folds: int = 10) -> VideoPairs:
    pairs_path, root = Path(pairs_path), Path(root)
    videos: dict[str, int] = {}
    pairs, labels, splits = [], [], []
    for lineno, line in enumerate(read_lines(pairs_path, "pair list"), start=1):
        if not line.strip() or (lineno == 1 and "split" in line.lower()):
            continue  # blank lines and the splits.txt header
        where = f"{pairs_path}:{lineno}"
        split, first, second, label = _parse_line(line, where)
        if splits and (split is None) != (splits[0] is None):
            raise ValueError(f"{where}: mixes the CSV and the 'folder1 folder2 label' forms")
        if label not in ("0", "1"):
            raise ValueError(f"{where}: label {label!r} is not 0 or 1")
        for video in (first, second):
            if video not in videos:
                if not (root / video).is_dir():
                    raise ValueError(f"{where}: frame folder {root / video} not found")
                videos[video] = len(videos)
        pairs.append((videos[first], videos[second]))
        labels.append(label == "1")
        splits.append(split)
    if len(pairs) < n_folds:
        raise ValueError(f"{pairs_path}: {len(pairs)} pairs, fewer than {n_folds} folds")
    if any(s is None for s in splits):
        folds = np.zeros(len(pairs), dtype=np.int64)
        for i, block in enumerate(np.array_split(np.arange(len(pairs)), n_folds)):
            folds[block] = i
    else:
        folds = np.array(splits, dtype=np.int64)
        if len(np.unique(folds)) < 2:  # each split's threshold is chosen on the others
            raise ValueError(
                f"{pairs_path}: every pair is in split {folds[0]}; cross-validation needs at "
                "least 2 splits (YTF's splits.txt has 10)"
            )
    return VideoPairs(
        [root / v for v in videos], np.array(pairs), np.array(labels, dtype=bool), folds
    )


def frame_refs(videos: list[Path], max_frames: int) -> tuple[list[ImageRef], np.ndarray]:
    """Frames of every video (at most ``max_frames``, evenly spaced) and their video index."""
    if max_frames < 1:
        raise ValueError(f"max_frames must be >= 1, got {max_frames}")
    refs, owner = [], []
    for i, folder in enumerate(videos):
        frames = sorted(p for p in folder.iterdir() if p.is_file() and is_image_file(p))
        if not frames:
            raise ValueError(f"{folder}: no frames")
        if len(frames) > max_frames:
            frames = [frames[j] for j in np.linspace(0, len(frames) - 1, max_frames).astype(int)]
        refs.extend(ImageRef(p) for p in frames)
        owner.extend([i] * len(frames))
    return refs, np.array(owner)


def video_features(frame_embeddings: torch.Tensor, owner: np.ndarray, num: int) -> torch.Tensor:
    emb = torch.nn.functional.normalize(frame_embeddings.double(), dim=1)
    index = torch.from_numpy(owner)
    sums = torch.zeros((num, emb.shape[1]), dtype=emb.dtype).index_add_(0, index, emb)
    return torch.nn.functional.normalize(sums, dim=1)  # the mean's direction


def fold_accuracy(scores: np.ndarray, issame: np.ndarray, folds: np.ndarray) -> dict:
    from dist_cosface.eval.metrics import accuracy_at, best_threshold

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
    from dist_cosface.eval.images import embed_images, rank_slice
    from dist_cosface.eval.ranks import gather_rows, run_agreed

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
