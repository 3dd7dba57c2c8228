"""A small synthetic morphable model: a head-sized ellipsoid with smooth shape components."""
from __future__ import annotations

import math

import numpy as np
import torch

from sds_backend.bundle import Bundle
from sds_backend.tools.procedural import uv_sphere


def synthetic_model(num_components: int = 8, n_lat: int = 17, n_lon: int = 34, seed: int = 0) -> Bundle:
    """Ellipsoid ~ 18 x 24 x 20 cm with orthonormalised low-order displacement fields.

    Components move vertices along the normal by up to 8% of the radius at weight 1; UVs are
    a spherical mapping with per-face corners (seams are irrelevant to the tests).
    """
    vertices, faces = uv_sphere(n_lat, n_lon)
    x, y, z = vertices.unbind(1)
    gen = torch.Generator().manual_seed(seed)
    monomials = [x, y, z, x * y, y * z, z * x, x * x - y * y, 3 * z * z - 1, x * y * z, x ** 3, y ** 3, z ** 3,
                 x * x * y, x * x * z, y * y * x, y * y * z, z * z * x, z * z * y, x ** 4 - z ** 4, y ** 4 - x ** 2]
    fields = torch.stack(monomials[:num_components], 1)
    fields = fields @ torch.linalg.qr(torch.randn(num_components, num_components, generator=gen, dtype=fields.dtype))[0]
    fields, _ = torch.linalg.qr(fields - fields.mean(0))
    fields = fields / fields.abs().max(0).values * 0.08
    scale = torch.tensor([0.09, 0.12, 0.10], dtype=vertices.dtype)
    mean = vertices * scale
    basis = fields.t()[:, :, None] * vertices[None] * scale
    u = (torch.atan2(x, z) / (2 * math.pi) + 0.5).clamp(0, 1)
    v = (torch.asin(y.clamp(-1, 1)) / math.pi + 0.5).clamp(0, 1)
    uv = torch.stack([u, v], 1)
    return Bundle.from_arrays(
        mean=mean.numpy().astype(np.float32), basis=basis.numpy().astype(np.float32),
        names=np.array([f"c{i:02d}" for i in range(num_components)]), faces=faces.numpy().astype(np.int32),
        uv=uv.numpy().astype(np.float32), uv_faces=faces.numpy().astype(np.int32),
        meta='{"source": "synthetic test model"}',
    )
