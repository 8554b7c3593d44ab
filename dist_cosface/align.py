"""5-point face alignment to the standard 112x112 template of ArcFace/CosFace-era models.

The landmarks (left eye, right eye, nose tip, left and right mouth corners, in image pixels)
are mapped onto the template by the least-squares similarity transform (rotation, uniform
scale, translation; no reflection), and the image is warped with it. For an output size S
the template is scaled by S / 112.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from dist_cosface.imageio import keep_mode

# Template of the 112x112 crops used by ArcFace/CosFace-era training sets (insightface).
TEMPLATE_112 = np.array(
    [
        [38.2946, 51.6963],
        [73.5318, 51.5014],
        [56.0252, 71.7366],
        [41.5493, 92.3655],
        [70.7299, 92.2041],
    ]
)
# Smallest/largest spread ratio of the points below which the set counts as collinear.
MIN_SPREAD_RATIO = 1e-3


class AlignmentError(ValueError):
    """Landmarks that cannot define an alignment; ``kind`` names the problem for counting."""

    def __init__(self, kind: str, where: str, detail: str = ""):
        self.kind, self.detail = kind, detail
        super().__init__(f"{where}: {kind}" + (f" ({detail})" if detail else ""))


def template(size: int = 112) -> np.ndarray:
    if size < 8:
        raise ValueError(f"alignment size must be >= 8, got {size}")
    return TEMPLATE_112 * (size / 112.0)


def check_landmarks(points, width: int, height: int, where: str) -> np.ndarray:
    """``[5, 2]`` float64 landmarks, or AlignmentError (NaN, outside the image, collinear)."""
    pts = np.asarray(points, dtype=np.float64)
    if pts.size != 10:
        raise AlignmentError("wrong landmark count", where, f"{pts.size} numbers, expected 10")
    pts = pts.reshape(5, 2)
    if not np.isfinite(pts).all():
        raise AlignmentError("non-finite landmarks", where, "NaN or infinite coordinate")
    if (pts < 0).any() or (pts[:, 0] > width).any() or (pts[:, 1] > height).any():
        raise AlignmentError("landmarks outside the image", where, f"image {width}x{height}")
    spread = np.linalg.svd(pts - pts.mean(axis=0), compute_uv=False)
    if spread[0] == 0 or spread[1] / spread[0] < MIN_SPREAD_RATIO:
        raise AlignmentError("collinear landmarks", where, "the 5 points lie on one line")
    return pts


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """2x3 matrix M of the least-squares similarity with ``M @ [x, y, 1] ~ dst``.

    Parametrised as x' = a x - b y + tx, y' = b x + a y + ty: linear in (a, b, tx, ty), so
    one least-squares solve; the fit is exact for points related by a similarity.
    """
    src, dst = np.asarray(src, np.float64), np.asarray(dst, np.float64)
    n = src.shape[0]
    rows = np.zeros((2 * n, 4))
    rows[0::2] = np.column_stack([src[:, 0], -src[:, 1], np.ones(n), np.zeros(n)])
    rows[1::2] = np.column_stack([src[:, 1], src[:, 0], np.zeros(n), np.ones(n)])
    (a, b, tx, ty), *_ = np.linalg.lstsq(rows, dst.reshape(-1), rcond=None)
    return np.array([[a, -b, tx], [b, a, ty]])


def align_face(image, points, size: int = 112, where: str = "image"):
    """The ``size`` x ``size`` aligned crop of a PIL image (bilinear warp)."""
    from PIL import Image

    pts = check_landmarks(points, image.width, image.height, where)
    forward = np.vstack([similarity_transform(pts, template(size)), [0.0, 0.0, 1.0]])
    # PIL maps every output pixel back into the input: pass the inverse transform.
    inverse = np.linalg.inv(forward)[:2].ravel()
    return image.transform((size, size), Image.AFFINE, tuple(inverse), Image.BILINEAR)


def align_encoded(data: bytes, points, size: int, where: str) -> bytes:
    """Decode, align and re-encode as PNG (lossless; the converter may re-encode later)."""
    from PIL import Image

    if points is None:
        raise AlignmentError("no landmarks for this image", where)

    with Image.open(io.BytesIO(data)) as image:
        image.load()
        aligned = align_face(image.convert(keep_mode(image.mode)), points, size, where)
    out = io.BytesIO()
    aligned.save(out, "PNG")
    return out.getvalue()


def read_landmarks_file(path: str | Path) -> dict[str, tuple[float, ...]]:
    """``relative/path x1 y1 ... x5 y5`` per line -> {relative path: 10 numbers}.

    Blank lines and '#' comments are skipped; anything else malformed is an error naming the
    file and line (a landmarks file is small and hand-made: better fixed than skipped).
    """
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ValueError(f"{path}: cannot read landmarks file: {exc}") from exc
    table: dict[str, tuple[float, ...]] = {}
    for lineno, line in enumerate(text.splitlines(), start=1):
        fields = line.split()
        if not fields or fields[0].startswith("#"):
            continue
        if len(fields) != 11:
            raise ValueError(f"{path}:{lineno}: {len(fields)} fields, expected path + 10 numbers")
        try:
            numbers = tuple(float(v) for v in fields[1:])
        except ValueError as exc:
            raise ValueError(f"{path}:{lineno}: not a number: {exc}") from exc
        if fields[0] in table:
            raise ValueError(f"{path}:{lineno}: {fields[0]} listed twice")
        table[fields[0]] = numbers
    if not table:
        raise ValueError(f"{path}: no landmarks")
    return table
