"""LFW-style ``pairs.txt`` verification sets (see :func:`load_pairs` for the line formats)."""

from __future__ import annotations

from pathlib import Path

from dist_cosface.eval.verification_set import VerificationSet


def _lfw_image(root: Path, name: str, index: str, pairs_path: Path, line_no: int) -> Path:
    try:
        number = int(index)
    except ValueError as exc:
        raise ValueError(f"{pairs_path}:{line_no}: image index {index!r} is not a number") from exc
    return root / name / f"{name}_{number:04d}.jpg"


def _parse_pair_line(parts: list[str], root: Path, pairs_path: Path, line_no: int):
    if len(parts) == 3 and parts[2] in ("0", "1") and not parts[1].isdigit():
        return root / parts[0], root / parts[1], parts[2] == "1"
    if len(parts) == 3:
        name, i, j = parts
        a = _lfw_image(root, name, i, pairs_path, line_no)
        return a, _lfw_image(root, name, j, pairs_path, line_no), True
    if len(parts) == 4:
        a = _lfw_image(root, parts[0], parts[1], pairs_path, line_no)
        return a, _lfw_image(root, parts[2], parts[3], pairs_path, line_no), False
    raise ValueError(f"{pairs_path}:{line_no}: cannot parse pair line {' '.join(parts)!r}")


def load_pairs(pairs_path: str | Path, image_root: str | Path | None = None) -> VerificationSet:
    """Read a pairs file; images are resolved under ``image_root`` (default: its folder).

    Accepted lines (whitespace separated; blank lines and ``#`` comments ignored):

    * ``name idx1 idx2`` -- same pair ``name/name_000<idx1>.jpg``, ``name/name_000<idx2>.jpg``
    * ``name1 idx1 name2 idx2`` -- different pair
    * ``path1 path2 label`` -- relative (or absolute) paths, label 1 same / 0 different
    * a first line of one or two integers (LFW's ``folds pairs_per_fold`` header) is skipped
    """
    pairs_path = Path(pairs_path)
    if not pairs_path.is_file():
        raise ValueError(f"pairs file not found: {pairs_path}")
    root = Path(image_root) if image_root is not None else pairs_path.parent
    images: list[bytes | Path] = []
    issame: list[bool] = []
    lines = pairs_path.read_text().splitlines()
    for line_no, line in enumerate(lines, start=1):
        parts = line.split("#", 1)[0].split()
        if not parts or (line_no == 1 and len(parts) <= 2 and all(p.isdigit() for p in parts)):
            continue
        a, b, same = _parse_pair_line(parts, root, pairs_path, line_no)
        for image in (a, b):
            if not image.is_file():
                raise ValueError(f"{pairs_path}:{line_no}: image not found: {image}")
        images += [a, b]
        issame.append(same)
    if not issame:
        raise ValueError(f"{pairs_path}: no pairs found")
    name = pairs_path.parent.name if pairs_path.name == "pairs.txt" else pairs_path.stem
    return VerificationSet(name, images, issame, str(pairs_path))
