"""Building the parts of a run from its config: data, classifier, backbone optimizer, seeds."""

from __future__ import annotations

import random
from collections.abc import Iterable
from typing import TYPE_CHECKING

import numpy as np
import torch

from dist_cosface.classifier import ShardedClassifier, build_classifier_optimizer
from dist_cosface.data import build_loader
from dist_cosface.data.config import DataConfig
from dist_cosface.data.protocol import TrainLoader, check_train_loader
from dist_cosface.distributed import DistContext
from dist_cosface.engine.config import OptimConfig

if TYPE_CHECKING:
    from dist_cosface.config import RunConfig


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def check_config(cfg: RunConfig) -> None:
    if cfg.data.image_size != cfg.model.input_size:
        raise ValueError(
            f"data.image_size={cfg.data.image_size} differs from "
            f"model.input_size={cfg.model.input_size}"
        )


def describe_loader(data_cfg: DataConfig, loader: TrainLoader) -> str:
    """One line telling the user which loader feeds the run (DALI / webdataset / synthetic)."""
    text = type(loader).__name__
    decode = getattr(loader, "decode_device", None)  # DALI only: "cpu" or "mixed" (nvJPEG)
    if decode is not None:
        text += f" ({decode} decoding)"
    if data_cfg.backend != "synthetic":
        text += f" from {data_cfg.path}"
    return f"{text}, {len(loader)} batches of {data_cfg.batch_size} per rank per epoch"


def build_checked_loader(
    cfg: RunConfig, ctx: DistContext, loader: TrainLoader | None
) -> TrainLoader:
    """The given loader or the configured one: a TrainLoader with the classifier's classes."""
    loader = loader if loader is not None else build_loader(cfg.data, ctx)
    check_train_loader(loader)
    if loader.num_classes != cfg.classifier.num_classes:
        raise ValueError(
            f"classifier.num_classes={cfg.classifier.num_classes} but the data "
            f"has {loader.num_classes} classes"
        )
    return loader


def build_head_and_optimizer(
    cfg: RunConfig, ctx: DistContext
) -> tuple[ShardedClassifier, torch.optim.Optimizer]:
    """The sharded classifier (rows seeded by ``train.seed``) and its row optimizer."""
    head = ShardedClassifier(
        cfg.classifier,
        cfg.model.embedding_size,
        ctx.group,
        time_collectives=cfg.train.time_collectives,
    ).to(ctx.device)
    # the full matrix depends only on the seed, not on the number of ranks
    head.reset_parameters(seed=cfg.train.seed)
    o = cfg.optim
    head_optim = build_classifier_optimizer(
        head,
        o.name,
        lr=o.lr,
        momentum=o.momentum,
        weight_decay=o.weight_decay,
        betas=tuple(o.betas),
    )
    return head, head_optim


def build_backbone_optimizer(
    params: Iterable[torch.nn.Parameter], cfg: OptimConfig
) -> torch.optim.Optimizer:
    params = list(params)
    if cfg.name == "sgd":
        return torch.optim.SGD(
            params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )
    return torch.optim.AdamW(
        params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay
    )
