"""Config of the input pipeline (``data.*`` in YAML)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from dist_cosface.configtools import check_minimums
from dist_cosface.data.locations import pipe_argv

_MINIMUMS = {
    "batch_size": 1,
    "image_size": 16,
    "num_workers": 0,
    "shuffle_buffer": 1,
    "dali_prefetch": 1,
    "synthetic_num_classes": 2,
    "synthetic_samples_per_class": 1,
    "synthetic_noise": 0,
}


# each range's bounds: (lowest, highest, whether the lowest itself is allowed)
_RANGES = {
    "crop_scale": (0.0, 1.0, False),
    "crop_ratio": (0.0, math.inf, False),
    "low_res_scale": (0.0, 1.0, False),
    "blur_sigma": (0.0, math.inf, False),
    "brightness": (0.0, math.inf, False),
    "contrast": (0.0, math.inf, False),
    "saturation": (0.0, math.inf, True),
}


@dataclass
class AugmentConfig:
    """``data.augment.*``: face augmentations, each drawn per sample with its probability.

    All probabilities are 0 by default (off). The same parameters give the same transforms on
    the dali and webdataset backends (``data/augment.py``; docs/data.md, Augmentation).
    """

    # random resized crop: keep a box of `crop_scale` of the image's area with aspect
    # (width / height, relative to the image's) log-uniform in `crop_ratio`, resized to S x S
    crop_prob: float = 0.0
    crop_scale: tuple[float, float] = (0.2, 1.0)
    crop_ratio: tuple[float, float] = (0.75, 4 / 3)
    # low resolution: down to a side of `low_res_scale` x S pixels, then back up to S
    low_res_prob: float = 0.0
    low_res_scale: tuple[float, float] = (0.2, 1.0)
    # Gaussian blur, sigma in output pixels (window 2 * ceil(3 sigma) + 1)
    blur_prob: float = 0.0
    blur_sigma: tuple[float, float] = (0.5, 1.5)
    grayscale_prob: float = 0.0
    # colour jitter: brightness, contrast (about mid-grey) and saturation factors, each
    # uniform in its range, applied in that order
    jitter_prob: float = 0.0
    brightness: tuple[float, float] = (0.5, 1.5)
    contrast: tuple[float, float] = (0.5, 1.5)
    saturation: tuple[float, float] = (0.5, 1.5)

    def __post_init__(self) -> None:
        for name in ("crop_prob", "low_res_prob", "blur_prob", "grayscale_prob", "jitter_prob"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:  # also false for NaN
                raise ValueError(f"{name} must be a probability in [0, 1], got {value}")
        for name, (lowest, highest, closed) in _RANGES.items():
            value = getattr(self, name)
            if len(value) != 2:
                raise ValueError(f"{name} must be a range [low, high], got {list(value)}")
            low, high = value
            above = low >= lowest if closed else low > lowest
            if not (above and low <= high <= highest):  # also false for NaN
                left, right = "[" if closed else "(", ")" if math.isinf(highest) else "]"
                bounds = f"{left}{lowest:g}, {highest:g}{right}"
                raise ValueError(
                    f"{name} must be a range [low, high] with low <= high inside {bounds}, "
                    f"got {list(value)}"
                )
            setattr(self, name, (float(low), float(high)))

    @property
    def active(self) -> bool:
        """Whether any augmentation can be drawn (else the loaders run without them)."""
        probs = (self.crop_prob, self.low_res_prob, self.blur_prob, self.grayscale_prob)
        return any(p > 0 for p in probs + (self.jitter_prob,))


@dataclass
class DataConfig:
    backend: Literal["dali", "webdataset", "synthetic"] = "synthetic"
    # dali/webdataset: shard folder holding manifest.json, the manifest's path, or a URL /
    # ``pipe:`` command that prints the manifest (webdataset only; shards are fetched the same way)
    path: str = ""
    batch_size: int = 128  # per rank
    image_size: int = 112
    num_workers: int = 2  # webdataset: DataLoader workers; dali: decoding threads
    seed: int = 0
    shuffle_buffer: int = 2048
    random_flip: bool = True
    output_dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    on_bad_sample: Literal["skip", "stop"] = "skip"
    # skip mode: stop the run when more than this share of an epoch's samples (the manifest's
    # count) is lost to bad shards or samples (1 = never); every loss is logged and counted
    max_skip_fraction: float = 0.01
    # dali: where images are decoded; auto = "mixed" (nvJPEG) on a CUDA device, else "cpu"
    dali_device: Literal["auto", "cpu", "mixed"] = "auto"
    dali_prefetch: int = 2
    # synthetic backend: learnable generated identities, no files needed
    synthetic_num_classes: int = 64
    synthetic_samples_per_class: int = 32
    synthetic_noise: float = 0.35
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def __post_init__(self) -> None:
        check_minimums(self, _MINIMUMS)
        if not 0.0 <= self.max_skip_fraction <= 1.0:  # also false for NaN
            raise ValueError(f"max_skip_fraction must be in [0, 1], got {self.max_skip_fraction}")
        if self.backend != "synthetic" and not self.path:
            raise ValueError(f"data.path is required for backend {self.backend!r}")
        if self.augment.active:
            self._check_augment()
        if self.path.startswith("pipe:"):
            pipe_argv(self.path)  # shell syntax fails at config load, not on the first read

    def _check_augment(self) -> None:
        if self.backend == "synthetic":
            raise ValueError(
                "augment.*_prob > 0 needs backend dali or webdataset (synthetic does not augment)"
            )
        # the blur window must fit inside the image (reflected borders, both loaders alike)
        radius = math.ceil(3 * self.augment.blur_sigma[1])
        if self.augment.blur_prob > 0 and radius >= self.image_size:
            raise ValueError(
                f"augment.blur_sigma up to {self.augment.blur_sigma[1]} needs a window radius of "
                f"{radius} px, not below image_size={self.image_size}"
            )
