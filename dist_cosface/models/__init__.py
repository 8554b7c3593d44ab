"""Face-recognition backbones: ``[B, 3, S, S]`` images in [-1, 1] -> ``[B, embedding_size]``.

This package imports nothing from torch.distributed: backbones are plain modules that the
engine wraps for data parallelism.
"""

from __future__ import annotations

from torch import nn

from dist_cosface.models.config import VIT_SHAPES, ModelConfig
from dist_cosface.models.iresnet import IResNet, iresnet
from dist_cosface.models.mobilefacenet import MobileFaceNet
from dist_cosface.models.profile import count_macs, count_parameters
from dist_cosface.models.vit import VisionTransformer, vision_transformer

__all__ = [
    "IResNet",
    "MobileFaceNet",
    "ModelConfig",
    "VisionTransformer",
    "build_backbone",
    "count_macs",
    "count_parameters",
]


def build_backbone(cfg: ModelConfig) -> nn.Module:
    """Build the backbone named by ``cfg.name`` for square inputs of ``cfg.input_size``."""
    if not isinstance(cfg, ModelConfig):
        raise TypeError(f"build_backbone expects a ModelConfig, got {type(cfg).__name__}")
    if cfg.name.startswith("iresnet"):
        depth = int(cfg.name.removeprefix("iresnet"))
        return iresnet(
            depth, cfg.embedding_size, cfg.input_size, cfg.dropout, cfg.activation_checkpointing
        )
    if cfg.name == "mobilefacenet":
        return MobileFaceNet(cfg.embedding_size, cfg.input_size, cfg.dropout)
    if cfg.name in VIT_SHAPES:
        return vision_transformer(cfg)
    raise ValueError(f"model.name: unknown backbone {cfg.name!r}")
