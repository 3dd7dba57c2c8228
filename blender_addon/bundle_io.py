"""Read and write morphable-head bundles (`.npz`) on the add-on side: numpy only, no torch, no bpy.

The format is the backend's (sds_backend/morphable.py documents it; tests load what this module
writes with the backend's own loader): mean [V,3], basis [K,V,3], names [K], faces [F,3],
uv [T,2], uv_faces [F,3], optional polygons [P,4] (-1 pads a triangle), expr_basis [E,V,3],
expr_names [E], meta (JSON string). Positions use glTF axes (+Y up, +Z forward), metres;
`to_blender` / `from_blender` convert to and from Blender's Z-up frame.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import UserError


def _np():
    try:
        import numpy
    except ImportError:  # Debian's Blender uses the system numpy, which may be missing
        raise UserError("numpy is missing from Blender's Python (on Debian/Ubuntu: apt install python3-numpy)") from None
    return numpy


class BundleError(UserError):
    """A bundle the add-on cannot use; the message names the file and the field."""


@dataclass
class Bundle:
    mean: Any                      # float32 [V, 3]
    basis: Any                     # float32 [K, V, 3]
    names: list[str]
    faces: Any                     # int32 [F, 3]
    uv: Any                        # float32 [T, 2]
    uv_faces: Any                  # int32 [F, 3]
    polygons: Any = None           # int32 [P, 4] or None
    expr_basis: Any = None         # float32 [E, V, 3] or None
    expr_names: list[str] = field(default_factory=list)
    meta: dict = field(default_factory=dict)

    @property
    def num_vertices(self) -> int:
        return int(self.mean.shape[0])

    @property
    def num_components(self) -> int:
        return int(self.basis.shape[0])

    def validate(self, source: str = "bundle") -> None:
        np = _np()

        def fail(text: str) -> None:
            raise BundleError(f"{source}: {text}")

        if self.mean.ndim != 2 or self.mean.shape[1] != 3 or self.mean.shape[0] < 3:
            fail(f"field 'mean' must have shape [V>=3, 3], got {list(self.mean.shape)}")
        V = self.mean.shape[0]
        if self.basis.ndim != 3 or self.basis.shape[1:] != (V, 3):
            fail(f"field 'basis' must have shape [K, {V}, 3], got {list(self.basis.shape)}")
        if len(self.names) != self.basis.shape[0]:
            fail(f"field 'names' has {len(self.names)} entries but 'basis' has K={self.basis.shape[0]}")
        all_names = list(self.names) + list(self.expr_names)
        if any(not n.strip() for n in all_names) or len(set(all_names)) != len(all_names):
            fail("component and expression names must be non-empty and unique")
        if self.faces.ndim != 2 or self.faces.shape[1] != 3 or self.faces.shape[0] == 0:
            fail(f"field 'faces' must have shape [F>0, 3], got {list(self.faces.shape)}")
        if self.faces.min() < 0 or self.faces.max() >= V:
            fail(f"field 'faces' indexes outside [0, {V})")
        if self.uv_faces.shape != self.faces.shape:
            fail(f"field 'uv_faces' must have shape {list(self.faces.shape)}, got {list(self.uv_faces.shape)}")
        if self.uv.ndim != 2 or self.uv.shape[1] != 2:
            fail(f"field 'uv' must have shape [T, 2], got {list(self.uv.shape)}")
        if self.uv_faces.min() < 0 or self.uv_faces.max() >= self.uv.shape[0]:
            fail(f"field 'uv_faces' indexes outside [0, {self.uv.shape[0]})")
        for name in ("mean", "basis", "uv"):
            if not np.isfinite(getattr(self, name)).all():
                fail(f"field '{name}' contains NaN or inf")
        if self.expr_basis is not None:
            if self.expr_basis.ndim != 3 or self.expr_basis.shape[1:] != (V, 3):
                fail(f"field 'expr_basis' must have shape [E, {V}, 3], got {list(self.expr_basis.shape)}")
            if len(self.expr_names) != self.expr_basis.shape[0]:
                fail(f"field 'expr_names' has {len(self.expr_names)} entries but 'expr_basis' has "
                     f"E={self.expr_basis.shape[0]}")
        if self.polygons is not None:
            if self.polygons.ndim != 2 or self.polygons.shape[1] not in (3, 4):
                fail(f"field 'polygons' must have shape [P, 3] or [P, 4], got {list(self.polygons.shape)}")
            if self.polygons[:, :3].min() < 0 or self.polygons.max() >= V:
                fail(f"field 'polygons' indexes outside [0, {V})")


def load(path: str | Path) -> Bundle:
    np = _np()
    path = Path(path)
    if not path.is_file():
        raise BundleError(f"bundle not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {key: data[key] for key in data.files}
    except (OSError, ValueError, EOFError) as exc:
        raise BundleError(f"cannot read bundle {path}: {exc}") from None
    missing = [k for k in ("mean", "basis", "names", "faces", "uv", "uv_faces") if k not in arrays]
    if missing:
        raise BundleError(f"{path}: missing required field(s): {', '.join(missing)}")
    meta: dict = {}
    if "meta" in arrays:
        try:
            meta = json.loads(str(arrays["meta"].item() if arrays["meta"].shape == () else arrays["meta"]))
        except (json.JSONDecodeError, ValueError):
            meta = {}
    bundle = Bundle(
        mean=arrays["mean"].astype(np.float32), basis=arrays["basis"].astype(np.float32),
        names=[str(n) for n in arrays["names"].tolist()],
        faces=arrays["faces"].astype(np.int32), uv=arrays["uv"].astype(np.float32),
        uv_faces=arrays["uv_faces"].astype(np.int32),
        polygons=arrays["polygons"].astype(np.int32) if "polygons" in arrays else None,
        expr_basis=arrays["expr_basis"].astype(np.float32) if "expr_basis" in arrays else None,
        expr_names=[str(n) for n in arrays["expr_names"].tolist()] if "expr_names" in arrays else [],
        meta=meta if isinstance(meta, dict) else {},
    )
    bundle.validate(str(path))
    return bundle


def save(bundle: Bundle, path: str | Path) -> Path:
    """Write an uncompressed bundle (fast; it only lives in a job folder)."""
    np = _np()
    bundle.validate("bundle to save")
    arrays = {
        "mean": np.ascontiguousarray(bundle.mean, dtype=np.float32),
        "basis": np.ascontiguousarray(bundle.basis, dtype=np.float32),
        "names": np.array(bundle.names, dtype=np.str_),
        "faces": np.ascontiguousarray(bundle.faces, dtype=np.int32),
        "uv": np.ascontiguousarray(bundle.uv, dtype=np.float32),
        "uv_faces": np.ascontiguousarray(bundle.uv_faces, dtype=np.int32),
    }
    if bundle.polygons is not None:
        arrays["polygons"] = np.ascontiguousarray(bundle.polygons, dtype=np.int32)
    if bundle.expr_basis is not None:
        arrays["expr_basis"] = np.ascontiguousarray(bundle.expr_basis, dtype=np.float32)
        arrays["expr_names"] = np.array(bundle.expr_names, dtype=np.str_)
    if bundle.meta:
        arrays["meta"] = np.array(json.dumps(bundle.meta, sort_keys=True))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as handle:
        np.savez(handle, **arrays)
    return path


# glTF (x right, y up, z forward) -> Blender (x right, y back-to-front is -z_gltf, z up)
def to_blender(points):
    """float [..., 3] in glTF axes -> Blender axes: (x, y, z) -> (x, -z, y)."""
    np = _np()
    out = np.empty_like(points)
    out[..., 0] = points[..., 0]
    out[..., 1] = -points[..., 2]
    out[..., 2] = points[..., 1]
    return out


def from_blender(points):
    """float [..., 3] in Blender axes -> glTF axes: (x, y, z) -> (x, z, -y)."""
    np = _np()
    out = np.empty_like(points)
    out[..., 0] = points[..., 0]
    out[..., 1] = points[..., 2]
    out[..., 2] = -points[..., 1]
    return out
