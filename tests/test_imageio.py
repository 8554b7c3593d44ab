"""The one image module (dist_cosface.imageio) and the one seed rule (dist_cosface.seeding)."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dist_cosface.data import DataConfig, build_loader
from dist_cosface.data.dataset import open_shards
from dist_cosface.distributed import DistContext
from dist_cosface.imageio import (
    DALI_EXTENSIONS,
    IMAGE_EXTENSIONS,
    decode_image,
    decode_resized,
    image_key,
    is_image_file,
    to_unit_range,
)
from dist_cosface.seeding import stable_seed
from tests.data_common import write_dataset

# PIL writer per extension: every listed format must round-trip through decode_image
_WRITE = {
    "jpg": ("JPEG", "RGB"), "jpeg": ("JPEG", "RGB"), "png": ("PNG", "RGB"), "pgm": ("PPM", "L"),
    "ppm": ("PPM", "RGB"), "pbm": ("PPM", "1"), "pnm": ("PPM", "RGB"), "bmp": ("BMP", "RGB"),
    "tif": ("TIFF", "RGB"), "tiff": ("TIFF", "RGB"), "webp": ("WEBP", "RGB"),
}  # fmt: skip


def _encoded(fmt: str, mode: str, size: int = 8) -> bytes:
    pixels = (np.arange(size * size * 3).reshape(size, size, 3) * 7 % 256).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(out, fmt)
    return out.getvalue()


def test_every_listed_extension_is_a_format_that_decodes_to_rgb():
    assert set(_WRITE) == set(IMAGE_EXTENSIONS)
    for ext in IMAGE_EXTENSIONS:
        image = decode_image(_encoded(*_WRITE[ext]), f"x.{ext}")
        assert (image.mode, image.size) == ("RGB", (8, 8)), ext


def test_file_suffixes_match_whole_extension_in_any_case():
    for name in ("a.jpg", "a.JPG", "a.Jpeg", "a.tif", "a.TIFF", "a.pbm", "b.c.webp"):
        assert is_image_file(Path(name)), name
    for name in ("a.gif", "a.ti", "a.jp", "a.pgm.bad", "a.txt", "jpg", "a.tiff2"):
        assert not is_image_file(Path(name)), name
    assert DALI_EXTENSIONS.split(";") == list(IMAGE_EXTENSIONS)


def test_image_key_picks_the_first_listed_component_or_none():
    assert image_key({"cls": b"1", "png": b"", "jpg": b""}) == "jpg"
    assert image_key(["cls", "tiff"]) == "tiff"
    assert image_key({"cls": b"1", "txt": b""}) is None


def test_bad_bytes_raise_value_error_naming_the_source():
    with pytest.raises(ValueError, match="shard-3.tar key 17"):
        decode_image(b"not an image", "shard-3.tar key 17")


def test_decode_resized_and_unit_range_match_pil_and_numpy():
    data = _encoded("PNG", "L", size=10)
    got = to_unit_range(decode_resized(data, 6))
    with Image.open(io.BytesIO(data)) as img:
        ref = np.asarray(img.convert("RGB").resize((6, 6), Image.BILINEAR), dtype=np.float64)
    expected = torch.from_numpy(ref / 127.5 - 1.0).permute(2, 0, 1)
    assert got.dtype == torch.float32 and got.shape == (3, 6, 6)
    torch.testing.assert_close(got.double(), expected, rtol=0, atol=1e-6)
    ends = to_unit_range(torch.tensor([0, 255], dtype=torch.uint8))
    assert ends.tolist() == [-1.0, 1.0]


def test_stable_seed_is_the_same_in_processes_with_different_hash_salts():
    values = [(0,), (1, 2, 3), (-1, 2**62, 7), (5, 0, 0, 1000)]
    call = f"[f(*v) for v in {values!r}]"
    code = f"from dist_cosface.seeding import stable_seed as f; print({call})"
    outs = set()
    for salt in ("1", "2"):
        env = {"PYTHONHASHSEED": salt, "PYTHONPATH": str(Path(__file__).parents[1])}
        run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
        assert run.returncode == 0, run.stderr
        outs.add(run.stdout)
    assert outs == {f"{[stable_seed(*v) for v in values]}\n"}
    seeds = [stable_seed(*v) for v in values]
    assert len(set(seeds)) == len(seeds) and all(0 <= s < 2**63 for s in seeds)
    assert stable_seed(1, 2) != stable_seed(2, 1)  # order matters


@pytest.mark.parametrize("backend", ["webdataset", "dali"])
def test_shard_checks_and_loaders_agree_on_upper_case_and_tiff_components(tmp_path, backend):
    keys = ["JPG", "Png", "tiff", "TIF", "pgm", "jpeg", "CLS"]
    samples = []
    for label, key in enumerate(keys * 2):
        fmt, mode = _WRITE[key.lower()] if key != "CLS" else ("PNG", "RGB")
        ext = key if key != "CLS" else "png"
        cls = "CLS" if key == "CLS" else "cls"
        samples.append({ext: _encoded(fmt, mode), cls: str(label).encode()})
    write_dataset(tmp_path, samples, 7, len(samples))
    shards = open_shards(str(tmp_path), "stop")
    assert shards.counts == [7, 7] and not shards.problems
    cfg = DataConfig(backend=backend, path=str(tmp_path), batch_size=14, image_size=16,
                     num_workers=1, random_flip=False, shuffle_buffer=4)  # fmt: skip
    if backend == "dali":
        pytest.importorskip("nvidia.dali")
    loader = build_loader(cfg, DistContext())
    images, labels = next(iter(loader))
    assert sorted(labels.tolist()) == list(range(len(samples)))
    assert loader.stats["skipped_samples"] == 0 and float(images.abs().max()) <= 1
