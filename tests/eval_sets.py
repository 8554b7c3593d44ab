"""Helpers of the evaluation tests: the shared face data, a fixed pixel embedder and the
benchmark-format sets built from it.

The benchmark-format sets are built from ``../shared/data/yaleb`` by reference (file lists,
symlinks), never by copying images into the repository.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from torch import nn

from dist_cosface.align import template
from dist_cosface.eval.bin_file import write_bin

REPO = Path(__file__).resolve().parents[1]


def yaleb() -> Path:
    """The Extended Yale B folder, or skip (``DIST_COSFACE_SHARED_DATA`` overrides the root)."""
    root = Path(os.environ.get("DIST_COSFACE_SHARED_DATA", REPO / "../shared/data"))
    folder = root / "yaleb"
    if not folder.is_dir():
        pytest.skip(f"{folder} absent: the shared face data is expected beside the repo clone")
    return folder


def pixel_backbone() -> nn.Module:
    """A parameter-free embedder (8x8 average-pooled pixels): deterministic on every rank."""
    return nn.Sequential(nn.AdaptiveAvgPool2d(8), nn.Flatten())


def numpy_normalize(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def numpy_tar_at_far(genuine: np.ndarray, impostor: np.ndarray, far: float) -> float:
    """Brute force: try every impostor score as threshold, keep the lowest with FAR <= far."""
    best = np.inf
    for t in np.unique(impostor):
        if np.mean(impostor > t) <= far:
            best = min(best, t)
    return float(np.mean(genuine > best))


def png_bytes(pixels: np.ndarray) -> bytes:
    """``pixels`` (HxWx3, 0..255) encoded as PNG."""
    buf = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def yaleb_bin(path):
    """21 pairs (11 same, 10 different) of Yale B images, alternating, as a .bin."""
    data = yaleb()
    folders = sorted(data.iterdir())[:8]
    images, issame = [], []
    for i in range(21):
        a = sorted(folders[i % 8].iterdir())
        b = a if i % 2 == 0 else sorted(folders[(i + 3) % 8].iterdir())
        images += [a[i].read_bytes(), b[i + 20].read_bytes()]
        issame.append(i % 2 == 0)
    return write_bin(path, images, issame)


def build_ijb_set(root, data, nan_template=None):
    """Write ``root/meta/ijbx_*`` and ``root/loose_crop``; returns the expected structure."""
    gen = np.random.default_rng(3)
    (root / "meta").mkdir(parents=True)
    (root / "loose_crop").mkdir()
    pose = template(112) * 1.4 + np.array([4.0, 14.0])  # roughly where yaleb faces sit
    tid_mid, marks, csv_rows = [], [], {}
    image = 0
    for ident in range(1, 7):
        files = sorted((data / f"yaleB{ident:02d}").iterdir())[::5][:12]
        for j in range(3):
            tid = 100 + 3 * ident + j
            for m in range(2):
                for path in files[4 * j + 2 * m : 4 * j + 2 * m + 2]:
                    image += 1
                    name = f"{image}.jpg"
                    (root / "loose_crop" / name).symlink_to(path)
                    tid_mid.append(f"{name} {tid} {1000 + 10 * tid + m}")
                    pts = pose + gen.normal(0, 1.5, size=(5, 2))
                    if image == 5 or tid == nan_template:
                        pts[0, 0] = np.nan  # an image alignment must skip
                    score = gen.uniform(0.3, 1.0)
                    marks.append(f"{name} " + " ".join(f"{v:.4f}" for v in pts.ravel()))
                    marks[-1] += f" {score:.4f}"
                    csv_rows.setdefault(tid, []).append((ident, name))
    templates = sorted(csv_rows)
    subject = {t: csv_rows[t][0][0] for t in templates}
    pairs = [
        f"{a} {b} {int(subject[a] == subject[b])}"
        for i, a in enumerate(templates)
        for b in templates[i + 1 :]
    ]
    write = lambda name, lines: (root / "meta" / name).write_text("\n".join(lines) + "\n")  # noqa: E731
    write("ijbx_face_tid_mid.txt", tid_mid)
    write("ijbx_name_5pts_score.txt", marks)
    write("ijbx_template_pair_label.txt", pairs)

    def csv_lines(ts):
        rows = ["TEMPLATE_ID,SUBJECT_ID,FILENAME"]
        rows += [f"{t},{s},{n}" for t in ts for s, n in csv_rows[t]]
        return rows

    g1 = [t for t in templates if t % 3 == 0 and subject[t] <= 3]
    g2 = [t for t in templates if t % 3 == 0 and subject[t] > 3]
    write("ijbx_1N_gallery_G1.csv", csv_lines(g1))
    write("ijbx_1N_gallery_G2.csv", csv_lines(g2))
    write("ijbx_1N_probe_mixed.csv", csv_lines([t for t in templates if t % 3 != 0]))
    return {"subject": subject, "g1": g1, "g2": g2}


def build_megaface_set(root, data):
    """5 probe identities (symlinked Yale B images) and a list of 150 distractor images."""
    probes = root / "probes"
    for i in range(1, 6):
        ident = probes / f"yaleB{i:02d}"
        ident.mkdir(parents=True)
        for path in sorted((data / f"yaleB{i:02d}").iterdir())[::10][:6]:
            (ident / path.name).symlink_to(path)
    lines = []
    for i in range(20, 40):
        folder = data / f"yaleB{i:02d}"
        if folder.is_dir():
            lines.extend(str(p) for p in sorted(folder.iterdir())[:8])
    distractors = root / "distractors.txt"
    distractors.write_text("\n".join(lines[:150]) + "\n")
    return probes, distractors


def build_ytf_set(root, data):
    """10 identities x 2 videos of 5 frames; 40 pairs in YTF splits.txt form, 4 per split."""
    frames = root / "frames"
    for ident in range(1, 11):
        files = sorted((data / f"yaleB{ident:02d}").iterdir())[::6]
        for video in range(2):
            folder = frames / f"yaleB{ident:02d}" / str(video)
            folder.mkdir(parents=True)
            for j, path in enumerate(files[5 * video : 5 * video + 5]):
                (folder / f"{j}.jpg").symlink_to(path)
    lines = ["split number, pair id, first name, second name, dist, is same"]
    for i in range(40):
        a = 1 + i % 10
        b = a if i % 2 == 0 else 1 + (i * 3 + 1) % 10
        b = b if i % 2 == 0 or b != a else 1 + a % 10
        lines.append(f"{1 + i // 4}, {i + 1}, yaleB{a:02d}/0, yaleB{b:02d}/1, 0.0, {int(a == b)}")
    (root / "splits.txt").write_text("\n".join(lines) + "\n")
    return root / "splits.txt", frames
