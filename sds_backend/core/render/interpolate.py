"""Attribute interpolation and texture lookup: the `interpolate` and `texture` primitives."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .rasterize import Rasterization, pixel_corners

_TEXTURE_FILTERS = ("bilinear", "nearest")


def interpolate(attr: torch.Tensor, rast: Rasterization, faces: torch.Tensor) -> torch.Tensor:
    """Interpolate per-vertex attributes at the visible surface of every pixel.

    attr   float [V, C] (shared by the batch) or [B, V, C]; gradients flow to it and, through
           the barycentrics, to the clip-space vertices given to `rasterize`
    rast   Rasterization from `rasterize`
    faces  int [F, 3] indices into attr's V axis; row f must correspond to the face f that was
           rasterized (it may index a different vertex array, e.g. UV faces split at seams)
    ->     float [B, H, W, C]; zero where no triangle covers the pixel (and zero gradient there)
    """
    if not isinstance(attr, torch.Tensor) or not attr.is_floating_point():
        raise TypeError(f"attr: expected a float tensor [V, C] or [B, V, C], got {getattr(attr, 'dtype', type(attr).__name__)}")
    if attr.ndim == 2:
        attr = attr[None]
    if attr.ndim != 3 or attr.shape[0] not in (1, rast.batch):
        raise ValueError(f"attr: expected shape [V, C] or [{rast.batch}, V, C], got {list(attr.shape)}")
    if faces.ndim != 2 or faces.shape[1] != 3:
        raise ValueError(f"faces: expected shape [F, 3], got {list(faces.shape)}")
    if rast.triangles.numel() and int(rast.triangles.max()) >= faces.shape[0]:
        raise ValueError(f"faces has {faces.shape[0]} rows but the rasterization references face {int(rast.triangles.max())}")
    return to_image(interpolate_pixels(attr, rast, faces), rast)


def interpolate_pixels(attr: torch.Tensor, rast: Rasterization, faces: torch.Tensor) -> torch.Tensor:
    """`interpolate` over the covered pixels only: float [C, P] in the order of rast.pixels.

    attr is [1 or B, V, C], checked by the caller. Shading code works on these compact arrays
    and makes an image once.
    """
    attr_batch, num_vertices, channels = attr.shape
    corners = pixel_corners(faces, rast.triangles, rast.pixel_batch() if attr_batch > 1 else None, num_vertices)
    table = attr.reshape(-1, channels).t().contiguous()                         # [C, attr_batch * V]
    bary = rast.bary.to(table.dtype).unbind(0)                                   # 3 x [P]
    at_corner = [table.index_select(1, corners[k]) for k in range(3)]           # each [C, P]
    return torch.addcmul(torch.addcmul(at_corner[0] * bary[0], at_corner[1], bary[1]), at_corner[2], bary[2])  # sum_k


def texture(tex: torch.Tensor, uv: torch.Tensor, filter: str = "bilinear") -> torch.Tensor:
    """Look up a texture at UV coordinates.

    tex     float [B, Ht, Wt, C] or [1, Ht, Wt, C] (shared); row 0 is v = 1 (image order);
            gradients flow to it (and to uv with "bilinear")
    uv      float [B, H, W, 2] in [0, 1], u right, v up; coordinates outside clamp to the border
    filter  "bilinear" or "nearest"
    ->      float [B, H, W, C]
    Texel centres sit at ((i + 0.5) / Wt, 1 - (j + 0.5) / Ht). No mip-mapping: when a pixel
    covers many texels, render the texture at a matching resolution instead.
    """
    if filter not in _TEXTURE_FILTERS:
        raise ValueError(f"filter: expected one of {_TEXTURE_FILTERS}, got {filter!r}")
    if tex.ndim != 4:
        raise ValueError(f"tex: expected shape [B, Ht, Wt, C], got {list(tex.shape)}")
    if uv.ndim != 4 or uv.shape[-1] != 2:
        raise ValueError(f"uv: expected shape [B, H, W, 2], got {list(uv.shape)}")
    if tex.shape[0] not in (1, uv.shape[0]):
        raise ValueError(f"tex batch {tex.shape[0]} must be 1 or match uv batch {uv.shape[0]}")
    grid = torch.stack([uv[..., 0] * 2 - 1, 1 - uv[..., 1] * 2], -1).to(tex.dtype)
    image = tex.permute(0, 3, 1, 2).expand(uv.shape[0], -1, -1, -1)
    sampled = F.grid_sample(image, grid, mode=filter, padding_mode="border", align_corners=False)
    return sampled.permute(0, 2, 3, 1)


def sample_pixels(tex: torch.Tensor, uv: torch.Tensor, rast: Rasterization, filter: str = "bilinear") -> torch.Tensor:
    """`texture` over the covered pixels only: uv float [2, P] -> float [C, P]."""
    grid = torch.stack([uv[0] * 2 - 1, 1 - uv[1] * 2], -1).to(tex.dtype)           # [P, 2]
    image = tex.permute(0, 3, 1, 2)
    if tex.shape[0] == 1:
        sampled = F.grid_sample(image, grid[None, None], mode=filter, padding_mode="border", align_corners=False)
        return sampled[0, :, 0]
    # one texture per batch item: pixels are sorted by batch, so each item is one slice
    height, width = rast.resolution
    bounds = torch.searchsorted(rast.pixels, torch.arange(rast.batch + 1, device=uv.device) * (height * width)).tolist()
    return torch.cat([F.grid_sample(image[b:b + 1], grid[None, None, bounds[b]:bounds[b + 1]], mode=filter,
                                    padding_mode="border", align_corners=False)[0, :, 0]
                      for b in range(rast.batch)], 1)


def to_image(values: torch.Tensor, rast: Rasterization, background: torch.Tensor | float = 0.0) -> torch.Tensor:
    """Per-pixel values [C, P] -> image [B, H, W, C] with `background` ([C] or scalar) elsewhere.

    The image is a view of channel-first memory [C, B, H, W]: `antialias` reads it as [C, pixels]
    without a copy.
    """
    channels = values.shape[0]
    background = torch.as_tensor(background, dtype=values.dtype, device=values.device).reshape(-1, 1)
    dense = background.expand(channels, rast.num_pixels).index_copy(1, rast.pixels, values)
    return dense.view(channels, rast.batch, *rast.resolution).permute(1, 2, 3, 0)
