"""Helpers shared by the data tests (real face folders, small hand-made shards)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch

from dist_cosface.data import DataConfig, build_loader
from dist_cosface.data.shards import Manifest, ShardInfo, ShardWriter, publish_shard_set, shard_stem
from dist_cosface.distributed import DistContext

REPO = Path(__file__).resolve().parents[1]
ORL = REPO / "../shared/data/orl"
YALEB = REPO / "../shared/data/yaleb"


def need(folder: Path) -> Path:
    if not folder.is_dir():
        pytest.skip(f"{folder} absent: the shared face data is expected beside the repo clone")
    return folder


def jpeg_bytes(seed: int, size: int = 16) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=95)
    return buf.getvalue()


def write_dataset(
    out: Path, samples: list[dict[str, bytes]], shard_size: int, num_classes: int
) -> Manifest:
    """Shards straight from component dicts (bad samples included on purpose by tests)."""
    out.mkdir(parents=True, exist_ok=True)
    shards = []
    for start in range(0, len(samples), shard_size):
        writer = ShardWriter(out / f"{shard_stem(len(shards))}.tar")
        for i, comps in enumerate(samples[start : start + shard_size]):
            writer.write(f"{start + i:06d}", comps)
        shards.append(ShardInfo(writer.tar_path.name, writer.num_samples, writer.close()))
    manifest = Manifest(num_classes, len(samples), shards)
    publish_shard_set(out, manifest)
    return manifest


def unique_label_dataset(out: Path, n: int, shard_size: int) -> Manifest:
    """Sample i has label i, so labels identify samples (disjointness/completeness checks)."""
    samples = [{"jpg": jpeg_bytes(i), "cls": str(i).encode()} for i in range(n)]
    return write_dataset(out, samples, shard_size, n)


def reference_faces(folder: Path, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every image of a face folder as the loaders should produce it (PIL, [-1, 1])."""
    import numpy as np
    from PIL import Image

    names = sorted(p.name for p in folder.iterdir() if p.is_dir())
    images, labels = [], []
    for label, name in enumerate(names):
        for path in sorted((folder / name).iterdir()):
            with Image.open(path) as img:
                rgb = np.asarray(img.convert("RGB").resize((size, size), Image.BILINEAR))
            images.append(torch.from_numpy(rgb.astype(np.float32)).permute(2, 0, 1) / 127.5 - 1)
            labels.append(label)
    return torch.stack(images), torch.tensor(labels)


def assert_faces_match(images, labels, refs, ref_labels, tol: float) -> None:
    """Each decoded image's nearest reference has its label and is within ``tol``."""
    diff = torch.cdist(images.float().flatten(1), refs.flatten(1), p=1) / refs[0].numel()
    best = diff.argmin(dim=1)
    assert torch.equal(ref_labels[best], labels), "a decoded image does not match its label"
    assert float(diff.min(dim=1).values.max()) < tol


# ---------------------------------------------------------------- small datasets with bad samples

BACKENDS = ["webdataset", "dali"]


def loader_config(backend, path, **kw) -> DataConfig:
    """A single-worker, unflipped loader config (batch 8, 32 px); ``kw`` overrides."""
    base = dict(
        backend=backend,
        path=str(path),
        batch_size=8,
        image_size=32,
        num_workers=1,
        random_flip=False,
        shuffle_buffer=16,
    )
    return DataConfig(**{**base, **kw})


def bad_data_config(backend, path, on_bad="skip", **kw):
    """A loader config for the tiny datasets below: 16 px, batch 4, skip by default."""
    kw.setdefault("max_skip_fraction", 0.5)  # these tiny datasets lose 1 sample in 16
    small = dict(batch_size=4, image_size=16, shuffle_buffer=8, on_bad_sample=on_bad)
    return loader_config(backend, path, **small, **kw)


def good_sample(i, label=None):
    """Sample ``i``: a seeded JPEG, label ``i % 4`` unless given."""
    return {"jpg": jpeg_bytes(i), "cls": str(i % 4 if label is None else label).encode()}


def small_dataset(path, bad: dict[int, dict], n=16, shard_size=8):
    """``n`` good samples in 4 classes, sample i replaced by ``bad[i]`` where given."""
    samples = [bad.get(i, good_sample(i)) for i in range(n)]
    write_dataset(path, samples, shard_size, num_classes=4)


def one_epoch(backend, path, on_bad="skip", **kw):
    """One single-process epoch: the loader, all labels, the batches."""
    loader = build_loader(bad_data_config(backend, path, on_bad, **kw), DistContext())
    batches = list(loader)
    return loader, torch.cat([b[1] for b in batches]), batches
