"""Images in one place: which files are images, decoding to RGB, the [-1, 1] input range.

Data (converter, loaders, shard checks), eval and experiments all take their image rules from
here, so a file one of them accepts is never refused by another. Every extension below is a
format that both PIL and DALI's image decoder read. Its three spellings:

* ``IMAGE_EXTENSIONS``: webdataset component keys (lower case, no dot), in the order a loader
  picks the image of a sample that has several;
* ``DALI_EXTENSIONS``: the same joined with ``;`` for ``fn.readers.webdataset(ext=...)``;
* ``is_image_file(path)``: folder scans, by suffix, case-insensitively (``x.JPG`` is an image).

``.tif`` and ``.tiff`` are both listed as separate keys: a sample is matched on its whole
extension, never on a prefix. Imports PIL/numpy inside the functions (nothing at import time).
"""

from __future__ import annotations

import io
from collections.abc import Container
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from PIL import Image

IMAGE_EXTENSIONS = (
    "jpg", "jpeg", "png", "pgm", "ppm", "pbm", "pnm", "bmp", "tif", "tiff", "webp",
)  # fmt: skip
DALI_EXTENSIONS = ";".join(IMAGE_EXTENSIONS)
_SUFFIXES = frozenset("." + ext for ext in IMAGE_EXTENSIONS)

# The component key the converter writes for bytes it keeps as they are, per PIL format
# (PNM: per mode, since PIL names pbm/pgm/ppm all "PPM").
PIL_FORMAT_EXTENSION = {"JPEG": "jpg", "PNG": "png", "BMP": "bmp", "TIFF": "tif", "WEBP": "webp"}
PNM_MODE_EXTENSION = {"1": "pbm", "L": "pgm", "RGB": "ppm"}
# PIL modes kept grey when an image is re-encoded (everything else becomes RGB).
GREY_MODES = ("1", "L", "I;16", "I")

# uint8 pixel p maps to p / PIXEL_SCALE - 1 in [-1, 1] (DALI: mean = std = PIXEL_SCALE).
PIXEL_SCALE = 127.5
# Most pixels an image may declare before it is decoded: 8192 x 8192, 192 MiB as RGB. Far above
# any face photo (a 50-megapixel camera frame is 8192 x 6144) and below Pillow's own warning
# (89.5 M) and error (179 M) thresholds, so the cap is this one, stated and the same for every
# caller: a few bytes of PNG header declaring 30000 x 30000 would otherwise ask for 2.7 GB.
MAX_IMAGE_PIXELS = 8192 * 8192


def is_image_file(path: Path) -> bool:
    """Whether ``path``'s suffix names an image format (any case)."""
    return path.suffix.lower() in _SUFFIXES


def image_key(components: Container[str]) -> str | None:
    """The image component of a webdataset sample (first in list order), or None."""
    return next((ext for ext in IMAGE_EXTENSIONS if ext in components), None)


def keep_mode(mode: str) -> str:
    """The mode to re-encode a PIL image in: grey stays grey, anything else becomes RGB."""
    return "L" if mode in GREY_MODES else "RGB"


def decode_image(data: bytes, source: str = "", mode: str = "RGB") -> Image.Image:
    """Encoded bytes -> a loaded PIL image in ``mode``; ValueError naming ``source`` if bad,
    or if it declares more than ``MAX_IMAGE_PIXELS`` pixels (checked before decoding)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:  # reads the header only
            width, height = image.size
            if width * height > MAX_IMAGE_PIXELS:
                raise ValueError(
                    f"{source}: image declares {width}x{height} pixels, more than the "
                    f"{MAX_IMAGE_PIXELS:,} (8192x8192) an image may have"
                )
            return image.convert(mode)
    except Image.DecompressionBombError as exc:  # Pillow refuses before we can look
        raise ValueError(
            f"{source}: image declares more than the {MAX_IMAGE_PIXELS:,} (8192x8192) pixels "
            f"an image may have ({exc})"
        ) from exc
    except (UnidentifiedImageError, OSError) as exc:
        raise ValueError(f"{source}: cannot decode image: {exc}") from exc


def to_uint8(image: Image.Image, size: int) -> torch.Tensor:
    """PIL image -> uint8 ``[C, size, size]`` (bilinear resize, aspect not kept)."""
    import numpy as np
    from PIL import Image

    if image.size != (size, size):
        image = image.resize((size, size), Image.BILINEAR)
    array = np.asarray(image, dtype=np.uint8)
    return torch.from_numpy(array.reshape(*array.shape[:2], -1).copy()).permute(2, 0, 1)


def decode_resized(data: bytes, size: int, source: str = "") -> torch.Tensor:
    """Encoded bytes -> uint8 RGB ``[3, size, size]``."""
    return to_uint8(decode_image(data, source), size)


def to_unit_range(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 pixels -> float32 in [-1, 1], the range every backbone is trained and run on."""
    return pixels.to(torch.float32) / PIXEL_SCALE - 1.0
