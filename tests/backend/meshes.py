"""Small procedural meshes for renderer tests."""
from __future__ import annotations

import math

import torch


def perspective_clip(points: torch.Tensor, fov_deg: float = 60.0, near: float = 0.1, far: float = 10.0) -> torch.Tensor:
    """View-space points [..., 3] (camera looks down -z) -> OpenGL clip coordinates [..., 4]."""
    focal = 1 / math.tan(math.radians(fov_deg) / 2)
    x, y, z = points.unbind(-1)
    return torch.stack([focal * x, focal * y, -(far + near) / (far - near) * z - 2 * far * near / (far - near), -z], -1)


def triangle_soup(count: int, generator: torch.Generator, depth_range=(-6.0, 0.5), size: float = 0.6) -> tuple[torch.Tensor, torch.Tensor]:
    """Random triangles in view space, some crossing or behind the camera -> (clip [V, 4], faces [F, 3])."""
    centres = torch.rand(count, 1, 3, generator=generator, dtype=torch.float64)
    centres = centres * torch.tensor([3.0, 3.0, depth_range[1] - depth_range[0]], dtype=torch.float64) \
        + torch.tensor([-1.5, -1.5, depth_range[0]], dtype=torch.float64)
    corners = centres + size * (torch.rand(count, 3, 3, generator=generator, dtype=torch.float64) - 0.5)
    return perspective_clip(corners.reshape(-1, 3)), torch.arange(count * 3).reshape(count, 3)
