"""Config of the backbone (``model.*`` in YAML), and the ViT shapes it names."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from dist_cosface.configtools import check_minimums

BackboneName = Literal[
    "iresnet18",
    "iresnet34",
    "iresnet50",
    "iresnet100",
    "iresnet200",
    "mobilefacenet",
    "vit_t",
    "vit_s",
    "vit_b",
    "vit_l",
]


@dataclass(frozen=True)
class ViTShape:
    """One ViT size: token width, number of blocks, attention heads, and the stochastic-depth
    rate and token-mask ratio its arcface_torch namesake trains with by default."""

    width: int
    depth: int
    heads: int
    drop_path_rate: float
    mask_ratio: float


# insightface arcface_torch's get_model(): 9x9 patches, 8 heads, MLP 4x. vit_t/s/b use its
# defaults (drop path 0.1, mask 0.1); arcface_torch has no plain vit_l, only the WebFace42M
# "vit_l_dp005_mask_005" (0.05 / 0.05), whose rates vit_l takes.
VIT_PATCH_SIZE = 9
VIT_SHAPES = {
    "vit_t": ViTShape(width=256, depth=12, heads=8, drop_path_rate=0.1, mask_ratio=0.1),
    "vit_s": ViTShape(width=512, depth=12, heads=8, drop_path_rate=0.1, mask_ratio=0.1),
    "vit_b": ViTShape(width=512, depth=24, heads=8, drop_path_rate=0.1, mask_ratio=0.1),
    "vit_l": ViTShape(width=768, depth=24, heads=8, drop_path_rate=0.05, mask_ratio=0.05),
}


def kept_tokens(num_tokens: int, mask_ratio: float) -> int:
    """Tokens a ViT keeps per sample when it masks ``mask_ratio`` of them (rounded down)."""
    return int(num_tokens * (1.0 - mask_ratio))


@dataclass
class ModelConfig:
    name: BackboneName = "mobilefacenet"
    embedding_size: int = 512
    input_size: int = 112
    dropout: float = 0.0
    # Recompute each residual block's activations in the backward pass instead of storing
    # them (torch.utils.checkpoint, non-reentrant): iresnet* and vit_* only.
    activation_checkpointing: bool = False
    # ViT only; null = the arcface_torch default of that size (VIT_SHAPES).
    drop_path_rate: float | None = None
    mask_ratio: float | None = None

    @property
    def is_vit(self) -> bool:
        return self.name in VIT_SHAPES

    def vit_rates(self) -> tuple[float, float]:
        """(drop_path_rate, mask_ratio) with nulls replaced by the size's defaults."""
        shape = VIT_SHAPES[self.name]
        drop_path = shape.drop_path_rate if self.drop_path_rate is None else self.drop_path_rate
        mask = shape.mask_ratio if self.mask_ratio is None else self.mask_ratio
        return drop_path, mask

    def __post_init__(self) -> None:
        check_minimums(self, {"embedding_size": 2, "input_size": 16})
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if not isinstance(self.activation_checkpointing, bool):
            raise TypeError(
                f"activation_checkpointing must be true or false, got "
                f"{self.activation_checkpointing!r}"
            )
        if self.activation_checkpointing and self.name == "mobilefacenet":
            raise ValueError(
                "activation_checkpointing is supported for the iresnet* and vit_* backbones, "
                "not mobilefacenet (whose activations are small anyway)"
            )
        for key in ("drop_path_rate", "mask_ratio"):
            value = getattr(self, key)
            if value is None:
                continue
            if not self.is_vit:
                raise ValueError(
                    f"{key} applies to the vit_* backbones only, not {self.name!r}; leave it null"
                )
            if not 0.0 <= value < 1.0:
                raise ValueError(f"{key} must be in [0, 1), got {value}")
        if self.is_vit:
            self._check_tokens()

    def _check_tokens(self) -> None:
        tokens = (self.input_size // VIT_PATCH_SIZE) ** 2
        mask = self.vit_rates()[1]
        if kept_tokens(tokens, mask) < 1:
            raise ValueError(
                f"mask_ratio {mask} keeps no token of the {tokens} patch(es) a {self.name} "
                f"makes of a {self.input_size}-pixel input; lower it"
            )
