"""YouTube-Faces-style pair lists and the frames of their videos.

Pair list (``PAIRS``), paths relative to the frames root, in either form:

* ``folder1 folder2 label`` (whitespace separated; label 1 same, 0 different), folds are 10
  contiguous blocks of the list;
* the YTF ``splits.txt`` CSV (header line, then ``split, pair, video1, video2, ..., is_same``):
  the first field is the fold, the two fields holding a ``/`` are the videos, the last field
  is the label.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

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
