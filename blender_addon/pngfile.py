"""8-bit PNG files from and to Blender pixel buffers (stdlib zlib + numpy, no bpy).

`write_png`: `Image.save_render` would apply the scene's view transform and `Image.save` changes
the image's own file path, so outputs are written from the pixels directly (exact bytes, the
image datablock untouched).

`read_png`: decodes 8-bit RGB/RGBA, non-interlaced PNGs (what the backend writes) with zlib and
numpy, so the bridge's reader thread decodes a texture before the main thread sees it. Rows
filtered with None/Sub/Up are undone with whole-row numpy operations; Average and Paeth depend
on the pixel to the left, so those run as a wavefront over the image's anti-diagonals (every
pixel of a diagonal depends only on earlier diagonals), on a sheared copy where each diagonal is
one contiguous column. It returns None for other PNG flavours (palettes, 16 bit, interlacing)
and the caller lets Blender decode the file on the main thread.
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
    if filters.max(initial=0) > 4:
        raise ValueError(f"{path}: unknown PNG row filter {int(filters.max())}")
    if filters.max(initial=0) > 2:
        rows = _unfilter_wavefront(scan[:, 1:].reshape(height, width, bpp), filters).reshape(height, stride)
    else:
        rows = scan[:, 1:].copy()
    if filters.any() and filters.max() <= 2:
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


def _unfilter_wavefront(filtered, filters):
    """Undo any mix of PNG row filters. filtered: uint8 [H, W, bpp]; filters: uint8 [H] -> uint8 [H, W, bpp].

    Out[r, x] = Filtered[r, x] + predictor(left = Out[r, x-1], up = Out[r-1, x], up-left = Out[r-1, x-1])
    (mod 256), the predictor chosen per row: 0 none, 1 left, 2 up, 3 floor((left + up) / 2), 4 Paeth.
    Pixel (r, x) depends only on pixels of earlier anti-diagonals r + x, so each diagonal is one
    vectorised step. The work happens on a sheared buffer S[r + 1, r + x + 1] = Out[r, x] (row and
    column 0 are the zero border PNG assumes), where a diagonal is a column and its neighbours are
    plain slices; the shear is a strided view, not a copy.
    """
    import numpy as np
    from numpy.lib.stride_tricks import as_strided

    height, width, bpp = filtered.shape
    diagonals = height + width - 1
    item = np.dtype(np.int16).itemsize

    def sheared_view(buffer, offset_rows: int):
        # element (r, x, c) of the view is buffer[r + offset_rows, r + x + offset_rows, c]
        flat = buffer.reshape(-1)[offset_rows * (buffer.shape[1] + 1) * bpp:]
        return as_strided(flat, shape=(height, width, bpp),
                          strides=((buffer.shape[1] + 1) * bpp * item, bpp * item, item), writeable=True)

    source = np.zeros((height, diagonals, bpp), np.int16)      # source[r, r + x] = filtered[r, x]
    sheared_view(source, 0)[...] = filtered
    out = np.zeros((height + 1, diagonals + 1, bpp), np.int16)  # out[r + 1, r + x + 1] = Out[r, x]
    masks = [(filters == k).astype(np.int16)[:, None] for k in (1, 2, 3, 4)]
    for d in range(diagonals):
        r0, r1 = max(0, d - width + 1), min(height - 1, d) + 1
        left, up, up_left = out[r0 + 1:r1 + 1, d], out[r0:r1, d], out[r0:r1, d - 1]
        pa, pb, pc = np.abs(up - up_left), np.abs(left - up_left), np.abs(left + up - 2 * up_left)
        paeth = np.where((pa <= pb) & (pa <= pc), left, np.where(pb <= pc, up, up_left))
        m1, m2, m3, m4 = (m[r0:r1] for m in masks)
        predictor = m1 * left + m2 * up + m3 * ((left + up) >> 1) + m4 * paeth
        out[r0 + 1:r1 + 1, d + 1] = (source[r0:r1, d] + predictor) & 255
    return sheared_view(out, 1).astype(np.uint8)
