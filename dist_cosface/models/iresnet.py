"""iResNet backbones (improved residual networks as used for ArcFace/CosFace training).

Each residual unit is BN -> 3x3 conv -> BN -> PReLU -> 3x3 conv (strided) -> BN, with a 1x1
strided conv + BN shortcut when the shape changes. The head is BN -> dropout -> flatten ->
FC -> BN1d, which keeps spatial layout information that global pooling would throw away.
With ``activation_checkpointing`` each residual unit is recomputed in the backward pass
(models/checkpointing.py).
"""

from __future__ import annotations

import itertools

import torch
from torch import nn

from dist_cosface.models.checkpointing import run_blocks
from dist_cosface.models.geometry import downsampled_size

STAGE_CHANNELS = (64, 128, 256, 512)
DEPTH_LAYERS = {
    18: (2, 2, 2, 2),
    34: (3, 4, 6, 3),
    50: (3, 4, 14, 3),
    100: (3, 13, 30, 3),
    200: (6, 26, 60, 6),  # insightface arcface_torch's iresnet200
}


def conv3x3(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)


class IBasicBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_ch, eps=1e-5)
        self.conv1 = conv3x3(in_ch, out_ch)
        self.bn2 = nn.BatchNorm2d(out_ch, eps=1e-5)
        self.prelu = nn.PReLU(out_ch)
        self.conv2 = conv3x3(out_ch, out_ch, stride)
        self.bn3 = nn.BatchNorm2d(out_ch, eps=1e-5)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_ch, eps=1e-5),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(self.bn1(x))
        out = self.conv2(self.prelu(self.bn2(out)))
        return self.bn3(out) + self.shortcut(x)


class IResNet(nn.Module):
    def __init__(
        self,
        layers: tuple[int, ...],
        embedding_size: int = 512,
        input_size: int = 112,
        dropout: float = 0.0,
        activation_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        self.activation_checkpointing = activation_checkpointing
        self.stem = nn.Sequential(
            conv3x3(3, STAGE_CHANNELS[0]), nn.BatchNorm2d(STAGE_CHANNELS[0]), nn.PReLU(64)
        )
        stages = []
        in_ch = STAGE_CHANNELS[0]
        for num_blocks, out_ch in zip(layers, STAGE_CHANNELS):
            blocks = [IBasicBlock(in_ch, out_ch, stride=2)]
            blocks += [IBasicBlock(out_ch, out_ch, stride=1) for _ in range(num_blocks - 1)]
            stages.append(nn.Sequential(*blocks))
            in_ch = out_ch
        self.stages = nn.Sequential(*stages)
        final = downsampled_size(input_size, len(layers))
        self.bn = nn.BatchNorm2d(in_ch, eps=1e-5)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(in_ch * final * final, embedding_size)
        self.features = nn.BatchNorm1d(embedding_size, eps=1e-5)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0, 0.1)
            elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        # Zero the last BN of every residual branch so each block starts as the identity;
        # this keeps the deep (100-layer) variant trainable at the usual learning rates.
        for m in self.modules():
            if isinstance(m, IBasicBlock):
                nn.init.zeros_(m.bn3.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        blocks = itertools.chain.from_iterable(self.stages)
        x = run_blocks(blocks, self.stem(x), self.activation_checkpointing and self.training)
        x = self.dropout(self.bn(x))
        return self.features(self.fc(torch.flatten(x, 1)))


def iresnet(
    depth: int,
    embedding_size: int,
    input_size: int,
    dropout: float,
    activation_checkpointing: bool = False,
) -> IResNet:
    if depth not in DEPTH_LAYERS:
        raise ValueError(f"iresnet depth must be one of {sorted(DEPTH_LAYERS)}, got {depth}")
    layers = DEPTH_LAYERS[depth]
    return IResNet(layers, embedding_size, input_size, dropout, activation_checkpointing)
