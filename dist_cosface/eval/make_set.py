"""Build a balanced verification ``.bin`` from an image-folder dataset."""

from __future__ import annotations

import random
from pathlib import Path

from dist_cosface.eval.bin_file import write_bin
from dist_cosface.imageio import is_image_file


def _list_identities(image_folder: Path, identities: list[str] | None) -> dict[str, list[Path]]:
    if not image_folder.is_dir():
        raise ValueError(f"image folder not found: {image_folder}")
    names = sorted(set(identities)) if identities is not None else None
    if names is None:
        names = sorted(p.name for p in image_folder.iterdir() if p.is_dir())
    found = {}
    for name in names:
        folder = image_folder / name
        if not folder.is_dir():
            raise ValueError(f"{image_folder}: identity folder {name!r} not found")
        files = sorted(p for p in folder.iterdir() if is_image_file(p))
        if files:
            found[name] = files
    return found


def sample_pairs(by_id: dict[str, list], num_pairs: int, rng: random.Random) -> list[tuple]:
    """Alternating same / different pairs of items (paths or encoded images) per identity."""
    multi = [n for n, files in by_id.items() if len(files) >= 2]
    names = list(by_id)
    if not multi or len(names) < 2:
        raise ValueError("need >= 2 identities and one with >= 2 images to build pairs")
    pairs = []
    for k in range(num_pairs):
        if k % 2 == 0:  # alternate same / different so any prefix stays balanced
            a, b = rng.sample(by_id[rng.choice(multi)], 2)
            pairs.append((a, b, True))
        else:
            n1, n2 = rng.sample(names, 2)
            pairs.append((rng.choice(by_id[n1]), rng.choice(by_id[n2]), False))
    return pairs


def make_verification_set(
    image_folder: str | Path,
    out_path: str | Path,
    num_pairs: int,
    seed: int,
    identities: list[str] | None = None,
) -> Path:
    """Write a balanced ``.bin`` of ``num_pairs`` pairs from ``image_folder/<identity>/*``.

    Same pairs are two distinct images of one identity, different pairs two images of two
    identities; ``identities`` restricts sampling (e.g. to identities held out of training).
    The image files' encoded bytes are stored as they are (no re-encoding).
    """
    if num_pairs < 2:
        raise ValueError(f"num_pairs must be >= 2, got {num_pairs}")
    by_id = _list_identities(Path(image_folder), identities)
    try:
        pairs = sample_pairs(by_id, num_pairs, random.Random(seed))
    except ValueError as exc:
        raise ValueError(f"{image_folder}: {exc}") from exc
    images = [p.read_bytes() for a, b, _ in pairs for p in (a, b)]
    return write_bin(out_path, images, [same for _, _, same in pairs])
