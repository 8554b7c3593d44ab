"""Building the parts of a run: data, backbone (DDP or DeepSpeed), classifier, optimizers."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from dist_cosface.distributed import DistContext
from dist_cosface.engine.amp import ShardedLossScaler
from dist_cosface.engine.optim import build_backbone_optimizer


@dataclass
class Parts:
    loader: Any
    backbone: torch.nn.Module  # the plain module (what checkpoints and eval see)
    model: Any  # what the loop calls: the module, its DDP wrapper or the DeepSpeed engine
    head: torch.nn.Module
    head_optim: torch.optim.Optimizer
    backbone_optim: torch.optim.Optimizer | None  # None under DeepSpeed (it owns the state)
    ds_engine: Any = None
    scaler: ShardedLossScaler = field(default_factory=lambda: ShardedLossScaler(False))

    def optimizers(self) -> list[torch.optim.Optimizer]:
        backbone = self.ds_engine.optimizer if self.ds_engine is not None else self.backbone_optim
        return [backbone, self.head_optim]

    def params(self) -> list[torch.nn.Parameter]:
        return list(self.backbone.parameters()) + list(self.head.parameters())


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def check_config(cfg) -> None:
    if cfg.data.image_size != cfg.model.input_size:
        raise ValueError(
            f"data.image_size={cfg.data.image_size} differs from "
            f"model.input_size={cfg.model.input_size}"
        )


def describe_loader(data_cfg, loader) -> str:
    """One line telling the user which loader feeds the run (DALI / webdataset / synthetic)."""
    text = type(loader).__name__
    decode = getattr(loader, "decode_device", None)  # DALI: "cpu" or "mixed" (nvJPEG)
    if decode is not None:
        text += f" ({decode} decoding)"
    if data_cfg.backend != "synthetic":
        text += f" from {data_cfg.path}"
    return f"{text}, {len(loader)} batches of {data_cfg.batch_size} per rank per epoch"


def build_parts(cfg, ctx: DistContext, backbone=None, loader=None) -> Parts:
    from dist_cosface.classifier import ShardedClassifier, build_classifier_optimizer
    from dist_cosface.data import build_loader
    from dist_cosface.models import build_backbone

    loader = loader if loader is not None else build_loader(cfg.data, ctx)
    if loader.num_classes != cfg.classifier.num_classes:
        raise ValueError(
            f"classifier.num_classes={cfg.classifier.num_classes} but the data "
            f"has {loader.num_classes} classes"
        )
    seed_everything(cfg.train.seed)  # identical backbone init on every rank
    backbone = backbone if backbone is not None else build_backbone(cfg.model)
    backbone = backbone.to(ctx.device)
    head = ShardedClassifier.from_config(
        cfg.classifier, cfg.model.embedding_size, process_group=ctx.group
    ).to(ctx.device)
    # the full matrix depends only on the seed, not on the number of ranks
    head.reset_parameters(seed=cfg.train.seed)
    head.time_collectives = cfg.train.time_collectives
    o = cfg.optim
    head_optim = build_classifier_optimizer(
        head,
        o.name,
        lr=o.lr,
        momentum=o.momentum,
        weight_decay=o.weight_decay,
        betas=tuple(o.betas),
    )
    backbone_optim = build_backbone_optimizer(backbone.parameters(), o)
    parts = Parts(
        loader=loader,
        backbone=backbone,
        model=backbone,
        head=head,
        head_optim=head_optim,
        backbone_optim=backbone_optim,
        scaler=ShardedLossScaler(cfg.train.precision == "fp16"),
    )
    if cfg.train.engine == "deepspeed":
        from dist_cosface.engine.ds import build_deepspeed_engine

        parts.ds_engine = build_deepspeed_engine(backbone, backbone_optim, cfg, ctx)
        parts.model, parts.backbone_optim = parts.ds_engine, None
        parts.backbone = parts.ds_engine.module
    elif ctx.is_distributed:
        device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        # Only the backbone is wrapped: the classifier's rows are sharded, never averaged.
        parts.model = DistributedDataParallel(
            backbone, device_ids=device_ids, process_group=ctx.group
        )
    seed_everything(cfg.train.seed + 7919 * (ctx.rank + 1))  # per-rank dropout/augment streams
    return parts
