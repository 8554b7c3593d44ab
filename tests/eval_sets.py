"""Helpers of the identification/IJB tests: the shared face data and a fixed pixel embedder.

The benchmark-format sets are built from ``../shared/data/yaleb`` by reference (file lists,
symlinks), never by copying images into the repository.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from torch import nn

REPO = Path(__file__).resolve().parents[1]


def yaleb() -> Path:
    """The Extended Yale B folder, or skip (``DIST_COSFACE_SHARED_DATA`` overrides the root)."""
    root = Path(os.environ.get("DIST_COSFACE_SHARED_DATA", REPO / "../shared/data"))
    folder = root / "yaleb"
    if not folder.is_dir():
        pytest.skip(f"{folder} absent: the shared face data is expected beside the repo clone")
    return folder


def pixel_backbone() -> nn.Module:
    """A parameter-free embedder (8x8 average-pooled pixels): deterministic on every rank."""
    return nn.Sequential(nn.AdaptiveAvgPool2d(8), nn.Flatten())


def numpy_normalize(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def numpy_tar_at_far(genuine: np.ndarray, impostor: np.ndarray, far: float) -> float:
    """Brute force: try every impostor score as threshold, keep the lowest with FAR <= far."""
    best = np.inf
    for t in np.unique(impostor):
        if np.mean(impostor > t) <= far:
            best = min(best, t)
    return float(np.mean(genuine > best))
