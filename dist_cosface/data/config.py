"""Config of the input pipeline (``data.*`` in YAML)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass
class DataConfig:
    backend: Literal["dali", "webdataset", "synthetic"] = "synthetic"
    path: str = ""  # shard folder holding manifest.json (dali/webdataset), or URL pattern
    batch_size: int = 128  # per rank
    image_size: int = 112
    num_workers: int = 2
    seed: int = 0
    shuffle_buffer: int = 2048
    random_flip: bool = True
    output_dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    on_bad_sample: Literal["skip", "stop"] = "skip"
    # synthetic backend: learnable generated identities, no files needed
    synthetic_num_classes: int = 64
    synthetic_samples_per_class: int = 32
    synthetic_noise: float = 0.35

    def validate(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.image_size < 16:
            raise ValueError(f"image_size must be >= 16, got {self.image_size}")
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {self.num_workers}")
        if self.backend != "synthetic" and not self.path:
            raise ValueError(f"data.path is required for backend {self.backend!r}")
