"""PNG files from and to Blender pixel buffers (no bpy): the shared png module plus Blender's row order.

`write_png`: `Image.save_render` would apply the scene's view transform and `Image.save` changes
the image's own file path, so outputs are written from the pixels directly (exact bytes, the
image datablock untouched), atomically.

`read_png`: decodes the unfiltered 8-bit PNGs the backend writes, so the bridge's reader thread
decodes a texture before the main thread sees it; it returns None for any other PNG, and the
caller lets Blender decode that file on the main thread.
"""
from __future__ import annotations

from pathlib import Path

from . import paths


def write_png(path: str | Path, pixels, width: int, height: int, channels: int, alpha: bool = False) -> Path:
    """pixels: float [height * width * channels] in Blender order (row 0 = bottom) -> PNG (row 0 = top)."""
    import numpy as np

    data = np.asarray(pixels, dtype=np.float32).reshape(height, width, channels)[::-1]
    keep = 4 if alpha and channels == 4 else 3
    image = (np.clip(data[..., :keep], 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    return paths.shared("files").atomic_write(Path(path), paths.shared("png").encode(image, level=6))


def read_png(path: str | Path):
    """-> (width, height, float32 RGBA pixels in Blender order, row 0 = bottom), or None when the
    file needs Blender's decoder. Raises OSError/ValueError for a file that is not a valid PNG."""
    import numpy as np

    image = paths.shared("png").decode(Path(path).read_bytes())
    if image is None:
        return None
    height, width, channels = image.shape
    pixels = np.empty((height, width, 4), dtype=np.float32)
    np.multiply(image[::-1], np.float32(1.0 / 255.0), out=pixels[..., :channels])
    if channels == 3:
        pixels[..., 3] = 1.0
    return width, height, pixels.reshape(-1)
