"""Synthetic faces as JPEG files: shards (benchmarks, GPU checks) or an identity-folder tree
(the CPU quickstart converts it with ``dist-cosface shards``). No dataset is needed."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import torch

from dist_cosface.data.config import DataConfig
from dist_cosface.data.shards import Manifest, ShardInfo, ShardWriter, publish_shard_set, shard_stem
from dist_cosface.data.synthetic import SyntheticLoader
from dist_cosface.distributed import DistContext
from dist_cosface.seeding import stable_seed

_RENDER_CHUNK = 1024  # images rendered at once (bounds memory for large folders)


def _renderer(image_size: int, seed: int) -> SyntheticLoader:
    """Identity ``k``'s pattern depends only on ``(seed, k)``, as in the synthetic loader.

    Unmirrored, like an aligned face dataset: mirroring is the training loader's augmentation.
    """
    cfg = DataConfig(image_size=image_size, seed=seed, random_flip=False)
    return SyntheticLoader(cfg, DistContext())


def _encode_jpegs(
    faces: SyntheticLoader, labels: torch.Tensor, gen: torch.Generator, quality: int
) -> list[bytes]:
    from PIL import Image

    images = faces.make_batch(labels, gen).add(1).mul(127.5).round().clamp(0, 255)
    encoded = []
    for pixels in images.to(torch.uint8).permute(0, 2, 3, 1).numpy():
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, "JPEG", quality=quality)
        encoded.append(buf.getvalue())
    return encoded


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
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    faces = _renderer(image_size, seed)
    gen = torch.Generator().manual_seed(stable_seed(seed, 17))
    labels = torch.randint(0, num_classes, (num_images,), generator=gen)
    shards = []
    for start in range(0, num_images, shard_size):
        writer = ShardWriter(out / f"{shard_stem(len(shards))}.tar")
        chunk = labels[start : start + shard_size]
        for i, (label, jpeg) in enumerate(
            zip(chunk.tolist(), _encode_jpegs(faces, chunk, gen, quality))
        ):
            writer.write(f"{start + i:09d}", {"jpg": jpeg, "cls": str(label).encode()})
        shards.append(ShardInfo(writer.tar_path.name, writer.num_samples, writer.close()))
    manifest = Manifest(num_classes, num_images, shards, image_ext="jpg", source="synthetic")
    publish_shard_set(out, manifest)
    return manifest


def identity_folder_name(identity: int) -> str:
    """Zero-padded, so the converter's sorted folder names keep identity order."""
    return f"id{identity:06d}"


def write_synthetic_image_folder(
    out_dir: str | Path,
    num_identities: int,
    images_per_identity: int,
    first_identity: int = 0,
    image_size: int = 112,
    seed: int = 0,
    quality: int = 90,
) -> Path:
    """``out_dir/id<k>/<j>.jpg`` for identities ``first_identity .. + num_identities - 1``.

    The tree has the layout of a real face dataset (one folder per identity) and is what
    ``dist-cosface shards`` converts. Identities never overlap between calls with disjoint
    ranges, which gives held-out identities for verification. The folder appears complete or
    not at all (written next to it, then renamed).
    """
    if num_identities < 1 or images_per_identity < 1 or first_identity < 0:
        raise ValueError(
            f"need >= 1 identity with >= 1 image from identity >= 0, got {num_identities} x "
            f"{images_per_identity} from {first_identity}"
        )
    out = Path(out_dir)
    if out.exists():
        raise ValueError(f"{out} already exists; choose a new folder or delete it")
    tmp = out.with_name(out.name + ".tmp-write")
    shutil.rmtree(tmp, ignore_errors=True)
    faces = _renderer(image_size, seed)
    gen = torch.Generator().manual_seed(stable_seed(seed, 23, first_identity))
    labels = torch.arange(first_identity, first_identity + num_identities)
    labels = labels.repeat_interleave(images_per_identity)
    for start in range(0, len(labels), _RENDER_CHUNK):
        chunk = labels[start : start + _RENDER_CHUNK]
        for i, (label, jpeg) in enumerate(
            zip(chunk.tolist(), _encode_jpegs(faces, chunk, gen, quality))
        ):
            folder = tmp / identity_folder_name(label)
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{(start + i) % images_per_identity:04d}.jpg").write_bytes(jpeg)
    tmp.rename(out)
    return out
