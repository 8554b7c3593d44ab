"""A verification set: pairs of face images labelled same / different identity."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass
class VerificationSet:
    """``images[2i]`` and ``images[2i + 1]`` form pair ``i``; items are encoded bytes or paths."""

    name: str
    images: list[bytes | Path]
    issame: list[bool]
    source: str = ""

    def __post_init__(self) -> None:
        if len(self.images) != 2 * len(self.issame):
            raise ValueError(
                f"{self.source or self.name}: {len(self.images)} images for "
                f"{len(self.issame)} pairs (expected exactly two images per pair)"
            )

    @property
    def num_pairs(self) -> int:
        return len(self.issame)

    def image_name(self, index: int) -> str:
        """For error messages: the image's file, or its position in the set's file."""
        item = self.images[index]
        return str(item) if isinstance(item, Path) else f"{self.source}[{index}]"

    def read_image_bytes(self, index: int) -> bytes:
        item = self.images[index]
        if isinstance(item, Path):
            try:
                return item.read_bytes()
            except OSError as exc:
                raise ValueError(f"{self.source}: cannot read image {item}: {exc}") from exc
        return item
