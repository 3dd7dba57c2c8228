"""8-bit PNG files with unfiltered rows: what the backend writes and the add-on reads (numpy + stdlib).

Both processes use this module (the add-on through its shared subpackage). Every row is written
with filter type 0 (none): a little larger than filtered rows, but then decoding is one zlib call
and a reshape, which the add-on's reader thread does before Blender's main thread sees a texture.
`decode` returns None for any other PNG (filtered rows, palettes, 16 bit, interlacing); the
add-on then lets Blender decode the file.
"""
from __future__ import annotations

import struct
import zlib

import numpy as np

SIGNATURE = b"\x89PNG\r\n\x1a\n"
_COLOR_TYPES = {3: 2, 4: 6}            # channels -> PNG colour type (RGB, RGBA)


def _chunk(kind: bytes, content: bytes) -> bytes:
    return struct.pack(">I", len(content)) + kind + content + struct.pack(">I", zlib.crc32(kind + content) & 0xFFFFFFFF)


def encode(image: np.ndarray, level: int = 3) -> bytes:
    """uint8 [H, W, 3 or 4], row 0 at the top -> PNG bytes (unfiltered rows)."""
    image = np.ascontiguousarray(image, dtype=np.uint8)
    height, width, channels = image.shape
    rows = np.concatenate([np.zeros((height, 1), np.uint8), image.reshape(height, width * channels)], 1)
    header = struct.pack(">IIBBBBB", width, height, 8, _COLOR_TYPES[channels], 0, 0, 0)
    return (SIGNATURE + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(rows.tobytes(), level))
            + _chunk(b"IEND", b""))


def decode(data: bytes) -> np.ndarray | None:
    """PNG bytes -> uint8 [H, W, 3 or 4] (row 0 at the top) when every row is unfiltered 8-bit RGB(A),
    else None. ValueError for bytes that are not a well-formed PNG."""
    if not data.startswith(SIGNATURE):
        raise ValueError("not a PNG file")
    offset, header, idat = len(SIGNATURE), None, []
    while offset + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[offset:offset + 8])
        content = data[offset + 8:offset + 8 + length]
        offset += 12 + length
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", content)
        elif kind == b"IDAT":
            idat.append(content)
        elif kind == b"IEND":
            break
    if header is None or not idat:
        raise ValueError("the PNG has no image data")
    width, height, depth, color, _, _, interlace = header
    if depth != 8 or color not in (2, 6) or interlace != 0:
        return None
    channels = 3 if color == 2 else 4
    try:
        raw = zlib.decompress(b"".join(idat), bufsize=height * (width * channels + 1) + 1)
    except zlib.error as exc:
        raise ValueError(f"the PNG's image data cannot be decompressed: {exc}") from None
    if len(raw) != height * (width * channels + 1):
        raise ValueError(f"the PNG's image data has {len(raw)} bytes, expected {height * (width * channels + 1)}")
    rows = np.frombuffer(raw, dtype=np.uint8).reshape(height, width * channels + 1)
    if rows[:, 0].any():
        return None
    return rows[:, 1:].reshape(height, width, channels)
