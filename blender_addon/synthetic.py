"""A procedural stand-in head bundle (numpy only): an ellipsoid with smooth random components.

Used by the benchmark and the tests when assets/default_head.npz is not there, and as a small,
fast head for tests. Same format as a real bundle: quads in `polygons`, their triangles in
`faces`, a UV grid with a seam, glTF axes (+Y up, +Z forward), metres.
"""
from __future__ import annotations


def make_arrays(rings: int = 24, segments: int = 32, components: int = 50, expressions: int = 4,
                seed: int = 0) -> dict:
    """Bundle arrays: V = (rings - 1) * segments + 2 vertices, K components, E expressions."""
    import numpy as np

    rng = np.random.default_rng(seed)
    radii = np.array([0.075, 0.11, 0.095])  # half width, half height, half depth (m)
    # vertices: north pole, rings 1..rings-1, south pole
    theta = np.linspace(0.0, np.pi, rings + 1)[1:-1]
    phi = np.linspace(0.0, 2.0 * np.pi, segments, endpoint=False)
    t, p = np.meshgrid(theta, phi, indexing="ij")
    unit = np.stack([np.sin(t) * np.sin(p), np.cos(t), np.sin(t) * np.cos(p)], -1).reshape(-1, 3)
    unit = np.concatenate([[[0.0, 1.0, 0.0]], unit, [[0.0, -1.0, 0.0]]])
    mean = (unit * radii).astype(np.float32)
    north, south = 0, len(mean) - 1

    def vid(r: int, s: int) -> int:  # ring r in 0..rings-2
        return 1 + r * segments + (s % segments)

    # uv grid (segments + 1 columns so the seam has its own column), row 0 = north (v = 1)
    uv = np.array([[s / segments, 1.0 - r / rings] for r in range(rings + 1) for s in range(segments + 1)],
                  dtype=np.float32)

    def uid(r: int, s: int) -> int:  # r in 0..rings
        return r * (segments + 1) + s

    polygons, faces, uv_faces = [], [], []
    for s in range(segments):  # north cap: triangles, winding outward
        polygons.append([north, vid(0, s), vid(0, s + 1), -1])
        faces.append([north, vid(0, s), vid(0, s + 1)])
        uv_faces.append([uid(0, s), uid(1, s), uid(1, s + 1)])
    for r in range(rings - 2):
        for s in range(segments):
            a, b, c, d = vid(r, s), vid(r + 1, s), vid(r + 1, s + 1), vid(r, s + 1)
            ua, ub, uc, ud = uid(r + 1, s), uid(r + 2, s), uid(r + 2, s + 1), uid(r + 1, s + 1)
            polygons.append([a, b, c, d])
            faces += [[a, b, c], [a, c, d]]
            uv_faces += [[ua, ub, uc], [ua, uc, ud]]
    for s in range(segments):  # south cap
        polygons.append([vid(rings - 2, s), south, vid(rings - 2, s + 1), -1])
        faces.append([vid(rings - 2, s), south, vid(rings - 2, s + 1)])
        uv_faces.append([uid(rings - 1, s), uid(rings, s), uid(rings - 1, s + 1)])

    def smooth_fields(count: int, scale: float):
        freq = rng.normal(size=(count, 3, 3)) * 2.0
        phase = rng.uniform(0, 2 * np.pi, size=(count, 3))
        amp = rng.normal(size=(count, 3)) * scale
        return (amp[:, None, :] * np.sin(np.einsum("vj,kcj->kvc", unit, freq) + phase[:, None, :])).astype(np.float32)

    return dict(
        mean=mean, basis=smooth_fields(components, 0.004), names=np.array([f"shape_{k:02d}" for k in range(components)]),
        faces=np.array(faces, dtype=np.int32), uv=uv, uv_faces=np.array(uv_faces, dtype=np.int32),
        polygons=np.array(polygons, dtype=np.int32),
        expr_basis=smooth_fields(expressions, 0.006),
        expr_names=np.array([f"expression_{e}" for e in range(expressions)]),
    )


def make_bundle(**kwargs):
    """The arrays as a checked bundle (the shared bundle module's Bundle)."""
    from . import paths

    return paths.shared("bundle").Bundle.from_arrays(**make_arrays(**kwargs), meta={"source": "synthetic"})
