"""A verification set of synthetic identities the model never saw in training.

The synthetic training loader draws identity ``k`` from a pattern seeded by ``(seed, k)`` for
``k < synthetic_num_classes``; identities numbered from ``synthetic_num_classes`` upwards use the
same generator but never occur in training, so pairs built from them test open-set
verification, like a real held-out benchmark. Used by the CPU quickstart.
"""

from __future__ import annotations

import dataclasses
import io
import random
from pathlib import Path

import torch

from dist_cosface.data.config import DataConfig
from dist_cosface.data.synthetic import SyntheticLoader
from dist_cosface.distributed import DistContext
from dist_cosface.eval.bin_file import write_bin
from dist_cosface.eval.make_set import sample_pairs


def _encode_png(image: torch.Tensor) -> bytes:
    from PIL import Image

    pixels = ((image.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels.permute(1, 2, 0).numpy()).save(buffer, format="PNG")
    return buffer.getvalue()


def make_synthetic_verification_set(
    data_cfg: DataConfig,
    out_path: str | Path,
    *,
    num_identities: int = 40,
    images_per_identity: int = 6,
    num_pairs: int = 400,
    seed: int = 0,
) -> Path:
    """Write a balanced ``.bin`` of pairs over ``num_identities`` unseen synthetic identities."""
    if num_identities < 2 or images_per_identity < 2:
        raise ValueError(
            f"need >= 2 identities with >= 2 images, got {num_identities} x {images_per_identity}"
        )
    cfg = dataclasses.replace(data_cfg, backend="synthetic", output_dtype="float32")
    renderer = SyntheticLoader(cfg, DistContext())
    first_unseen = cfg.synthetic_num_classes
    labels = torch.arange(first_unseen, first_unseen + num_identities)
    labels = labels.repeat_interleave(images_per_identity)
    images = renderer.make_batch(labels, torch.Generator().manual_seed(seed))
    by_id: dict[str, list[bytes]] = {}
    for label, image in zip(labels.tolist(), images):
        by_id.setdefault(str(label), []).append(_encode_png(image))
    pairs = sample_pairs(by_id, num_pairs, random.Random(seed))
    encoded = [img for a, b, _ in pairs for img in (a, b)]
    return write_bin(out_path, encoded, [same for _, _, same in pairs])
