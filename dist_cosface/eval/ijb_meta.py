"""IJB-B / IJB-C meta files: the images of every template with their landmarks, detector
scores and media, the 1:1 template pairs and the 1:N galleries and probes.

Files read under ``ROOT`` for a set named ``NAME`` (``ijbb`` or ``ijbc``), the layout of the
widely used pre-processed release (see docs/evaluation.md):

* ``meta/NAME_face_tid_mid.txt``: ``image template_id media_id`` per line
* ``meta/NAME_name_5pts_score.txt``: ``image x1 y1 ... x5 y5 detector_score`` per line
* ``meta/NAME_template_pair_label.txt``: ``template_1 template_2 label`` (1 same, 0 different)
* ``loose_crop/<image>``: the face crops the landmarks refer to
* 1:N (optional): ``meta/NAME_1N_gallery_G1.csv``, ``meta/NAME_1N_gallery_G2.csv``,
  ``meta/NAME_1N_probe_mixed.csv``: CSV with a header naming ``TEMPLATE_ID`` and ``SUBJECT_ID``
  columns (others ignored), one row per image.

Every error names the file and line.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dist_cosface.eval.images import ImageRef, read_lines

MAX_ID = 2**63 - 1  # ids are held in int64 arrays


@dataclass
class IJBSet:
    name: str
    images: list[ImageRef]
    templates: np.ndarray  # [N] template id of each image
    media: np.ndarray  # [N] media id of each image
    scores: np.ndarray  # [N] detector score of each image
    image_lines: list[str]  # "file:line" of each image's tid_mid entry, for errors
    pairs: np.ndarray  # [P, 2] template ids
    labels: np.ndarray  # [P] bool
    galleries: dict[str, dict[int, int]] = field(default_factory=dict)  # G1/G2: template->subject
    probes: dict[int, int] = field(default_factory=dict)  # template -> subject


def _rows(path: Path, fields: int, what: str):
    """(line number, fields) of a whitespace-separated meta file; wrong counts are errors."""
    for lineno, line in enumerate(read_lines(path, "IJB meta file"), start=1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != fields:
            raise ValueError(f"{path}:{lineno}: {len(parts)} fields, expected {fields} ({what})")
        yield lineno, parts


def _number(text: str, kind, where: str):
    try:
        return kind(text)
    except ValueError as exc:
        raise ValueError(f"{where}: {text!r} is not a valid number") from exc


def _id(text: str, where: str, what: str) -> int:
    """A template, media or subject id: an integer that fits the int64 arrays it is kept in."""
    value = _number(text, int, where)
    if not 0 <= value <= MAX_ID:
        raise ValueError(f"{where}: {what} {text} is not in [0, 2^63 - 1]")
    return value


def _read_landmarks(path: Path) -> dict[str, tuple[tuple[float, ...], float]]:
    """image -> (10 landmark coordinates, detector score).

    Non-finite landmarks are kept: alignment skips that image. The detector score (last
    column) is the face detector's confidence that the crop is a face, a probability; with
    ``--detector-score`` it multiplies the image's feature before media pooling, as in the
    usual IJB protocol code. NaN or infinity would poison the template's mean, a negative
    score would flip the feature: anything outside [0, 1] is an error.
    """
    table = {}
    for lineno, parts in _rows(path, 12, "image, 10 landmark coordinates, detector score"):
        where = f"{path}:{lineno}"
        if parts[0] in table:
            raise ValueError(f"{where}: image {parts[0]} listed twice")
        values = [_number(v, float, where) for v in parts[1:]]
        if not 0.0 <= values[10] <= 1.0:  # also false for NaN
            raise ValueError(f"{where}: detector score {parts[11]} is not in [0, 1]")
        table[parts[0]] = (tuple(values[:10]), values[10])
    return table


def _read_subjects(path: Path) -> dict[int, int]:
    """``TEMPLATE_ID`` -> ``SUBJECT_ID`` of a 1:N CSV (one row per image)."""
    out: dict[int, int] = {}
    reader = csv.reader(read_lines(path, "IJB 1:N CSV"))  # one row per line: no quoted newlines
    header = [h.strip().upper() for h in next(reader, [])]
    if "TEMPLATE_ID" not in header or "SUBJECT_ID" not in header:
        raise ValueError(f"{path}:1: header needs TEMPLATE_ID and SUBJECT_ID columns")
    t_col, s_col = header.index("TEMPLATE_ID"), header.index("SUBJECT_ID")
    for lineno, row in enumerate(reader, start=2):
        if not row:
            continue
        where = f"{path}:{lineno}"
        if len(row) != len(header):
            raise ValueError(f"{where}: {len(row)} fields, expected {len(header)}")
        template = _id(row[t_col], where, "template id")
        subject = _id(row[s_col], where, "subject id")
        if out.setdefault(template, subject) != subject:
            raise ValueError(f"{where}: template {template} has two subjects")
    if not out:
        raise ValueError(f"{path}: no templates")
    return out


def read_ijb(root: str | Path, name: str) -> IJBSet:
    """Read and cross-check the meta files (errors name the file and line)."""
    root = Path(root)
    meta = root / "meta"
    marks_path = meta / f"{name}_name_5pts_score.txt"
    tid_path = meta / f"{name}_face_tid_mid.txt"
    marks = _read_landmarks(marks_path)
    images, templates, media, scores, lines = [], [], [], [], []
    for lineno, (image, tid, mid) in _rows(tid_path, 3, "image, template id, media id"):
        where = f"{tid_path}:{lineno}"
        if image not in marks:
            raise ValueError(f"{where}: image {image} has no line in {marks_path}")
        path = root / "loose_crop" / image
        if not path.is_file():
            raise ValueError(f"{where}: image {path} not found")
        points, score = marks[image]
        images.append(ImageRef(path, landmarks=points))
        templates.append(_id(tid, where, "template id"))
        media.append(_id(mid, where, "media id"))
        scores.append(score)
        lines.append(where)
    if not images:
        raise ValueError(f"{tid_path}: no images")
    known = set(templates)
    pair_path = meta / f"{name}_template_pair_label.txt"
    pairs, labels = [], []
    for lineno, (t1, t2, label) in _rows(pair_path, 3, "template 1, template 2, label"):
        where = f"{pair_path}:{lineno}"
        pair = (_id(t1, where, "template id"), _id(t2, where, "template id"))
        unknown = [t for t in pair if t not in known]
        if unknown:
            raise ValueError(f"{where}: template {unknown[0]} is not in {tid_path}")
        if label not in ("0", "1"):
            raise ValueError(f"{where}: label {label!r} is not 0 or 1")
        pairs.append(pair)
        labels.append(label == "1")
    ijb = IJBSet(
        name,
        images,
        np.array(templates, dtype=np.int64),
        np.array(media, dtype=np.int64),
        np.array(scores, dtype=np.float64),
        lines,
        np.array(pairs, dtype=np.int64).reshape(-1, 2),
        np.array(labels, dtype=bool),
    )
    _read_1n(meta, name, known, ijb)
    return ijb


def _read_1n(meta: Path, name: str, known: set[int], ijb: IJBSet) -> None:
    probe_path = meta / f"{name}_1N_probe_mixed.csv"
    if not probe_path.is_file():
        return
    for gallery in ("G1", "G2"):
        path = meta / f"{name}_1N_gallery_{gallery}.csv"
        if path.is_file():
            ijb.galleries[gallery] = _read_subjects(path)
    ijb.probes = _read_subjects(probe_path)
    for source, table in [(probe_path, ijb.probes)] + [
        (meta / f"{name}_1N_gallery_{g}.csv", t) for g, t in ijb.galleries.items()
    ]:
        missing = sorted(set(table) - known)
        if missing:
            raise ValueError(f"{source}: template {missing[0]} is not in the face_tid_mid file")
