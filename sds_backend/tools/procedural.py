"""Procedural meshes for benchmarks, tests and demos."""
from __future__ import annotations

import math

import torch


def uv_sphere(n_lat: int, n_lon: int, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """Closed unit UV sphere with counter-clockwise outward faces: 2 * n_lon * (n_lat - 1) triangles.

    Triangles near the poles are long and thin, which is what silhouette antialiasing must survive.
    -> vertices [V, 3], faces int64 [F, 3]
    """
    lat = torch.linspace(0, math.pi, n_lat + 1, dtype=dtype)[1:-1]
    lon = torch.linspace(0, 2 * math.pi, n_lon + 1, dtype=dtype)[:-1]
    la, lo = torch.meshgrid(lat, lon, indexing="ij")
    ring = torch.stack([torch.sin(la) * torch.sin(lo), torch.cos(la), torch.sin(la) * torch.cos(lo)], -1).reshape(-1, 3)
    vertices = torch.cat([ring.new_tensor([[0.0, 1.0, 0.0]]), ring, ring.new_tensor([[0.0, -1.0, 0.0]])])
    rows = n_lat - 1
    j = torch.arange(n_lon)
    jn = (j + 1) % n_lon
    top = torch.stack([torch.zeros_like(j), 1 + j, 1 + jn], 1)
    bottom_pole = vertices.shape[0] - 1
    bottom = torch.stack([torch.full_like(j, bottom_pole), 1 + (rows - 1) * n_lon + jn, 1 + (rows - 1) * n_lon + j], 1)
    i = torch.arange(rows - 1)[:, None]
    a, b = 1 + i * n_lon + j, 1 + i * n_lon + jn
    c, d = a + n_lon, b + n_lon
    quads = torch.cat([torch.stack([a, c, b], -1).reshape(-1, 3), torch.stack([b, c, d], -1).reshape(-1, 3)])
    return vertices, torch.cat([top, quads, bottom])


def sphere_with_faces(num_faces: int, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """A UV sphere with about `num_faces` triangles (n_lon = 2 n_lat)."""
    n_lat = max(3, round((1 + math.sqrt(1 + 4 * num_faces)) / 4))
    return uv_sphere(n_lat, 2 * n_lat, dtype)
