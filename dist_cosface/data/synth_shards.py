"""Write JPEG shards of synthetic faces (for benchmarks and GPU checks; no dataset needed)."""

from __future__ import annotations

import io
from pathlib import Path

import torch

from dist_cosface.data.base import stable_seed
from dist_cosface.data.config import DataConfig
from dist_cosface.data.shards import (
    LABELS_NAME,
    MANIFEST_NAME,
    Manifest,
    ShardInfo,
    ShardWriter,
    atomic_write_text,
    shard_stem,
)
from dist_cosface.data.synthetic import SyntheticLoader
from dist_cosface.distributed import DistContext


def write_synthetic_shards(
    out_dir: str | Path,
    num_images: int,
    num_classes: int = 100,
    image_size: int = 112,
    shard_size: int = 1000,
    seed: int = 0,
    quality: int = 90,
) -> Manifest:
    """``num_images`` JPEGs of ``num_classes`` generated identities, in shuffled shards."""
    from PIL import Image

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = DataConfig(image_size=image_size, synthetic_num_classes=num_classes, seed=seed)
    faces = SyntheticLoader(cfg, DistContext())
    gen = torch.Generator().manual_seed(stable_seed(seed, 17))
    labels = torch.randint(0, num_classes, (num_images,), generator=gen)
    shards = []
    for start in range(0, num_images, shard_size):
        writer = ShardWriter(out / f"{shard_stem(len(shards))}.tar")
        chunk = labels[start : start + shard_size]
        images = faces.make_batch(chunk, gen).add(1).mul(127.5).round().clamp(0, 255)
        pixels = images.to(torch.uint8).permute(0, 2, 3, 1).numpy()
        for i, label in enumerate(chunk.tolist()):
            buf = io.BytesIO()
            Image.fromarray(pixels[i]).save(buf, "JPEG", quality=quality)
            writer.write(f"{start + i:09d}", {"jpg": buf.getvalue(), "cls": str(label).encode()})
        shards.append(ShardInfo(writer.tar_path.name, writer.num_samples, writer.close()))
    manifest = Manifest(num_classes, num_images, shards, image_ext="jpg", source="synthetic")
    atomic_write_text(out / LABELS_NAME, "{}")
    atomic_write_text(out / MANIFEST_NAME, manifest.to_json())
    return manifest
