"""Differentiable rasterizer in plain torch, with nvdiffrast-style primitives.

    rasterize(clip_verts, faces, resolution) -> Rasterization   visibility + differentiable barycentrics
    interpolate(attr, rast, faces)           -> [B, H, W, C]    per-vertex attributes at each pixel
    texture(tex, uv)                         -> [B, H, W, C]    bilinear lookup, grads to the texture
    antialias(color, rast, clip_verts, faces, topology) -> [B, H, W, C]  silhouette gradients
    prepare_topology(faces)                  -> Topology        edge adjacency: build once per mesh
                                                                and pass it to every `antialias`

`camera` builds clip-space vertices; `shading` composes the primitives into shaded renders.
"""
from .antialias import Topology, antialias, prepare_topology
from .interpolate import interpolate, texture
from .rasterize import Rasterization, rasterize

__all__ = ["Rasterization", "Topology", "antialias", "interpolate", "prepare_topology", "rasterize", "texture"]
