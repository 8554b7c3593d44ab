"""MobileFaceNet (Chen et al., 2018): a ~1M-parameter backbone that is practical on CPUs.

Inverted-residual bottlenecks (1x1 expand -> 3x3 depthwise -> linear 1x1 project) with PReLU,
then a global depthwise conv (GDC) whose kernel covers the whole final feature map: unlike
average pooling it learns a different weight per spatial position, which matters for aligned
faces where the centre carries more identity information than the borders.
"""

from __future__ import annotations

import torch
from torch import nn

from dist_cosface.models.geometry import downsampled_size

# (expansion t, output channels c, repeats n, first stride s), as in the paper's Table 1.
BOTTLENECK_SETTINGS = (
    (2, 64, 5, 2),
    (4, 128, 1, 2),
    (2, 128, 6, 1),
    (4, 128, 1, 2),
    (2, 128, 2, 1),
)


def conv_bn(
    in_ch: int,
    out_ch: int,
    kernel: int,
    stride: int = 1,
    groups: int = 1,
    act: bool = True,
    padding: int | None = None,
) -> nn.Sequential:
    padding = kernel // 2 if padding is None else padding
    layers: list[nn.Module] = [
        nn.Conv2d(in_ch, out_ch, kernel, stride, padding, groups=groups, bias=False),
        nn.BatchNorm2d(out_ch),
    ]
    if act:
        layers.append(nn.PReLU(out_ch))
    return nn.Sequential(*layers)


class Bottleneck(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = in_ch * expansion
        self.use_residual = stride == 1 and in_ch == out_ch
        self.body = nn.Sequential(
            conv_bn(in_ch, hidden, 1),
            conv_bn(hidden, hidden, 3, stride, groups=hidden),
            conv_bn(hidden, out_ch, 1, act=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.body(x)
        return x + out if self.use_residual else out


class MobileFaceNet(nn.Module):
    def __init__(self, embedding_size: int = 128, input_size: int = 112, dropout: float = 0.0):
        super().__init__()
        layers: list[nn.Module] = [conv_bn(3, 64, 3, stride=2), conv_bn(64, 64, 3, groups=64)]
        in_ch = 64
        for expansion, out_ch, repeats, stride in BOTTLENECK_SETTINGS:
            for i in range(repeats):
                layers.append(Bottleneck(in_ch, out_ch, stride if i == 0 else 1, expansion))
                in_ch = out_ch
        layers.append(conv_bn(in_ch, 512, 1))
        self.features = nn.Sequential(*layers)
        # the stem and the three strided bottleneck groups halve the map 4 times
        final = downsampled_size(input_size, 4)
        # The GDC kernel covers the final map exactly (no padding), so its output is 1x1.
        self.gdc = conv_bn(512, 512, final, groups=512, act=False, padding=0)
        self.dropout = nn.Dropout(dropout)
        self.project = nn.Conv2d(512, embedding_size, 1, bias=False)
        self.bn = nn.BatchNorm1d(embedding_size)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.dropout(self.gdc(self.features(x)))
        return self.bn(torch.flatten(self.project(x), 1))
