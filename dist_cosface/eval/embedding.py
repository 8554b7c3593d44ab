"""Embedding image lists with a backbone: preprocessing as the training loaders do, the
flip-test sum, alignment of images that carry landmarks, and the input dtype of half-precision
weights. Each rank embeds the slice ``ranks.rank_slice`` gives it; the callers gather.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from dist_cosface.align import AlignmentError, align_face
from dist_cosface.eval.images import ImageRef
from dist_cosface.imageio import decode_image, to_uint8, to_unit_range


def preprocess(images: list, image_size: int) -> torch.Tensor:
    """RGB PIL images -> ``[B, 3, S, S]`` float in [-1, 1], as the training loaders produce."""
    return to_unit_range(torch.stack([to_uint8(image, image_size) for image in images]))


def input_dtype(backbone: nn.Module) -> torch.dtype:
    """Feed images in the weights' dtype: a DeepSpeed fp16/bf16 engine holds half weights."""
    for param in backbone.parameters():
        if param.is_floating_point():
            return param.dtype
    return torch.float32


def load_image(ref: ImageRef, image_size: int):
    """Decoded RGB image, aligned to the template when the ref carries landmarks."""
    image = decode_image(ref.read_bytes(), str(ref))
    if ref.landmarks is None:
        return image
    points = np.asarray(ref.landmarks, dtype=np.float64).reshape(5, 2)
    return align_face(image, points, image_size, where=str(ref))


def _load_batch(refs, start, stop, image_size, skipped, load):
    from PIL import Image

    batch, bad = [], []
    for i in range(start, min(stop, len(refs))):
        try:
            batch.append(load(refs[i]) if load else load_image(refs[i], image_size))
        except AlignmentError:
            if skipped is None:
                raise
            skipped.append(i)
            bad.append(i - start)
            batch.append(Image.new("RGB", (image_size, image_size)))
    return batch, bad


@torch.no_grad()
def embed_images(
    backbone: nn.Module,
    refs: list[ImageRef],
    image_size: int,
    device: torch.device | str,
    batch_size: int = 64,
    flip: bool = True,
    skipped: list[int] | None = None,
    load: Callable[[Any], Any] | None = None,
) -> torch.Tensor:
    """Unnormalised float32 embeddings ``[len(refs), D]`` on the CPU (image + mirror image).

    With a ``skipped`` list, images whose landmarks cannot be aligned get a zero row and
    their positions are appended to it, instead of raising. ``load(item) -> PIL image``
    replaces :func:`load_image` for lists of other items.
    """
    was_training = backbone.training
    backbone.eval()
    dtype = input_dtype(backbone)
    # an empty slice still yields the embedding width, which gathering needs
    chunks = [torch.zeros((1, 3, image_size, image_size))] if not refs else []
    try:
        if chunks:
            chunks = [backbone(chunks[0].to(device, dtype)).float().cpu()[:0]]
        for start in range(0, len(refs), batch_size):
            batch, bad = _load_batch(refs, start, start + batch_size, image_size, skipped, load)
            x = preprocess(batch, image_size).to(device, dtype)
            emb = backbone(x).float()
            if flip:
                emb = emb + backbone(torch.flip(x, dims=[3])).float()
            emb[bad] = 0.0
            chunks.append(emb.cpu())
    finally:
        backbone.train(was_training)
    return torch.cat(chunks)
