"""`bench raster`: speed and silhouette-gradient accuracy of the differentiable rasterizer."""
from __future__ import annotations

import time

import torch

from .procedural import sphere_with_faces
from ..core.render import antialias, camera, interpolate, prepare_topology, rasterize


def _cameras(dtype: torch.dtype, device: torch.device) -> camera.Cameras:
    cams = camera.orbit_cameras(torch.tensor([20.0]), torch.tensor([10.0]), 3.6, fov_deg=40)
    return cams.map(lambda t: t.to(device=device, dtype=dtype))


def silhouette_gradient_error(num_faces: int, resolution: int = 128, supersample: int = 8, eps: float = 2e-3,
                              device: torch.device | str = "cpu") -> float:
    """Relative error of the antialiased coverage gradient against finite differences of the exact coverage.

    Loss: sum over pixels of a smooth weight times pixel coverage of a sphere. The analytic side
    differentiates `antialias` of the point-sampled mask; the numeric side takes central
    differences of the box-filtered coverage from a `supersample`x finer rasterization, along
    a smooth random deformation of the vertices.
    """
    device = torch.device(device)
    vertices, faces = sphere_with_faces(num_faces)
    vertices, faces = vertices.to(device), faces.to(device)
    cams = _cameras(torch.float64, device)
    ys, xs = torch.meshgrid(torch.linspace(0, 1, resolution, dtype=torch.float64, device=device),
                            torch.linspace(0, 1, resolution, dtype=torch.float64, device=device), indexing="ij")
    pixel_weights = 1 + torch.sin(3 * xs + 1) * torch.cos(2 * ys) + 0.5 * xs
    gen = torch.Generator().manual_seed(1)
    affine = (torch.randn(3, 3, generator=gen, dtype=torch.float64) * 0.3).to(device)
    shift = (torch.randn(3, generator=gen, dtype=torch.float64) * 0.3).to(device)
    direction = vertices @ affine.T + shift + 0.2 * torch.sin(2 * vertices[:, [1, 2, 0]])
    topology = prepare_topology(faces)

    def antialiased_loss(v):
        clip = cams.to_clip(v[None])
        rast = rasterize(clip, faces, resolution)
        return (antialias(rast.mask(v.dtype), rast, clip, faces, topology)[0, ..., 0] * pixel_weights).sum()

    def true_coverage_loss(v):
        fine = rasterize(cams.to_clip(v[None]), faces, resolution * supersample).mask(v.dtype)[0, ..., 0]
        coverage = fine.view(resolution, supersample, resolution, supersample).mean((1, 3))
        return (coverage * pixel_weights).sum()

    v = vertices.clone().requires_grad_(True)
    antialiased_loss(v).backward()
    analytic = (v.grad * direction).sum().item()
    numeric = (true_coverage_loss(vertices + eps * direction)
               - true_coverage_loss(vertices - eps * direction)).item() / (2 * eps)
    return abs(analytic - numeric) / abs(numeric)


def _pipeline(num_faces: int, resolution: int, device: torch.device):
    """rasterize + interpolate (normals) + antialias, forward and backward, as a closure."""
    vertices, faces = sphere_with_faces(num_faces, torch.float32)
    vertices, faces = vertices.to(device), faces.to(device)
    cams = _cameras(torch.float32, device)
    topology = prepare_topology(faces)
    attr = vertices * 0.5 + 0.5
    v = vertices.clone().requires_grad_(True)

    def step():
        clip = cams.to_clip(v[None])
        rast = rasterize(clip, faces, resolution)
        color = interpolate(attr, rast, faces)
        antialias(color, rast, clip, faces, topology).sum().backward()
        v.grad = None

    return step, int(faces.shape[0])


def median_ms(steps: dict[str, callable], repeats: int, device: torch.device) -> dict[str, float]:
    """Median wall time per closure; closures run round-robin so machine noise hits all alike."""
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for step in steps.values():      # warm-up
        step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            sync()
            start = time.perf_counter()
            step()
            sync()
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: sorted(values)[len(values) // 2] for name, values in times.items()}


def run(device: torch.device, repeats: int = 15) -> dict:
    configs = {"20k_256": (20_000, 256), "20k_512": (20_000, 512), "20k_1024": (20_000, 1024), "80k_512": (80_000, 512)}
    steps, faces = {}, {}
    for name, (num_faces, resolution) in configs.items():
        steps[name], faces[name] = _pipeline(num_faces, resolution, device)
    ms = median_ms(steps, repeats, device)
    return {
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "torch_threads": torch.get_num_threads(),
        "triangles": {"20k": faces["20k_512"], "80k": faces["80k_512"]},
        "raster_ms_20k_256": round(ms["20k_256"], 2),
        "raster_ms_20k_512": round(ms["20k_512"], 2),
        "raster_ms_20k_1024": round(ms["20k_1024"], 2),
        "raster_ms_80k_512": round(ms["80k_512"], 2),
        "scale_pixels_1024_over_512": round(ms["20k_1024"] / ms["20k_512"], 3),
        "scale_tris_80k_over_20k": round(ms["80k_512"] / ms["20k_512"], 3),
        "silhouette_grad_rel_err_2k": round(silhouette_gradient_error(2_000, device=device), 5),
        "silhouette_grad_rel_err_50k": round(silhouette_gradient_error(50_000, device=device), 5),
    }
