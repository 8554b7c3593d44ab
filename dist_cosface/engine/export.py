"""Loading a trained backbone from a checkpoint for evaluation and export."""

from __future__ import annotations

from pathlib import Path

import torch

from dist_cosface.configtools import from_mapping
from dist_cosface.engine.checkpoint import find_latest_checkpoint, read_meta


def load_backbone(checkpoint_or_run_dir: str | Path) -> tuple[torch.nn.Module, int]:
    """(backbone in eval mode on CPU, input image size) from a checkpoint or a run folder.

    A run folder resolves to its latest complete checkpoint. The model config is read from
    the checkpoint's meta.json, so no run config is needed.
    """
    from dist_cosface.models import build_backbone
    from dist_cosface.models.config import ModelConfig

    ckpt = find_latest_checkpoint(checkpoint_or_run_dir)
    if ckpt is None:
        raise ValueError(f"no complete checkpoint found at {checkpoint_or_run_dir}")
    meta = read_meta(ckpt)
    backbone = build_backbone(from_mapping(ModelConfig, meta["model"], "meta.model"))
    state = torch.load(ckpt / "backbone.pt", map_location="cpu", weights_only=True)
    backbone.load_state_dict(state)
    return backbone.eval(), int(meta["image_size"])
