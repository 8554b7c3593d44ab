"""Reading insightface/MXNet RecordIO packs (``.rec`` + ``.idx``) without MXNet.

Record layout: uint32 magic ``0xced7230a``; uint32 word whose top 3 bits are the continuation
flag (0 = whole record) and low 29 bits the payload length; the payload; zero padding to a
multiple of 4. An image payload starts with the IRHeader ``<IfQQ`` (flag, label, id, id2); when
flag > 0, ``flag`` float32 labels follow (the first is the class), then the encoded image.
The ``.idx`` file holds ``index<TAB>offset`` lines. In insightface packs record 0 is a header
whose flag > 0 and whose first label is the end of the image range: images are records
``1 .. int(label[0]) - 1``; records after that describe identities and are not images.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

MAGIC = 0xCED7230A
_HEADER = struct.Struct("<IfQQ")
_LENGTH_MASK = (1 << 29) - 1


@dataclass
class RecordImage:
    label: float
    image: bytes


def read_idx(idx_path: Path) -> dict[int, int]:
    """``index -> byte offset`` from a RecordIO ``.idx`` file."""
    offsets = {}
    for lineno, line in enumerate(Path(idx_path).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) != 2 or not parts[0].strip().isdigit() or not parts[1].strip().isdigit():
            raise ValueError(f"{idx_path}:{lineno}: expected 'index<TAB>offset', got {line!r}")
        offsets[int(parts[0])] = int(parts[1])
    if not offsets:
        raise ValueError(f"{idx_path}: no records listed")
    return offsets


def read_payload(f, offset: int, where: str) -> bytes:
    f.seek(offset)
    head = f.read(8)
    if len(head) < 8:
        raise ValueError(f"{where}: record at offset {offset} is past the end of the file")
    magic, word = struct.unpack("<II", head)
    if magic != MAGIC:
        raise ValueError(f"{where}: bad magic {magic:#x} at offset {offset}")
    cflag, length = word >> 29, word & _LENGTH_MASK
    if cflag != 0:
        raise ValueError(f"{where}: split record (cflag={cflag}) at offset {offset} unsupported")
    payload = f.read(length)
    if len(payload) < length:
        raise ValueError(f"{where}: record at offset {offset} is truncated")
    return payload


def unpack_image(payload: bytes, where: str) -> RecordImage:
    if len(payload) < _HEADER.size:
        raise ValueError(f"{where}: payload shorter than the IRHeader")
    flag, label, _, _ = _HEADER.unpack_from(payload)
    start = _HEADER.size
    if flag > 0:
        labels = struct.unpack_from(f"<{flag}f", payload, start)
        label, start = labels[0], start + 4 * flag
    return RecordImage(label=label, image=payload[start:])


def image_record_ids(rec_path: Path, offsets: dict[int, int]) -> list[int]:
    """Record ids holding images: the insightface header range if record 0 is a header."""
    if 0 not in offsets:
        return sorted(offsets)
    with open(rec_path, "rb") as f:
        payload = read_payload(f, offsets[0], f"{rec_path} record 0")
    flag, _, _, _ = _HEADER.unpack_from(payload)
    if flag == 0:
        return sorted(offsets)
    end = int(struct.unpack_from("<f", payload, _HEADER.size)[0])
    ids = [i for i in range(1, end) if i in offsets]
    if len(ids) != end - 1:
        raise ValueError(f"{rec_path}: header says images 1..{end - 1}, idx lists {len(ids)}")
    return ids
