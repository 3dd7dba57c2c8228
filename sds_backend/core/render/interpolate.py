"""Attribute interpolation and texture lookup: the `interpolate` and `texture` primitives."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .rasterize import Rasterization

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

    Shading code works on these compact arrays and densifies once; arguments are checked by
    `interpolate`'s callers (attr [1 or B, V, C]).
    """
    attr_batch, num_vertices, _ = attr.shape
    return interpolate_rows(channel_rows(attr), rast, faces, attr_batch, num_vertices)


def channel_rows(values: torch.Tensor) -> torch.Tensor:
    """[..., C] -> [C, N] channel-first rows (N = the product of the leading sizes); differentiable.

    Stacked channel by channel: a permuting copy of a [N, 3] array is several times slower on
    CPU, forward and backward.
    """
    return torch.stack(values.reshape(-1, values.shape[-1]).unbind(1))


def interpolate_rows(table: torch.Tensor, rast: Rasterization, faces: torch.Tensor, attr_batch: int,
                     num_vertices: int) -> torch.Tensor:
    """`interpolate_pixels` from channel-first vertex attributes table [C, attr_batch * V] -> [C, P]."""
    corner = rast.corner_vertices(faces, attr_batch, num_vertices)                      # [3, P]
    return _Interpolate.apply(table, corner, rast.bary.to(table.dtype))


class _Interpolate(torch.autograd.Function):
    """sum_k table[:, corner[k]] * bary[k], [C, P], with gradients for the table and the bary.

    Written out because autograd of three gathers, products and the bary rows it selects
    builds a dozen nodes, each filling a zero buffer of its input's size; this backward fills
    one per input.
    """

    @staticmethod
    def forward(ctx, table, corner, bary):
        gathered = table.new_empty(3, *table.shape[:-1], corner.shape[1])               # [3, C, P]
        for k in range(3):
            torch.index_select(table, 1, corner[k], out=gathered[k])
        ctx.save_for_backward(corner, bary, gathered)
        ctx.num_rows = table.shape[1]
        values = gathered[0] * bary[0]
        values = torch.addcmul(values, gathered[1], bary[1])
        return torch.addcmul(values, gathered[2], bary[2])

    @staticmethod
    def backward(ctx, grad):
        corner, bary, gathered = ctx.saved_tensors
        grad_table = grad_bary = None
        if ctx.needs_input_grad[0]:
            grad_table = grad.new_zeros(grad.shape[0], ctx.num_rows)
            for k in range(3):
                grad_table.index_add_(1, corner[k], grad * bary[k])
        if ctx.needs_input_grad[2]:
            grad_bary = (gathered * grad).sum(1)
        return grad_table, None, grad_bary


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

    The image is a view of channel-first memory, which `antialias` and `interpolate` use
    without copying.
    """
    channels = values.shape[0]
    if isinstance(background, (int, float)) and background == 0:
        dense = values.new_zeros(channels, rast.num_pixels)       # calloc'd: no fill pass
    else:
        background = torch.as_tensor(background, dtype=values.dtype, device=values.device).reshape(-1, 1)
        dense = background.expand(channels, rast.num_pixels).clone()
    dense.index_copy_(1, rast.pixels, values)
    return dense.view(channels, rast.batch, *rast.resolution).permute(1, 2, 3, 0)

