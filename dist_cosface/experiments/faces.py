"""Face folders decoded once into one uint8 tensor, a fixed identity split, verification pairs.

Layout: ``<root>/<identity>/<image>`` (any format ``dist_cosface.imageio`` lists, grey or
colour). Images are converted to grey, resized to ``size x size`` and kept in memory, so
every configuration in a process trains from the same cache without touching the disk again.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dist_cosface.imageio import IMAGE_EXTENSIONS, decode_image, is_image_file, to_uint8


@dataclass
class FaceSet:
    images: torch.Tensor  # [N, 1, S, S] uint8
    labels: torch.Tensor  # [N] int64, index into ``identities``
    identities: list[str]

    def subset(self, identity_names: list[str], max_per_identity: int | None = None) -> FaceSet:
        """Images of ``identity_names`` only, relabelled 0..len-1 in the given order."""
        index = {self.identities.index(name): i for i, name in enumerate(identity_names)}
        keep, new_labels, seen = [], [], {}
        for n, label in enumerate(self.labels.tolist()):
            if label in index and seen.get(label, 0) < (max_per_identity or 1 << 30):
                seen[label] = seen.get(label, 0) + 1
                keep.append(n)
                new_labels.append(index[label])
        return FaceSet(self.images[keep], torch.tensor(new_labels), list(identity_names))


def _natural_key(name: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def load_faces(root: str | Path, size: int) -> FaceSet:
    """Decode every image under ``root/<identity>/`` to grey ``size x size`` uint8."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"face folder not found: {root}")
    identities = sorted((p.name for p in root.iterdir() if p.is_dir()), key=_natural_key)
    images, labels = [], []
    for label, name in enumerate(identities):
        files = sorted(f for f in (root / name).iterdir() if is_image_file(f))
        for path in files:
            images.append(to_uint8(decode_image(path.read_bytes(), str(path), mode="L"), size)[0])
            labels.append(label)
    if not images:
        raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {root}/<identity>/")
    return FaceSet(torch.stack(images)[:, None], torch.tensor(labels), identities)


def identity_split(identities: list[str], split: str) -> tuple[list[str], list[str]]:
    """(train, evaluation) identities of the fixed open-set protocol.

    ``split="test"``: every 4th identity in natural sort order (positions 3, 7, 11, ...) is
    held out for evaluation and never trained on. ``split="val"``: the same rule applied to
    the TRAINING identities only, for choosing hyper-parameters without seeing test ids.
    """
    if split not in ("test", "val"):
        raise ValueError(f"split must be 'test' or 'val', got {split!r}")
    train = [n for i, n in enumerate(identities) if i % 4 != 3]
    held = [n for i, n in enumerate(identities) if i % 4 == 3]
    if split == "val":
        held = [n for i, n in enumerate(train) if i % 4 == 3]
        train = [n for i, n in enumerate(train) if i % 4 != 3]
    return train, held


def make_pairs(
    labels: torch.Tensor, max_pairs: int, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Balanced verification pairs ``(index pairs [P, 2], issame [P])`` in shuffled order.

    All positive pairs if there are at most ``max_pairs // 2`` of them (else a random subset),
    and as many random negative pairs; the order is shuffled so that the contiguous folds of
    10-fold accuracy each mix identities.
    """
    rng = np.random.default_rng(seed)
    y = labels.numpy()
    i, j = np.triu_indices(len(y), k=1)
    same = y[i] == y[j]
    pos = np.flatnonzero(same)
    neg = np.flatnonzero(~same)
    n = min(len(pos), len(neg), max_pairs // 2)
    if n < 10:
        raise ValueError(f"only {n} positive/negative pairs; need at least 10 of each")
    chosen = np.concatenate([rng.choice(pos, n, replace=False), rng.choice(neg, n, replace=False)])
    rng.shuffle(chosen)
    return np.stack([i[chosen], j[chosen]], axis=1), same[chosen]
