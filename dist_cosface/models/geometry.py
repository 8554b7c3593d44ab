"""Feature-map geometry shared by the backbones."""

from __future__ import annotations


def downsampled_size(size: int, num_halvings: int) -> int:
    """Spatial size after ``num_halvings`` stride-2 3x3 convs with padding 1 (ceil(size/2))."""
    for _ in range(num_halvings):
        size = (size + 1) // 2
    return size
