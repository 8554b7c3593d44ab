"""Image lists of the identification benchmarks: identity folders, distractor sets.

An :class:`ImageRef` names one image wherever it lives (a file, or a byte range inside a
dist_cosface shard tar), optionally with its 5 landmarks; ``eval.embedding`` embeds lists of
them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from dist_cosface.configtools import read_utf8
from dist_cosface.data.dataset import open_shards
from dist_cosface.data.shards import MANIFEST_NAME, read_index
from dist_cosface.imageio import is_image_file


@dataclass(frozen=True)
class ImageRef:
    path: Path
    offset: int = -1  # >= 0: the image is bytes [offset, offset + size) of ``path`` (a tar)
    size: int = 0
    landmarks: tuple[float, ...] | None = None  # 10 numbers: x1 y1 ... x5 y5, or None

    def read_bytes(self) -> bytes:
        try:
            if self.offset < 0:
                return self.path.read_bytes()
            with open(self.path, "rb") as f:
                end = os.fstat(f.fileno()).st_size
                if self.offset + self.size > end:  # never allocate what the file cannot hold
                    raise ValueError(
                        f"{self}: {self.size} bytes at offset {self.offset} run past the end "
                        f"of the file ({end} bytes)"
                    )
                f.seek(self.offset)
                data = f.read(self.size)
        except OSError as exc:
            raise ValueError(f"{self.path}: cannot read image: {exc}") from exc
        if len(data) != self.size:
            raise ValueError(f"{self.path}: truncated at offset {self.offset}")
        return data

    def __str__(self) -> str:
        return str(self.path) if self.offset < 0 else f"{self.path}@{self.offset}"


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and is_image_file(p))


def list_identity_folders(root: str | Path) -> tuple[list[ImageRef], list[int], list[str]]:
    """``root/<identity>/<image>`` -> (images, identity index per image, identity names)."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"{root}: probe set is not a folder")
    refs, labels, names = [], [], []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        images = _images_in(folder)
        if images:
            labels.extend([len(names)] * len(images))
            refs.extend(ImageRef(p) for p in images)
            names.append(folder.name)
    if not refs:
        raise ValueError(f"{root}: no identity folders with images")
    return refs, labels, names


def read_lines(path: str | Path, what: str) -> list[str]:
    """The lines of a UTF-8 text file; ValueError naming the file (and the line of a byte that
    is not UTF-8)."""
    return read_utf8(path, what, ValueError).splitlines()


def _read_file_list(path: Path) -> list[ImageRef]:
    """One image path per line (relative to the list's folder); blank and '#' lines skipped."""
    refs = []
    for lineno, line in enumerate(read_lines(path, "image list"), start=1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        image = path.parent / text
        if not image.is_file():
            raise ValueError(f"{path}:{lineno}: image {text!r} not found")
        refs.append(ImageRef(image))
    return refs


def _read_shard_set(folder: Path) -> list[ImageRef]:
    """Every sample's image of a dist_cosface shard set, after the checks the training
    loaders run (each index against its tar and the manifest): a shard set that would lose
    samples is an error naming the shard, never a smaller distractor set."""
    shards = open_shards(str(folder), on_bad="stop")
    refs = []
    for url, index_path in zip(shards.urls, shards.index_paths):
        for entry in read_index(Path(index_path)):
            ext = (
                shards.manifest.image_ext if shards.manifest.image_ext in entry.components else None
            )
            ext = ext or next((e for e in entry.components if e != "cls"), None)
            if ext is None:
                raise ValueError(f"{index_path}: sample {entry.key} has no image")
            offset, size = entry.components[ext]
            refs.append(ImageRef(Path(url), offset, size))
    return refs


def list_distractors(source: str | Path) -> list[ImageRef]:
    """A flat image folder, a text file listing images, or a dist_cosface shard set."""
    source = Path(source)
    if source.is_file():
        refs = _read_file_list(source)
    elif (source / MANIFEST_NAME).is_file():
        refs = _read_shard_set(source)
    elif source.is_dir():
        refs = [ImageRef(p) for p in _images_in(source)]
    else:
        raise ValueError(f"{source}: distractor set not found")
    if not refs:
        raise ValueError(f"{source}: empty distractor set (no images)")
    return refs
