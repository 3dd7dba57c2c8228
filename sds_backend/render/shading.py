"""Shaded renders composed from the primitives: normals, Lambert and normal-map shading, textures.

Every render here antialiases its silhouettes, so gradients reach vertex positions both from
shading (through the barycentrics) and from the outline (through `antialias`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from .antialias import Topology, antialias, prepare_topology
from .camera import Cameras
from .interpolate import interpolate, texture
from .rasterize import rasterize

ShadingMode = Literal["lambert", "normal"]
SHADING_MODES = ("lambert", "normal")


@dataclass(frozen=True)
class Render:
    """image float [B, H, W, 3] in [0, 1] (background composited); alpha float [B, H, W, 1]."""

    image: torch.Tensor
    alpha: torch.Tensor


def vertex_normals(vertices: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
    """Area-weighted unit vertex normals, float [B, V, 3] for vertices [B, V, 3]; differentiable."""
    faces = faces.to(torch.int64)
    v0, v1, v2 = (vertices[:, faces[:, k]] for k in range(3))
    face_normals = torch.linalg.cross(v1 - v0, v2 - v0, dim=-1)          # length = 2 * area
    normals = torch.zeros_like(vertices)
    for k in range(3):
        normals = normals.index_add(1, faces[:, k], face_normals)
    return torch.nn.functional.normalize(normals, dim=-1, eps=1e-12)


def render_mesh(vertices: torch.Tensor, faces: torch.Tensor, cams: Cameras, resolution: int | tuple[int, int],
                mode: ShadingMode = "lambert", light_dir: torch.Tensor | None = None, albedo: float = 0.7,
                ambient: float = 0.25, background: float | torch.Tensor = 0.0,
                topology: Topology | None = None) -> Render:
    """Untextured render of a mesh for shape fitting.

    vertices    float [B, V, 3] or [V, 3] world positions (glTF axes); gradients flow to them
    faces       int [F, 3], counter-clockwise seen from outside
    mode        "lambert": grey albedo lit by one directional light plus ambient;
                "normal":  camera-space normals mapped to colours (n * 0.5 + 0.5)
    light_dir   float [B, 3] or [3], direction toward the light in camera space
                (default: from the camera, slightly above)
    background  scalar or float [3] colour behind the head
    """
    if mode not in SHADING_MODES:
        raise ValueError(f"mode: expected one of {SHADING_MODES}, got {mode!r}")
    if vertices.ndim == 2:
        vertices = vertices.expand(len(cams), -1, -1)
    topology = topology if topology is not None else prepare_topology(faces)
    clip = cams.to_clip(vertices)
    rast = rasterize(clip, faces, resolution)
    pixel_normals = _camera_normals(vertices, faces, cams, rast)
    if mode == "normal":
        color = pixel_normals * 0.5 + 0.5
    else:
        color = (albedo * _lambert(pixel_normals, light_dir, ambient)).expand(-1, -1, -1, 3)
    return _composite(color, rast, clip, faces, topology, background)


def render_textured(vertices: torch.Tensor, faces: torch.Tensor, uv: torch.Tensor, uv_faces: torch.Tensor,
                    tex: torch.Tensor, cams: Cameras, resolution: int | tuple[int, int],
                    light_dir: torch.Tensor | None = None, ambient: float = 1.0,
                    background: float | torch.Tensor = 0.0, topology: Topology | None = None) -> Render:
    """Render a mesh with a UV texture.

    uv        float [T, 2] texture coordinates; uv_faces int [F, 3] into them (row f matches faces[f])
    tex       float [1 or B, Ht, Wt, C] texture, row 0 = v 1; gradients flow to it. C may be 3
              (RGB) or any other count (e.g. 4 latent channels) when ambient = 1 (unlit)
    ambient   1.0 renders the texture unlit (albedo as is); below 1, Lambert-lit by light_dir
    """
    if vertices.ndim == 2:
        vertices = vertices.expand(len(cams), -1, -1)
    topology = topology if topology is not None else prepare_topology(faces)
    clip = cams.to_clip(vertices)
    rast = rasterize(clip, faces, resolution)
    pixel_uv = interpolate(uv.to(vertices.dtype), rast, uv_faces)
    color = texture(tex.to(vertices.dtype), pixel_uv)
    if ambient < 1:
        color = color * _lambert(_camera_normals(vertices, faces, cams, rast), light_dir, ambient)
    return _composite(color, rast, clip, faces, topology, background)


def render_lambert(vertices: torch.Tensor, faces: torch.Tensor, cams: Cameras, resolution: int = 256) -> torch.Tensor:
    """Grey Lambert render on black, float [B, H, W, 3] in [0, 1]; for previews and contact sheets."""
    return render_mesh(vertices, faces, cams, resolution, mode="lambert").image


def _camera_normals(vertices, faces, cams, rast) -> torch.Tensor:
    """Unit normals per pixel in camera space (x right, y up, z toward the viewer), [B, H, W, 3]."""
    rotation = cams.world_to_view[:, :3, :3].to(vertices.dtype)
    normals = vertex_normals(vertices, faces) @ rotation.transpose(1, 2)
    return torch.nn.functional.normalize(interpolate(normals, rast, faces), dim=-1, eps=1e-12)


def _lambert(pixel_normals: torch.Tensor, light_dir: torch.Tensor | None, ambient: float) -> torch.Tensor:
    """ambient + (1 - ambient) * max(0, n . l), [B, H, W, 1]; default light from the camera, a bit above."""
    if light_dir is None:
        light_dir = pixel_normals.new_tensor([0.0, 0.35, 1.0])
    light = torch.nn.functional.normalize(light_dir.to(pixel_normals).reshape(-1, 1, 1, 3), dim=-1)
    return ambient + (1 - ambient) * (pixel_normals * light).sum(-1, keepdim=True).clamp_min(0)


def _composite(color, rast, clip, faces, topology, background) -> Render:
    """Put the background behind uncovered pixels, then antialias colour and coverage together."""
    mask = rast.mask(color.dtype)
    background = torch.as_tensor(background, dtype=color.dtype, device=color.device)
    if background.ndim == 0:
        background = background.expand(color.shape[-1])
    color = color * mask + background * (1 - mask)
    blended = antialias(torch.cat([color, mask], -1), rast, clip, faces, topology)
    return Render(blended[..., :-1], blended[..., -1:])
