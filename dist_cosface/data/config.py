"""Config of the input pipeline (``data.*`` in YAML)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from dist_cosface.configtools import check_minimums

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

    def __post_init__(self) -> None:
        check_minimums(self, _MINIMUMS)
        if not 0.0 <= self.max_skip_fraction <= 1.0:  # also false for NaN
            raise ValueError(f"max_skip_fraction must be in [0, 1], got {self.max_skip_fraction}")
        if self.backend != "synthetic" and not self.path:
            raise ValueError(f"data.path is required for backend {self.backend!r}")
        if self.path.startswith("pipe:"):
            from dist_cosface.data.streams import pipe_argv

            pipe_argv(self.path)  # shell syntax fails at config load, not on the first read
