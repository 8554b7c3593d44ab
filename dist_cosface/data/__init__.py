"""Input pipeline: shard converters and the DALI / webdataset / synthetic training loaders."""

from __future__ import annotations

from dist_cosface.data.config import DataConfig
from dist_cosface.data.dali_loader import DaliLoader
from dist_cosface.data.protocol import TrainLoader
from dist_cosface.data.synthetic import SyntheticLoader
from dist_cosface.data.wds_loader import WebDatasetLoader
from dist_cosface.distributed import DistContext

__all__ = ["DataConfig", "TrainLoader", "build_loader"]


def build_loader(cfg: DataConfig, ctx: DistContext) -> TrainLoader:
    """The loader chosen by ``cfg.backend``; ``len()`` is equal on every rank."""
    if cfg.backend == "synthetic":
        return SyntheticLoader(cfg, ctx)
    if cfg.backend == "webdataset":
        return WebDatasetLoader(cfg, ctx)
    if cfg.backend == "dali":
        return DaliLoader(cfg, ctx)
    raise ValueError(f"data.backend={cfg.backend!r} is not one of dali, webdataset, synthetic")
