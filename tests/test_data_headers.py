"""The DALI loader's structural image checks (``data/image_headers.py``): every format both
Pillow and DALI decode passes as Pillow writes it; damaged copies are refused."""

from __future__ import annotations

import io

import numpy as np
import pytest

from dist_cosface.data.image_headers import header_problem
from dist_cosface.imageio import IMAGE_EXTENSIONS
from tests.data_common import ORL, YALEB, need

# Pillow's writer for each extension (PNM kinds by mode: P4 bitmap, P5 grey, P6 colour)
WRITERS = {
    "jpg": ("JPEG", "RGB", {}),
    "jpeg": ("JPEG", "L", {"progressive": True}),
    "png": ("PNG", "RGB", {}),
    "pgm": ("PPM", "L", {}),
    "ppm": ("PPM", "RGB", {}),
    "pbm": ("PPM", "1", {}),
    "pnm": ("PPM", "RGB", {}),
    "bmp": ("BMP", "RGB", {}),
    "tif": ("TIFF", "RGB", {}),
    "tiff": ("TIFF", "L", {"compression": "tiff_deflate"}),
    "webp": ("WEBP", "RGB", {}),
}
# damage that each check must find (BMP, TIFF and WebP are checked only against their length)
TRUNCATION_FOUND = {"jpg", "jpeg", "png", "pgm", "ppm", "pbm", "pnm", "webp"}


def _encoded(ext: str) -> bytes:
    from PIL import Image

    fmt, mode, options = WRITERS[ext]
    pixels = np.random.default_rng(len(ext)).integers(0, 256, (21, 17, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(out, fmt, **options)
    return out.getvalue()


def test_every_image_extension_has_a_writer():
    assert set(WRITERS) == set(IMAGE_EXTENSIONS)


@pytest.mark.parametrize("ext", sorted(WRITERS))
def test_sound_images_pass_and_damaged_ones_do_not(ext):
    data = _encoded(ext)
    assert header_problem(data) == ""
    assert header_problem(data + b"trailing bytes") == ""  # e.g. camera trailers after EOI
    if ext in ("jpg", "jpeg", "png"):
        assert header_problem(data[:20] + bytes(len(data) - 20)) != ""  # zeroed after the header
    if ext in TRUNCATION_FOUND:
        assert header_problem(data[: len(data) // 2]) != ""
    assert header_problem(bytes(len(data))) != ""  # all zeros: no known format


def test_real_face_files_pass():
    for path in sorted(need(YALEB).glob("*/*.jpg"))[:200] + sorted(need(ORL).glob("s1/*.pgm")):
        assert header_problem(path.read_bytes()) == "", path
