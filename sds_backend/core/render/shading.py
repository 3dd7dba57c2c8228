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
from .interpolate import interpolate_pixels, sample_pixels, to_image
from .rasterize import face_corners, rasterize

ShadingMode = Literal["lambert", "normal"]
SHADING_MODES = ("lambert", "normal")


@dataclass(frozen=True)
class Render:
    """image float [B, H, W, 3] in [0, 1] (background composited); alpha float [B, H, W, 1]."""

    image: torch.Tensor
    alpha: torch.Tensor


def vertex_normals(vertices: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
    """Area-weighted unit vertex normals, float [B, V, 3] for vertices [B, V, 3]; differentiable."""
    batch, num_vertices = vertices.shape[:2]
    return _vertex_normal_rows(vertices, faces).view(3, batch, num_vertices).permute(1, 2, 0)


def _vertex_normal_rows(vertices: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
    """`vertex_normals` as channel-first rows, float [3 (xyz), B*V]: the unit sums of the
    normals of the faces around each vertex, each as long as twice its face's area."""
    batch, num_vertices = vertices.shape[:2]
    corners = face_corners(faces, batch, num_vertices)                         # [3, B*F]
    table = vertices.reshape(-1, 3).t().contiguous()                            # [xyz, B*V]
    v0, v1, v2 = (table.index_select(1, corners[k]) for k in range(3))
    e1, e2 = (v1 - v0).unbind(0), (v2 - v0).unbind(0)                          # each 3 x [B*F]
    face_normals = torch.stack([e1[1] * e2[2] - e1[2] * e2[1],                  # e1 x e2, [xyz, B*F]
                                e1[2] * e2[0] - e1[0] * e2[2],
                                e1[0] * e2[1] - e1[1] * e2[0]])
    summed = table.new_zeros(table.shape)
    for k in range(3):
        summed.index_add_(1, corners[k], face_normals)
    return _unit_rows(summed)


def _unit_rows(vectors: torch.Tensor) -> torch.Tensor:
    """Channel-first vectors [3, N] scaled to unit length (zero vectors stay zero)."""
    return vectors * torch.rsqrt((vectors * vectors).sum(0, keepdim=True).clamp_min(1e-24))


def render_mesh(vertices: torch.Tensor, faces: torch.Tensor, cams: Cameras, resolution: int | tuple[int, int],
                mode: ShadingMode = "lambert", light_dir: torch.Tensor | None = None, albedo: float = 0.7,
                ambient: float = 0.25, background: float | torch.Tensor = 0.0,
                topology: Topology | None = None) -> Render:
    """Untextured render of a mesh for shape fitting.

    vertices    float [B, V, 3] or [V, 3] world positions (glTF axes); gradients flow to them
    faces       int [F, 3], counter-clockwise seen from outside
    mode        "lambert": grey albedo lit by one directional light plus ambient, at the
                vertices (Gouraud; see `_vertex_lambert`);
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
    if mode == "normal":
        color = _camera_normals(vertices, faces, cams, rast) * 0.5 + 0.5
    else:
        color = _vertex_lambert(vertices, faces, cams, rast, light_dir, ambient, albedo)   # [1, P]: grey
    return _composite(color, rast, clip, faces, topology, background, grey=mode == "lambert")


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
    pixel_uv = interpolate_pixels(uv.to(vertices.dtype)[None], rast, uv_faces)
    color = sample_pixels(tex.to(vertices.dtype), pixel_uv, rast)
    if ambient < 1:
        color = color * _vertex_lambert(vertices, faces, cams, rast, light_dir, ambient)
    return _composite(color, rast, clip, faces, topology, background)


def render_lambert(vertices: torch.Tensor, faces: torch.Tensor, cams: Cameras, resolution: int = 256) -> torch.Tensor:
    """Grey Lambert render on black, float [B, H, W, 3] in [0, 1]; for previews and contact sheets."""
    return render_mesh(vertices, faces, cams, resolution, mode="lambert").image


def _camera_normals(vertices, faces, cams, rast) -> torch.Tensor:
    """Unit normals of the covered pixels in camera space (x right, y up, z toward the viewer), [3, P]."""
    batch, num_vertices = vertices.shape[:2]
    rotation = cams.world_to_view[:, :3, :3].to(device=vertices.device, dtype=vertices.dtype)
    rows = _vertex_normal_rows(vertices, faces)                                 # [3, B*V]
    if batch == 1:
        rows = rotation[0] @ rows
    else:
        rows = torch.einsum("bij,jbv->ibv", rotation, rows.view(3, batch, num_vertices)).reshape(3, -1)
    normals = interpolate_pixels(_per_vertex(rows, batch), rast, faces)
    return _unit_rows(normals)


def _vertex_lambert(vertices, faces, cams, rast, light_dir: torch.Tensor | None, ambient: float,
                    albedo: float = 1.0) -> torch.Tensor:
    """albedo * (ambient + (1 - ambient) * max(0, n . l)) per covered pixel, [1, P].

    Lit at the vertices and interpolated (Gouraud): one channel crosses the pixels instead of
    three normal components, each normalised and dotted with the light: ~1.3 ms less of a
    256² head render (forward and backward, CPU). With the head's pixel-sized triangles the
    image differs from per-pixel lighting by 5e-4 on average (at most 0.15, in the creases of
    eyelids and lips), and the weight gradient keeps its direction (cosine 0.9999).
    light_dir is in camera space (default: from the camera, a bit above); it is turned into
    world space (one 3-vector per camera) rather than the normals into camera space.
    """
    batch, num_vertices = vertices.shape[:2]
    if light_dir is None:
        light_dir = vertices.new_tensor([0.0, 0.35, 1.0])
    light = torch.nn.functional.normalize(light_dir.to(vertices).reshape(-1, 3), dim=-1).expand(batch, 3)
    rotation = cams.world_to_view[:, :3, :3].to(device=vertices.device, dtype=vertices.dtype)
    world_light = (rotation * light[:, :, None]).sum(1)                        # R^T l per camera, [B, 3]
    normals = _vertex_normal_rows(vertices, faces)                             # [3, B*V]
    if batch == 1:
        facing = world_light @ normals                                        # [1, V]
    else:
        facing = (normals.view(3, batch, num_vertices) * world_light.t()[:, :, None]).sum(0).view(1, -1)
    shade = facing.clamp_min(0).mul(albedo * (1 - ambient)).add(albedo * ambient)
    return interpolate_pixels(_per_vertex(shade, batch), rast, faces)


def _per_vertex(rows: torch.Tensor, batch: int) -> torch.Tensor:
    """Channel-first per-vertex values [C, B*V] as the attributes [B, V, C] `interpolate` takes (a view)."""
    return rows.view(rows.shape[0], batch, -1).permute(1, 2, 0)


def _composite(color: torch.Tensor, rast, clip, faces, topology, background, grey: bool = False) -> Render:
    """Per-pixel colours [C, P] onto the background, then antialias colour and coverage together.

    grey: color is [1, P] and the image is RGB. Over a grey background it is antialiased as one
    channel and widened at the end as a stride-0 view: a third of the image-sized work, forward
    and backward.
    """
    background = torch.as_tensor(background, dtype=color.dtype, device=color.device).reshape(-1)
    if grey and background.numel() == 3 and not bool((background == background[0]).all()):
        color, grey = color.expand(3, -1), False              # grey surface over a coloured background
    channels = color.shape[0]
    background = background[:1].expand(channels) if channels == 1 else background.expand(channels)
    coverage = torch.ones(1, color.shape[1], dtype=color.dtype, device=color.device)
    # background then 0 coverage outside; one channel-first image that antialias reads without a copy
    image = to_image(torch.cat([color, coverage]), rast, torch.cat([background, background.new_zeros(1)]))
    blended = antialias(image, rast, clip, faces, topology).permute(3, 0, 1, 2)            # [C+1, B, H, W] view
    # split the channels in channel-first order, so the backward writes contiguous channel-first
    # gradients instead of transposing a [B, H, W, C+1] buffer
    rgb = blended[:-1].permute(1, 2, 3, 0)
    return Render(rgb.expand(-1, -1, -1, 3) if grey else rgb, blended[-1:].permute(1, 2, 3, 0))
