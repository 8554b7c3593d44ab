"""Settings of ``dist-cosface clean`` (thresholds, what to remove, how to read and search)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from dist_cosface.configtools import check_minimums

# Sub-center ArcFace (Deng et al., ECCV 2020, section 3.3) drops the samples whose angle to
# their class's dominant sub-center exceeds 75 degrees once the model is discriminative.
SUBCENTER_ARCFACE_ANGLE = 75.0

_MINIMUMS = {"batch_size": 1, "num_workers": 0, "search_k": 1, "chunk_size": 1, "shard_size": 0}


@dataclass
class CleanConfig:
    # a sample is label noise when its angle (degrees) to its class center exceeds this
    max_angle: float = SUBCENTER_ARCFACE_ANGLE
    # a class is flagged when its dominant sub-center holds less than this share of its samples
    # (only meaningful with sub-centers: with one center per class the share is 1)
    min_dominant_share: float = 0.5
    # two classes are one identity when their centers' cosine exceeds this (a margin head
    # pushes even one person's two classes apart: planted splits scored 0.3 to 0.6, other
    # pairs below 0.4; docs/cleaning.md)
    duplicate_cos: float = 0.4
    # an evaluation identity is in the training set when its mean embedding's cosine with a
    # training class center exceeds this (docs/cleaning.md)
    overlap_cos: float = 0.7
    drop_noisy: bool = True  # drop the flagged samples from the new shard set
    merge_duplicates: bool = True  # relabel every merge set to one class
    remove_overlap: bool = True  # remove the training classes that match evaluation identities
    drop_low_share: bool = False  # drop the classes whose dominant share is too low
    backend: Literal["auto", "webdataset", "dali"] = "auto"  # auto: dali when it imports
    batch_size: int = 128  # images embedded at once
    num_workers: int = 2  # webdataset: DataLoader workers; dali: decoding threads
    flip: bool = False  # embed image + mirror image (as `dist-cosface eval` does)
    device: Literal["auto", "cpu", "cuda"] = "auto"  # where one process alone embeds
    search_k: int = 8  # first neighbours kept per center; doubled where all are above threshold
    chunk_size: int = 65536  # center rows scored at once
    search_dtype: Literal["float32", "float64"] = "float32"  # dtype of the center scores
    shard_size: int = 0  # samples per new shard (0: the source set's largest shard)

    def __post_init__(self) -> None:
        check_minimums(self, _MINIMUMS)
        if not 0.0 <= self.max_angle <= 180.0:  # also false for NaN
            raise ValueError(f"max_angle must be in [0, 180] degrees, got {self.max_angle}")
        if not 0.0 <= self.min_dominant_share <= 1.0:
            raise ValueError(f"min_dominant_share must be in [0, 1], got {self.min_dominant_share}")
        for key in ("duplicate_cos", "overlap_cos"):
            value = getattr(self, key)
            if not -1.0 <= value < 1.0 or math.isnan(value):
                raise ValueError(f"{key} must be in [-1, 1), got {value}")
