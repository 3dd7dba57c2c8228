"""Brute-force reference rasterizer in float64 numpy: every pixel against every triangle.

Deliberately naive and independent of sds_backend.core.render: homogeneous edge functions per
pixel centre, near/far clipping by testing the interpolated depth, nearest z/w wins.
"""
from __future__ import annotations

import numpy as np


def reference_rasterize(clip_verts: np.ndarray, faces: np.ndarray, height: int, width: int, chunk: int = 2048):
    """clip_verts [V, 4], faces [F, 3] -> (tri_id [H, W] int, -1 empty; depth [H, W]; bary [H, W, 3])."""
    clip_verts = np.asarray(clip_verts, dtype=np.float64)
    px = (2 * np.arange(width) + 1) / width - 1
    py = 1 - (2 * np.arange(height) + 1) / height
    gx, gy = np.meshgrid(px, py)                              # [H, W]
    p = np.stack([gx.ravel(), gy.ravel(), np.ones(gx.size)])  # [3, HW]

    best_depth = np.full(gx.size, np.inf)
    best_tri = np.full(gx.size, -1, dtype=np.int64)
    best_bary = np.zeros((gx.size, 3))
    for start in range(0, len(faces), chunk):
        f = faces[start:start + chunk]
        v = clip_verts[f]                                      # [T, 3, 4]
        hom = v[..., [0, 1, 3]]                                # [T, 3, 3]
        c = np.stack([np.cross(hom[:, 1], hom[:, 2]), np.cross(hom[:, 2], hom[:, 0]),
                      np.cross(hom[:, 0], hom[:, 1])], 1)      # [T, 3, 3]
        e = np.einsum("tkc,cp->tkp", c, p)                     # [T, 3, HW]
        total = e.sum(1)                                       # [T, HW]
        with np.errstate(divide="ignore", invalid="ignore"):
            lam = e / total[:, None]
            z = np.einsum("tk,tkp->tp", v[..., 2], lam)
            w = np.einsum("tk,tkp->tp", v[..., 3], lam)
            depth = z / w
        inside = (lam >= 0).all(1) & (w > 0) & (depth >= -1) & (depth <= 1) & (total != 0)
        depth = np.where(inside, depth, np.inf)
        tri_best = depth.argmin(0)
        d = depth[tri_best, np.arange(gx.size)]
        better = d < best_depth
        best_depth[better] = d[better]
        best_tri[better] = start + tri_best[better]
        best_bary[better] = lam[tri_best[better], :, np.nonzero(better)[0]]
    return (best_tri.reshape(height, width), best_depth.reshape(height, width),
            best_bary.reshape(height, width, 3))
