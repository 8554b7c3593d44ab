"""5-point alignment: the least-squares similarity, the warp, bad landmarks, and the converter."""

from __future__ import annotations

import io
import json
import math

import numpy as np
import pytest
from PIL import Image, ImageDraw

from dist_cosface.align import (
    AlignmentError,
    align_face,
    check_landmarks,
    read_landmarks_file,
    similarity_transform,
    template,
)
from tests.eval_sets import yaleb


def umeyama(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Independent reference: Umeyama's closed form (SVD of the cross-covariance)."""
    mu_s, mu_d = src.mean(0), dst.mean(0)
    a, b = src - mu_s, dst - mu_d
    u, sig, vt = np.linalg.svd(b.T @ a / len(src))
    d = np.diag([1.0, np.sign(np.linalg.det(u @ vt))])
    rot = u @ d @ vt
    scale = np.trace(np.diag(sig) @ d) / (a**2).sum(1).mean()
    return np.column_stack([scale * rot, mu_d - scale * rot @ mu_s])


def similarity(scale, angle, tx, ty):
    c, s = scale * math.cos(angle), scale * math.sin(angle)
    return np.array([[c, -s, tx], [s, c, ty]])


def apply(m, pts):
    return pts @ m[:, :2].T + m[:, 2]


def test_exact_for_points_related_by_a_similarity():
    m = similarity(1.7, 0.3, 12.0, -4.0)
    src = template(112)
    np.testing.assert_allclose(similarity_transform(src, apply(m, src)), m, atol=1e-9)


def test_least_squares_equals_umeyama_on_noisy_points():
    gen = np.random.default_rng(0)
    for _ in range(5):
        src = gen.uniform(20, 150, size=(5, 2))
        dst = apply(similarity(0.8, -0.5, 3.0, 9.0), src) + gen.normal(0, 2.0, size=(5, 2))
        np.testing.assert_allclose(similarity_transform(src, dst), umeyama(src, dst), atol=1e-9)


def test_template_scales_with_size():
    np.testing.assert_allclose(template(224), 2 * template(112))
    assert template(112)[0].tolist() == [38.2946, 51.6963]


def test_warp_puts_the_landmarks_on_the_template():
    """Dark dots drawn at a rotated, scaled face pose land on the template after alignment."""
    pose = similarity(1.4, 0.25, 30.0, 10.0)
    points = apply(pose, template(112))
    image = Image.new("L", (220, 240), 255)
    draw = ImageDraw.Draw(image)
    for x, y in points:
        draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=0)
    for size in (112, 64):
        aligned = np.asarray(align_face(image, points, size))
        assert aligned.shape == (size, size)
        for x, y in template(size):
            assert aligned[int(round(y)), int(round(x))] < 100, (size, x, y)
        assert aligned[2, 2] == 255  # background stays background


@pytest.mark.parametrize(
    ("points", "kind"),
    [
        ([[np.nan, 1]] + [[10, 10]] * 4, "non-finite landmarks"),
        ([[-5, 10], [60, 10], [40, 40], [20, 70], [60, 70]], "landmarks outside the image"),
        ([[10, 10], [20, 20], [30, 30], [40, 40], [50, 50]], "collinear landmarks"),
        ([[30, 30]] * 5, "collinear landmarks"),
        ([[1, 2]] * 4, "wrong landmark count"),
    ],
)
def test_bad_landmarks_are_named_errors(points, kind):
    with pytest.raises(AlignmentError, match=f"img_7.jpg: {kind}") as info:
        check_landmarks(np.array(points, dtype=float), 100, 100, "img_7.jpg")
    assert info.value.kind == kind


def test_landmarks_file_errors_name_file_and_line(tmp_path):
    path = tmp_path / "marks.txt"
    path.write_text("# header\na.jpg " + "1 " * 10 + "\nb.jpg 1 2 3\n")
    with pytest.raises(ValueError, match=rf"{path}:3: 4 fields, expected path \+ 10 numbers"):
        read_landmarks_file(path)
    path.write_text("a.jpg " + "1 " * 9 + "x\n")
    with pytest.raises(ValueError, match=rf"{path}:1: not a number"):
        read_landmarks_file(path)


def _yaleb_tree(root, data):
    """2 identities x 3 images as symlinks, plus landmarks near a plausible 168x192 face pose."""
    pose = similarity(1.3, 0.05, 12.0, 20.0)
    lines = []
    gen = np.random.default_rng(1)
    for ident in ("yaleB01", "yaleB02"):
        (root / ident).mkdir(parents=True)
        for path in sorted((data / ident).iterdir())[:3]:
            (root / ident / path.name).symlink_to(path)
            pts = apply(pose, template(112)) + gen.normal(0, 1.0, size=(5, 2))
            lines.append(f"{ident}/{path.name} " + " ".join(f"{v:.3f}" for v in pts.ravel()))
    return lines


def test_shards_with_landmarks_align_and_count_bad_lines(tmp_path):
    from dist_cosface.cli import main
    from dist_cosface.data.shards import read_index

    src = tmp_path / "src"
    lines = _yaleb_tree(src, yaleb())
    lines[1] = lines[1].split()[0] + " nan" + " 5" * 9  # NaN: a counted skip
    del lines[4]  # one image without landmarks: a counted skip
    marks = tmp_path / "marks.txt"
    marks.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    rc = main(["shards", str(src), str(out), "--landmarks", str(marks), "--no-progress"])
    assert rc == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["num_samples"] == 4
    assert manifest["skipped"] == {"non-finite landmarks": 1, "no landmarks for this image": 1}
    idx = sorted(out.glob("*.idx"))[0]
    tar = idx.with_suffix(".tar").read_bytes()
    for entry in read_index(idx):
        offset, size = entry.components["png"]
        image = Image.open(io.BytesIO(tar[offset : offset + size]))
        assert image.size == (112, 112)

    from dist_cosface.data.convert import ConvertOptions, convert

    opts = ConvertOptions(landmarks=str(marks), on_bad="stop", progress=False)
    with pytest.raises(ValueError, match=rf"{src}/yaleB0[12]/.*: (non-finite|no) landmarks"):
        convert(src, tmp_path / "stop", opts)
