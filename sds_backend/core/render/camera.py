"""Cameras: look-at, perspective projection and orbit sampling around a target.

World space is glTF's: +Y up, the head looks toward +Z. Cameras follow OpenGL: they look
down their own -Z axis. Orbit angles: yaw 0 puts the camera on +Z in front of the face,
positive yaw moves it toward +X, positive pitch raises it above the target looking down.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Cameras:
    """A batch of B pinhole cameras.

    world_to_view  float [B, 4, 4]
    projection     float [B, 4, 4]  OpenGL clip matrix
    yaw_deg        float [B]        orbit azimuth (0 = front), used for view-dependent prompts
    pitch_deg      float [B]        orbit elevation
    """

    world_to_view: torch.Tensor
    projection: torch.Tensor
    yaw_deg: torch.Tensor
    pitch_deg: torch.Tensor

    def __len__(self) -> int:
        return self.world_to_view.shape[0]

    def map(self, fn) -> "Cameras":
        """The same cameras with `fn` applied to each of their tensors (a device, a dtype, a slice)."""
        return Cameras(fn(self.world_to_view), fn(self.projection), fn(self.yaw_deg), fn(self.pitch_deg))

    def world_to_clip(self) -> torch.Tensor:
        return self.projection @ self.world_to_view

    def to_clip(self, points: torch.Tensor) -> torch.Tensor:
        """points float [B, V, 3] or [V, 3] (world) -> clip coordinates [B, V, 4]."""
        if points.ndim == 2:
            points = points.expand(len(self), -1, -1)
        matrix = self.world_to_clip().to(device=points.device, dtype=points.dtype)
        return points @ matrix[:, :, :3].transpose(1, 2) + matrix[:, None, :, 3]

    def view_directions(self, points: torch.Tensor) -> torch.Tensor:
        """Unit vectors from each point toward its camera, float [B, V, 3]."""
        eye = torch.linalg.inv(self.world_to_view)[:, :3, 3].to(device=points.device, dtype=points.dtype)
        return torch.nn.functional.normalize(eye[:, None] - points, dim=-1)


def look_at(eye: torch.Tensor, target: torch.Tensor, up: tuple[float, float, float] = (0.0, 1.0, 0.0)) -> torch.Tensor:
    """World-to-view matrices float [B, 4, 4] for eyes [B, 3] looking at targets [B, 3] or [3]."""
    target = target.expand_as(eye)
    forward = torch.nn.functional.normalize(target - eye, dim=-1)
    up_vec = eye.new_tensor(up).expand_as(eye)
    right = torch.linalg.cross(forward, up_vec, dim=-1)
    # looking straight up or down: any right vector orthogonal to forward will do
    degenerate = right.norm(dim=-1, keepdim=True) < 1e-8
    right = torch.where(degenerate, torch.linalg.cross(forward, eye.new_tensor([0.0, 0.0, 1.0]).expand_as(eye), dim=-1), right)
    right = torch.nn.functional.normalize(right, dim=-1)
    true_up = torch.linalg.cross(right, forward, dim=-1)
    matrix = torch.zeros(eye.shape[0], 4, 4, dtype=eye.dtype, device=eye.device)
    matrix[:, 0, :3], matrix[:, 1, :3], matrix[:, 2, :3] = right, true_up, -forward
    matrix[:, :3, 3] = -torch.einsum("bij,bj->bi", matrix[:, :3, :3], eye)
    matrix[:, 3, 3] = 1
    return matrix


def perspective(fov_y_deg: float, aspect: float = 1.0, near: float = 0.01, far: float = 100.0,
                dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> torch.Tensor:
    """OpenGL perspective matrix float [4, 4]; aspect = width / height."""
    if not 0 < fov_y_deg < 180:
        raise ValueError(f"fov_y_deg: expected a value in (0, 180), got {fov_y_deg}")
    if not 0 < near < far:
        raise ValueError(f"near/far: expected 0 < near < far, got near={near}, far={far}")
    focal = 1.0 / math.tan(math.radians(fov_y_deg) / 2)
    depth_scale, depth_offset = -(far + near) / (far - near), -2 * far * near / (far - near)
    return torch.tensor([[focal / aspect, 0.0, 0.0, 0.0], [0.0, focal, 0.0, 0.0],
                         [0.0, 0.0, depth_scale, depth_offset], [0.0, 0.0, -1.0, 0.0]], dtype=dtype, device=device)


def framing_distance(radius: float, fov_y_deg: float, fill: float = 0.9) -> float:
    """Distance at which a sphere of `radius` spans `fill` of the image height."""
    return radius / (fill * math.sin(math.radians(fov_y_deg) / 2))


def orbit_cameras(yaw_deg: torch.Tensor, pitch_deg: torch.Tensor, distance: float | torch.Tensor,
                  target: tuple[float, float, float] | torch.Tensor = (0.0, 0.0, 0.0), fov_deg: float = 30.0,
                  near: float = 0.01, far: float = 100.0) -> Cameras:
    """Cameras on a sphere around `target`, all looking at it (angles in degrees, [B]); no gradient.

    The same matrices as `look_at` from the orbit's eye points, in closed form: a handful of
    scalars per camera, where `look_at`'s cross products and normalisations are some fifty
    tensor ops, a millisecond of every fit step on a CPU. At pitch +-90 degrees the right
    axis stays the one of the nearby orbit (`look_at` has no unique answer there).
    """
    yaw_deg = torch.as_tensor(yaw_deg, dtype=torch.float32).reshape(-1).detach()
    pitch_deg = torch.as_tensor(pitch_deg, dtype=yaw_deg.dtype, device=yaw_deg.device).reshape(-1).detach()
    if yaw_deg.shape != pitch_deg.shape:
        raise ValueError(f"yaw_deg and pitch_deg must have the same length, got {yaw_deg.numel()} and {pitch_deg.numel()}")
    distances = torch.as_tensor(distance, dtype=torch.float64).detach().expand(yaw_deg.shape).tolist()
    target_xyz = [float(t) for t in torch.as_tensor(target, dtype=torch.float64).reshape(3).tolist()]
    views = [_orbit_view(math.radians(yaw), math.radians(pitch), dist, target_xyz)
             for yaw, pitch, dist in zip(yaw_deg.tolist(), pitch_deg.tolist(), distances)]
    view = torch.tensor(views, dtype=yaw_deg.dtype, device=yaw_deg.device).reshape(-1, 4, 4)
    projection = perspective(fov_deg, 1.0, near, far, yaw_deg.dtype, yaw_deg.device).expand(len(yaw_deg), 4, 4)
    return Cameras(view, projection, yaw_deg, pitch_deg)


def _orbit_view(yaw: float, pitch: float, distance: float, target: list[float]) -> list[list[float]]:
    """World-to-view matrix (rows) of the camera at (yaw, pitch) radians, `distance` from target."""
    cy, sy, cp, sp = math.cos(yaw), math.sin(yaw), math.cos(pitch), math.sin(pitch)
    flip = math.copysign(1.0, cp)                        # beyond the pole the image turns upside down
    axes = ((flip * cy, 0.0, -flip * sy),                # right: horizontal, perpendicular to the view
            (-flip * sy * sp, flip * cp, -flip * cy * sp),   # up
            (sy * cp, sp, cy * cp))                      # back: from the target toward the eye
    rows = [[*axis, -sum(a * t for a, t in zip(axis, target))] for axis in axes]
    rows[2][3] -= distance                               # the eye lies `distance` along the back axis
    return rows + [[0.0, 0.0, 0.0, 1.0]]


@dataclass(frozen=True)
class OrbitSampler:
    """Random cameras around a head: uniform yaw/pitch in ranges, a small random zoom.

    yaw_range     degrees, 0 = front
    pitch_range   degrees, positive = from above
    zoom_range    multiplies the framing distance (1 = the head fills `fill` of the frame)
    fov_deg       vertical field of view
    """

    yaw_range: tuple[float, float] = (-45.0, 45.0)
    pitch_range: tuple[float, float] = (-20.0, 20.0)
    zoom_range: tuple[float, float] = (0.9, 1.1)
    fov_deg: float = 30.0

    def sample(self, count: int, radius: float, target: torch.Tensor | tuple[float, float, float],
               generator: torch.Generator, fill: float = 0.9) -> Cameras:
        # one draw of zoom, yaw and pitch rows: the same stream as three draws of `count`
        zoom, yaw, pitch = ([low + (high - low) * u for u in row] for (low, high), row in
                            zip((self.zoom_range, self.yaw_range, self.pitch_range),
                                torch.rand(3, count, generator=generator).tolist()))
        distance = torch.tensor(zoom, dtype=torch.float64) * framing_distance(radius, self.fov_deg, fill)
        return orbit_cameras(torch.tensor(yaw), torch.tensor(pitch), distance, target, self.fov_deg)
