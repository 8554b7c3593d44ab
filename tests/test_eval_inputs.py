"""Benchmark inputs a careless or hostile user may give: every value checked, every error
naming the file (and line or entry); nothing used silently in part.

MegaFace distractor shard sets and lists, YTF pair lists, and images that declare more pixels
than the documented cap (IJB meta values: tests/test_eval_ijb.py).
"""

from __future__ import annotations

import shutil
import struct
import zlib

import pytest

from dist_cosface.eval.embedding import load_image
from dist_cosface.eval.images import ImageRef, list_distractors
from dist_cosface.eval.ytf_pairs import frame_refs, read_video_pairs
from dist_cosface.imageio import MAX_IMAGE_PIXELS, decode_image
from tests.data_common import jpeg_bytes, unique_label_dataset
from tests.eval_sets import build_ytf_set, yaleb

UTF8 = r": not UTF-8 text \(byte 0x{:02x} on line {}\)"

# ---- MegaFace distractors -------------------------------------------------------------------


@pytest.fixture(scope="module")
def distractor_shards(tmp_path_factory):
    """64 samples in one shard, as ``dist-cosface shards`` lays them out."""
    out = tmp_path_factory.mktemp("mf") / "shards"
    unique_label_dataset(out, 64, shard_size=64)
    return out


def _index_edit(fn):
    def edit(idx):
        lines = idx.read_text().splitlines()
        idx.write_text("\n".join(fn(lines)) + "\n")

    return edit


def _field(line_no: int, position: int, value: str):
    """Index line ``line_no`` (0 = header) with field ``position`` replaced."""

    def fn(lines):
        fields = lines[line_no].split()
        fields[position] = value
        lines[line_no] = " ".join(fields)
        return lines

    return _index_edit(fn)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        # the index lists 10 of the 64 samples the tar holds (header agrees with the lines)
        (_index_edit(lambda ls: ["v1.2 10", *ls[1:11]]), r"shard-000000.tar: member .* follows"),
        (_field(5, 1, "zz"), r"shard-000000.idx:6: entry 'jpg zz \d+ 000004.jpg' is not"),
        (_field(5, 2, str(10**15)), r"shard-000000.tar: truncated tar \(\d+ bytes, index needs"),
        (lambda idx: idx.unlink(), r"shard-000000.tar: shard or its index shard-000000.idx is"),
    ],
)
def test_distractor_shard_set_that_would_lose_samples_is_an_error(
    distractor_shards, tmp_path, edit, message
):
    assert len(list_distractors(distractor_shards)) == 64
    copy = tmp_path / "shards"
    shutil.copytree(distractor_shards, copy)
    edit(copy / "shard-000000.idx")
    with pytest.raises(ValueError, match=message):
        list_distractors(copy)


def test_image_range_past_the_end_of_its_file_is_an_error(distractor_shards):
    tar = distractor_shards / "shard-000000.tar"
    with pytest.raises(ValueError, match=rf"^{tar}@512: {10**15} bytes at offset 512 run past"):
        ImageRef(tar, 512, 10**15).read_bytes()


def test_distractor_list_that_is_not_utf8_names_file_and_line(tmp_path):
    image = tmp_path / "a.jpg"
    image.write_bytes(jpeg_bytes(0))
    listing = tmp_path / "list.txt"
    listing.write_bytes(b"a.jpg\n\xe9t\xe9.jpg\n")
    with pytest.raises(ValueError, match=f"^{listing}{UTF8.format(0xE9, 2)}; save the image list"):
        list_distractors(listing)


# ---- images declaring too many pixels ---------------------------------------------------------


def png_declaring(width: int, height: int) -> bytes:
    """A PNG of a few dozen bytes whose header declares ``width x height`` RGB pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b""))
        + chunk(b"IEND", b"")
    )


@pytest.mark.parametrize(
    ("side", "message"),
    [
        (30000, r"image declares more than the 67,108,864 \(8192x8192\) pixels"),  # Pillow refuses
        (9000, r"image declares 9000x9000 pixels, more than the 67,108,864"),  # under Pillow's
    ],
)
def test_image_over_the_pixel_cap_is_an_error_naming_it(tmp_path, side, message):
    assert MAX_IMAGE_PIXELS == 8192 * 8192
    path = tmp_path / "bomb.png"
    path.write_bytes(png_declaring(side, side))
    assert path.stat().st_size < 80
    with pytest.raises(ValueError, match=f"^{path}: {message}"):
        load_image(ImageRef(path), 32)
    with pytest.raises(ValueError, match=f"^x.png: {message}"):
        decode_image(path.read_bytes(), "x.png")


# ---- YTF ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ytf_set(tmp_path_factory):
    return build_ytf_set(tmp_path_factory.mktemp("ytf"), yaleb())


def test_ytf_pair_lists_are_checked(ytf_set, tmp_path):
    pairs_path, frames = ytf_set
    lines = pairs_path.read_text().splitlines()
    bad = tmp_path / "splits.txt"
    one_split = [lines[0]] + [",".join(["1", *line.split(",")[1:]]) for line in lines[1:]]
    bad.write_text("\n".join(one_split) + "\n")
    with pytest.raises(ValueError, match=rf"^{bad}: every pair is in split 1; cross-validation"):
        read_video_pairs(bad, frames)
    bad.write_text("\n".join([*lines[:5], "yaleB01/0 yaleB02/1 0", *lines[5:]]) + "\n")
    with pytest.raises(ValueError, match=rf"^{bad}:6: mixes the CSV and the"):
        read_video_pairs(bad, frames)
    bad.write_bytes(("\n".join(lines[:3]) + "\n").encode() + b"1, 3, yaleB\xff/0\n")
    with pytest.raises(ValueError, match=f"^{bad}{UTF8.format(0xFF, 4)}; save the pair list"):
        read_video_pairs(bad, frames)
    videos = read_video_pairs(pairs_path, frames).videos
    for max_frames in (0, -3):
        with pytest.raises(ValueError, match=f"max_frames must be >= 1, got {max_frames}"):
            frame_refs(videos, max_frames)
