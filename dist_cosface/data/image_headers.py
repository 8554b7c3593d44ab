"""Cheap structural checks of encoded images, for a decoder that cannot skip a bad one.

DALI's image decoder fails the whole batch on an image it cannot parse, and DALI 2.4 can
crash the process (SIGSEGV) when that parse runs on one of its pool threads, so the
DALI loader checks every image here before the decoder sees it. Only the bytes at segment or
chunk boundaries are read (a few microseconds an image): the image data itself is left to the
decoder. A check passes what both Pillow and DALI decode: the formats of
``dist_cosface.imageio.IMAGE_EXTENSIONS``, recognised by their leading bytes.

JPEG and PNG are also checked for completeness (the end-of-image marker after the first scan,
the IEND chunk), so a truncated or zero-filled image is refused as Pillow refuses it.
"""

from __future__ import annotations

import struct
import zlib

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# SOFn markers (frame headers); C4 (DHT), C8 (JPG) and CC (DAC) share the range
_JPEG_FRAMES = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_JPEG_STANDALONE = frozenset([0x01, *range(0xD0, 0xD8)])  # TEM, RSTn: no length field
_JPEG_SPECIAL = _JPEG_STANDALONE | {0x00, 0xD8, 0xD9, 0xFF}  # no segment follows these
_SEGMENT = struct.Struct(">BBH")  # 0xFF, marker, segment length
_FRAME = struct.Struct(">BHHB")  # SOFn body: precision, height, width, components


def header_problem(data: bytes) -> str:
    """'' when ``data`` is a structurally sound image of a known format, else the problem."""
    head = data[:12]
    if head[:2] == b"\xff\xd8":
        return _jpeg_problem(data)
    if head[:8] == PNG_SIGNATURE:
        return _png_problem(data)
    if head[:1] == b"P" and head[1:2] in (b"1", b"2", b"3", b"4", b"5", b"6"):
        return _pnm_problem(data)
    if head[:2] == b"BM":
        return _bmp_problem(data)
    if head[:4] in (b"II*\0", b"MM\0*"):
        order = "little" if head[:2] == b"II" else "big"
        first_ifd = int.from_bytes(head[4:8], order)
        return "" if 8 <= first_ifd <= len(data) - 2 else "TIFF: first IFD outside the file"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        riff_end = 8 + int.from_bytes(head[4:8], "little")
        return "" if riff_end <= len(data) else "WebP: shorter than its RIFF header says"
    return f"not a known image format (starts with {bytes(head[:8])!r})"


def _jpeg_problem(data: bytes) -> str:
    """Walk the marker segments from SOI to the first scan, then look for EOI."""
    i, end, frame = 2, len(data), False
    unpack = _SEGMENT.unpack_from
    while i + 4 <= end:
        ff, marker, length = unpack(data, i)  # the common case first: one call a segment
        if ff != 0xFF:
            return f"JPEG: no marker at byte {i} (0x{ff:02x})"
        if marker in _JPEG_SPECIAL:
            if marker == 0xFF:  # fill byte before a marker
                i += 1
                continue
            if marker in _JPEG_STANDALONE:
                i += 2
                continue
            return f"JPEG: unexpected marker FF{marker:02X} at byte {i}"
        if length < 2 or i + 2 + length > end:
            return f"JPEG: segment FF{marker:02X} at byte {i} runs past the end"
        if marker == 0xDA:  # start of scan: entropy-coded data follows
            if not frame:
                return f"JPEG: scan before a frame header at byte {i}"
            # the end-of-image marker FFD9 cannot occur inside entropy-coded data (0xFF is
            # followed by 00 or RSTn there); searched from the end, so a complete image costs
            # one comparison (trailing bytes after it are allowed)
            if data.rfind(b"\xff\xd9", i + 2 + length) < 0:
                return "JPEG: no end-of-image marker (truncated or overwritten)"
            return ""
        if marker in _JPEG_FRAMES:
            _, height, width, components = _FRAME.unpack_from(data, i + 4)
            if length < 11 or not height or not width or components not in (1, 3, 4):
                return f"JPEG: bad frame header at byte {i}"
            frame = True
        i += 2 + length
    return "JPEG: header ends before the image data"


def _png_problem(data: bytes) -> str:
    """Chunk chain from IHDR (CRC checked) to IEND."""
    i, end = 8, len(data)
    while i + 12 <= end:
        length = int.from_bytes(data[i : i + 4], "big")
        kind = bytes(data[i + 4 : i + 8])
        if i + 12 + length > end:
            return f"PNG: chunk {kind!r} at byte {i} runs past the end"
        if i == 8:
            body = data[i + 4 : i + 8 + length]
            crc = int.from_bytes(data[i + 8 + length : i + 12 + length], "big")
            if kind != b"IHDR" or length != 13 or zlib.crc32(body) != crc:
                return "PNG: bad IHDR chunk"
            if not int.from_bytes(data[16:20], "big") or not int.from_bytes(data[20:24], "big"):
                return "PNG: zero width or height"
        if kind == b"IEND":
            return ""
        i += 12 + length
    return "PNG: no IEND chunk (truncated)"


def _pnm_problem(data: bytes) -> str:
    """Header tokens (comments skipped), then enough bytes for the binary kinds."""
    kind = data[1] - ord("0")
    fields, i, end = [], 2, min(len(data), 1024)
    while len(fields) < (2 if kind in (1, 4) else 3):
        while i < end and data[i : i + 1].isspace():
            i += 1
        if data[i : i + 1] == b"#":
            while i < end and data[i] not in (10, 13):
                i += 1
            continue
        start = i
        while i < end and data[i : i + 1].isdigit():
            i += 1
        if start == i:
            return "PNM: unreadable header"
        fields.append(int(data[start:i]))
    width, height = fields[0], fields[1]
    maxval = fields[2] if len(fields) > 2 else 1
    if not width or not height or not 0 < maxval < 65536:
        return f"PNM: bad header values {fields}"
    if kind < 4:
        return ""
    per_row = (width + 7) // 8 if kind == 4 else width * (1 if kind == 5 else 3)
    need = per_row * height * (2 if maxval > 255 else 1)
    return "" if len(data) - (i + 1) >= need else "PNM: fewer pixel bytes than the header says"


def _bmp_problem(data: bytes) -> str:
    if len(data) < 26:
        return "BMP: header cut short"
    pixels = int.from_bytes(data[10:14], "little")
    dib = int.from_bytes(data[14:18], "little")
    if dib not in (12, 40, 52, 56, 64, 108, 124) or not 14 + dib <= pixels < len(data):
        return "BMP: bad header"
    return ""
