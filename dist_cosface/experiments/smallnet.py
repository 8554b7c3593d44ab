"""A small conv net for 32x32 faces: the CPU-budget stand-in for MobileFaceNet / iResNet.

Why not the project's backbones: the experiments train ~70 configurations x seeds on a shared
2-core CPU; MobileFaceNet at 48x48 costs ~10x the multiply-adds of this net per image. The
claims under test are about the loss head, which is the project's own ``ShardedClassifier``
in every run; the runner can still use ``build_backbone`` (``--backbone mobilefacenet``).
"""

from __future__ import annotations

import torch
from torch import nn


def _block(in_ch: int, out_ch: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_ch),
        nn.PReLU(out_ch),
        nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_ch),
        nn.PReLU(out_ch),
        nn.MaxPool2d(2),
    )


class SmallFaceNet(nn.Module):
    """``[B, 3, S, S]`` in [-1, 1] -> ``[B, embedding_size]``; three conv stages, S / 8 output."""

    def __init__(
        self, embedding_size: int, input_size: int = 32, width: int = 16, dropout: float = 0.2
    ) -> None:
        super().__init__()
        if input_size % 8:
            raise ValueError(f"input_size must be a multiple of 8, got {input_size}")
        self.features = nn.Sequential(
            _block(3, width), _block(width, 2 * width), _block(2 * width, 4 * width)
        )
        flat = 4 * width * (input_size // 8) ** 2
        # linear embedding + BN: the usual face-net neck (no ReLU, so features can be signed)
        self.neck = nn.Sequential(
            nn.Flatten(),
            nn.Dropout(dropout),
            nn.Linear(flat, embedding_size, bias=False),
            nn.BatchNorm1d(embedding_size),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.neck(self.features(x))
