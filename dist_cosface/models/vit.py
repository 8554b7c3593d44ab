"""Vision Transformers for aligned faces, in the shapes of insightface arcface_torch's ViTs.

The image is cut into non-overlapping 9x9 patches (112 px -> a 12 x 12 grid of 144 tokens;
the last 4 pixel rows and columns fall outside the grid), each projected to ``width`` and
given a learnt absolute position embedding; there is no class token. Pre-norm blocks follow:
``x + DropPath(Attention(LN(x)))``, then ``x + DropPath(MLP(LN(x)))`` with a 4x-wide ReLU6 MLP,
the stochastic-depth rate rising linearly from 0 at the first block to ``drop_path_rate`` at
the last. After a final LayerNorm the head flattens all tokens, keeping where each patch sits
(as the iResNet head keeps its 7x7 map), and maps them FC -> BN1d -> FC -> BN1d to the
embedding.

Token masking (``mask_ratio``, training only): each sample drops a random share of its patch
tokens before the blocks, which then run on fewer tokens, and the dropped places are filled
with one learnt mask token after the final LayerNorm, so the head sees every position.

Attention is ``F.scaled_dot_product_attention`` (flash / memory-efficient kernels on GPU).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dist_cosface.models.checkpointing import run_blocks
from dist_cosface.models.config import (
    VIT_PATCH_SIZE,
    VIT_SHAPES,
    ModelConfig,
    ViTShape,
    kept_tokens,
)

MLP_RATIO = 4
HEAD_BN_EPS = 2e-5


class DropPath(nn.Module):
    """Stochastic depth: in training, zero a residual branch for a random subset of the
    samples (each with probability ``rate``) and scale the kept ones by ``1 / (1 - rate)``."""

    def __init__(self, rate: float) -> None:
        super().__init__()
        self.rate = rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.rate == 0.0:
            return x
        keep = 1.0 - self.rate
        shape = (x.shape[0],) + (1,) * (x.dim() - 1)
        mask = torch.empty(shape, dtype=x.dtype, device=x.device).bernoulli_(keep)
        return x * (mask / keep)

    def extra_repr(self) -> str:
        return f"rate={self.rate:.4f}"


class SelfAttention(nn.Module):
    """Multi-head self-attention ``[B, N, D] -> [B, N, D]``; q/k/v without bias."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"ViT width {width} is not divisible by {heads} heads")
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width, bias=False)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, width = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.heads, width // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, heads, N, D / heads]
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, width))


class TransformerBlock(nn.Module):
    def __init__(self, width: int, heads: int, drop_path: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = SelfAttention(width, heads)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            nn.Linear(width, MLP_RATIO * width),
            nn.ReLU6(),
            nn.Linear(MLP_RATIO * width, width),
        )
        # one module, two calls: each branch draws its own samples
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class VisionTransformer(nn.Module):
    def __init__(
        self,
        shape: ViTShape,
        embedding_size: int = 512,
        input_size: int = 112,
        dropout: float = 0.0,
        drop_path_rate: float = 0.0,
        mask_ratio: float = 0.0,
        activation_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        grid = input_size // VIT_PATCH_SIZE
        if grid < 1:
            raise ValueError(f"input_size {input_size} is smaller than one {VIT_PATCH_SIZE} patch")
        width, depth = shape.width, shape.depth
        self.num_tokens = grid * grid
        self.kept_tokens = kept_tokens(self.num_tokens, mask_ratio)
        self.activation_checkpointing = activation_checkpointing
        self.patch_embed = nn.Conv2d(3, width, VIT_PATCH_SIZE, stride=VIT_PATCH_SIZE)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_tokens, width))
        # Only a masking model has a mask token: an unused parameter would have no gradient,
        # which DDP treats as an error.
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width)) if mask_ratio > 0 else None
        rates = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.ModuleList(TransformerBlock(width, shape.heads, r) for r in rates)
        self.norm = nn.LayerNorm(width)
        self.dropout = nn.Dropout(dropout)
        self.feature = nn.Sequential(
            nn.Linear(self.num_tokens * width, width, bias=False),
            nn.BatchNorm1d(width, eps=HEAD_BN_EPS),
            nn.Linear(width, embedding_size, bias=False),
            nn.BatchNorm1d(embedding_size, eps=HEAD_BN_EPS),
        )
        self._init_weights()

    def _init_weights(self) -> None:
        # N(0, 0.02) for the linear layers and the position embedding, as ViTs usually start.
        # (They often call a truncated normal cut at +-2, which at std 0.02 is 100 sigma: the
        # same distribution, but torch's trunc_normal_ takes seconds for a large model.)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.normal_(self.pos_embed, std=0.02)
        if self.mask_token is not None:
            nn.init.normal_(self.mask_token, std=0.02)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(images).flatten(2).transpose(1, 2) + self.pos_embed
        masking = self.training and self.mask_token is not None
        if masking:
            x, kept = self._keep_random_tokens(x)
        x = run_blocks(self.blocks, x, self.activation_checkpointing and self.training)
        x = self.norm(x)
        if masking:
            x = self._fill_masked_tokens(x, kept)
        return self.feature(self.dropout(x.flatten(1)))

    def _keep_random_tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A random ``kept_tokens``-subset of each sample's tokens, and their positions."""
        batch, tokens, width = x.shape
        order = torch.rand(batch, tokens, device=x.device).argsort(dim=1)
        kept = order[:, : self.kept_tokens]
        return x.gather(1, kept.unsqueeze(-1).expand(-1, -1, width)), kept

    def _fill_masked_tokens(self, x: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
        """Kept tokens back at their positions; the mask token everywhere else."""
        batch, _, width = x.shape
        full = self.mask_token.to(x.dtype).expand(batch, self.num_tokens, width)
        return full.scatter(1, kept.unsqueeze(-1).expand(-1, -1, width), x)


def vision_transformer(cfg: ModelConfig) -> VisionTransformer:
    """The ViT named by ``cfg.name`` (``VIT_SHAPES``), nulls taking that size's defaults."""
    drop_path_rate, mask_ratio = cfg.vit_rates()
    return VisionTransformer(
        VIT_SHAPES[cfg.name],
        embedding_size=cfg.embedding_size,
        input_size=cfg.input_size,
        dropout=cfg.dropout,
        drop_path_rate=drop_path_rate,
        mask_ratio=mask_ratio,
        activation_checkpointing=cfg.activation_checkpointing,
    )
