"""8-bit PNG files from and to Blender pixel buffers (stdlib zlib + numpy, no bpy).

`write_png`: `Image.save_render` would apply the scene's view transform and `Image.save` changes
the image's own file path, so outputs are written from the pixels directly (exact bytes, the
image datablock untouched).

`read_png`: decodes the common case (8-bit RGB/RGBA, not interlaced, rows filtered with None,
Sub or Up) with numpy, so the bridge's reader thread can decode a texture before the main thread
sees it; zlib and the large numpy operations release the GIL. It returns None for anything else
(Average/Paeth rows, palettes, 16 bit, interlacing) and the caller lets Blender decode the file.
"""
from __future__ import annotations

import struct
import zlib
from pathlib import Path

SIGNATURE = b"\x89PNG\r\n\x1a\n"


def write_png(path: str | Path, pixels, width: int, height: int, channels: int, alpha: bool = False,
              row_filter: str = "none", level: int = 6) -> Path:
    """pixels: float [height * width * channels] in Blender order (row 0 = bottom) -> PNG (row 0 = top).

    row_filter: 'none' (type 0, what read_png decodes off the main thread) or 'paeth' (type 4, for tests).
    """
    import numpy as np

    if row_filter not in ("none", "paeth"):
        raise ValueError(f"row_filter must be 'none' or 'paeth', got {row_filter!r}")
    data = np.asarray(pixels, dtype=np.float32).reshape(height, width, channels)[::-1]
    keep = 4 if alpha and channels == 4 else 3
    rows = (np.clip(data[..., :keep], 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8).reshape(height, width * keep)
    if row_filter == "paeth":
        a = np.zeros_like(rows, dtype=np.int16)
        a[:, keep:] = rows[:, :-keep]
        b = np.zeros_like(a)
        b[1:] = rows[:-1]
        c = np.zeros_like(a)
        c[1:, keep:] = rows[:-1, :-keep]
        p = a + b - c
        pa, pb, pc = np.abs(p - a), np.abs(p - b), np.abs(p - c)
        predictor = np.where((pa <= pb) & (pa <= pc), a, np.where(pb <= pc, b, c))
        rows = ((rows.astype(np.int16) - predictor) % 256).astype(np.uint8)
    tag = 4 if row_filter == "paeth" else 0
    body = np.concatenate([np.full((height, 1), tag, np.uint8), rows], axis=1)

    def chunk(kind: bytes, content: bytes) -> bytes:
        return struct.pack(">I", len(content)) + kind + content + struct.pack(">I", zlib.crc32(kind + content) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 6 if keep == 4 else 2, 0, 0, 0)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(SIGNATURE + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(body.tobytes(), level))
                     + chunk(b"IEND", b""))
    return path


def read_png(path: str | Path):
    """-> (width, height, float32 RGBA pixels in Blender order, row 0 = bottom), or None when the
    file needs Blender's decoder. Raises OSError/ValueError for a file that is not a valid PNG."""
    import numpy as np

    data = Path(path).read_bytes()
    if not data.startswith(SIGNATURE):
        raise ValueError(f"{path} is not a PNG file")
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
        raise ValueError(f"{path} has no image data")
    width, height, depth, color, _, _, interlace = header
    if depth != 8 or color not in (2, 6) or interlace != 0:
        return None
    bpp = 3 if color == 2 else 4
    raw = zlib.decompress(b"".join(idat))
    stride = width * bpp
    if len(raw) != height * (stride + 1):
        raise ValueError(f"{path}: image data has {len(raw)} bytes, expected {height * (stride + 1)}")
    scan = np.frombuffer(raw, dtype=np.uint8).reshape(height, stride + 1)
    filters = scan[:, 0]
    if filters.max(initial=0) > 2:
        return None
    rows = scan[:, 1:].copy()
    if filters.any():
        if (filters == 2).all():
            np.cumsum(rows, axis=0, dtype=np.uint8, out=rows)          # Up everywhere: a running sum down
        else:
            for r in range(height):
                if filters[r] == 1:                                      # Sub: running sum along the row
                    np.cumsum(rows[r].reshape(width, bpp), axis=0, dtype=np.uint8,
                              out=rows[r].reshape(width, bpp))
                elif filters[r] == 2 and r > 0:                          # Up: add the row above
                    rows[r] += rows[r - 1]
    pixels = np.empty((height, width, 4), dtype=np.float32)
    np.multiply(rows.reshape(height, width, bpp)[::-1], np.float32(1.0 / 255.0), out=pixels[..., :bpp])
    if bpp == 3:
        pixels[..., 3] = 1.0
    return width, height, pixels.reshape(-1)
