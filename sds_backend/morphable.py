"""Linear morphable head model: a mean mesh plus shape components, stored as one `.npz` bundle.

Bundle fields (glTF axes: +Y up, +Z forward; metres):

    mean        float32 [V, 3]      rest shape
    basis       float32 [K, V, 3]   shape components; weight 1 = one standard deviation
    names       str     [K]         one name per component (Blender shape-key names)
    faces       int32   [F, 3]      triangles for rendering, indices into `mean`
    uv          float32 [T, 2]      texture coordinates in [0, 1], v up (glTF flips v on export)
    uv_faces    int32   [F, 3]      triangles into `uv`, one per row of `faces`
    polygons    int32   [P, 4]      optional quads for Blender; -1 pads a triangle (last slot)
    expr_basis  float32 [E, V, 3]   optional expression block (ARKit blendshapes)
    expr_names  str     [E]
    meta        str                 optional JSON: provenance, licence, build details

`vertices(weights)` = mean + weights . basis, batched, on the weights' device and dtype.
"""
from __future__ import annotations

import io
import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

REQUIRED_FIELDS = ("mean", "basis", "names", "faces", "uv", "uv_faces")
OPTIONAL_FIELDS = ("polygons", "expr_basis", "expr_names", "meta")


class BundleError(ValueError):
    """A morphable-model bundle that cannot be used; the message names the field."""


@dataclass(frozen=True)
class MorphableModel:
    mean: np.ndarray
    basis: np.ndarray
    names: tuple[str, ...]
    faces: np.ndarray
    uv: np.ndarray
    uv_faces: np.ndarray
    polygons: np.ndarray | None = None
    expr_basis: np.ndarray | None = None
    expr_names: tuple[str, ...] = ()
    meta: dict[str, Any] = field(default_factory=dict)

    # ----------------------------------------------------------------- sizes
    @property
    def num_vertices(self) -> int:
        return int(self.mean.shape[0])

    @property
    def num_components(self) -> int:
        return int(self.basis.shape[0])

    @property
    def num_expressions(self) -> int:
        return 0 if self.expr_basis is None else int(self.expr_basis.shape[0])

    # ------------------------------------------------------------------- I/O
    @classmethod
    def from_arrays(cls, **arrays: Any) -> "MorphableModel":
        """Build from raw arrays (as read from a bundle) and validate."""
        missing = [name for name in REQUIRED_FIELDS if name not in arrays or arrays[name] is None]
        if missing:
            raise BundleError(f"bundle is missing required field(s): {', '.join(missing)}")
        unknown = sorted(set(arrays) - set(REQUIRED_FIELDS) - set(OPTIONAL_FIELDS))
        if unknown:
            raise BundleError(f"bundle has unknown field(s): {', '.join(unknown)}")
        meta = arrays.get("meta")
        if isinstance(meta, np.ndarray):
            meta = meta.item() if meta.shape == () else str(meta)
        if isinstance(meta, str):
            try:
                meta = json.loads(meta) if meta else {}
            except json.JSONDecodeError as exc:
                raise BundleError(f"field 'meta' is not valid JSON: {exc}") from None
        if meta is not None and not isinstance(meta, dict):
            raise BundleError(f"field 'meta' must be a JSON object, got {type(meta).__name__}")

        def names_of(key: str) -> tuple[str, ...]:
            value = arrays.get(key)
            if value is None:
                return ()
            value = np.asarray(value)
            if value.ndim != 1:
                raise BundleError(f"field '{key}' must be 1-D, got shape {value.shape}")
            return tuple(str(v) for v in value.tolist())

        model = cls(
            mean=np.asarray(arrays["mean"]),
            basis=np.asarray(arrays["basis"]),
            names=names_of("names"),
            faces=np.asarray(arrays["faces"]),
            uv=np.asarray(arrays["uv"]),
            uv_faces=np.asarray(arrays["uv_faces"]),
            polygons=None if arrays.get("polygons") is None else np.asarray(arrays["polygons"]),
            expr_basis=None if arrays.get("expr_basis") is None else np.asarray(arrays["expr_basis"]),
            expr_names=names_of("expr_names"),
            meta=dict(meta or {}),
        )
        model.validate()
        return model._canonical()

    @classmethod
    def load(cls, path: str | Path) -> "MorphableModel":
        """A `.npz` bundle, or a `.glb` whose first mesh has morph targets (see glb_import)."""
        path = Path(path)
        if not path.is_file():
            raise BundleError(f"bundle not found: {path}")
        if path.suffix.lower() == ".glb":
            from .glb_import import morphable_from_glb

            try:
                return morphable_from_glb(path)
            except BundleError:
                raise
            except (ValueError, KeyError, IndexError, TypeError) as exc:
                raise BundleError(f"{path}: cannot read as a morphable model: {exc}") from None
        try:
            with np.load(path, allow_pickle=False) as data:
                arrays = {key: data[key] for key in data.files}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
            raise BundleError(f"cannot read bundle {path}: {exc}") from None
        try:
            return cls.from_arrays(**arrays)
        except BundleError as exc:
            raise BundleError(f"{path}: {exc}") from None

    def to_arrays(self) -> dict[str, np.ndarray]:
        arrays = {
            "mean": self.mean, "basis": self.basis, "names": np.array(self.names, dtype=np.str_),
            "faces": self.faces, "uv": self.uv, "uv_faces": self.uv_faces,
        }
        if self.polygons is not None:
            arrays["polygons"] = self.polygons
        if self.expr_basis is not None:
            arrays["expr_basis"] = self.expr_basis
            arrays["expr_names"] = np.array(self.expr_names, dtype=np.str_)
        if self.meta:
            arrays["meta"] = np.array(json.dumps(self.meta, sort_keys=True))
        return arrays

    def save(self, path: str | Path) -> None:
        """Write the bundle; byte-identical output for identical content (no timestamps)."""
        self.validate()
        buffer = io.BytesIO()
        np.savez_compressed(buffer, **self.to_arrays())
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_bytes(_strip_zip_timestamps(buffer.getvalue()))

    # ------------------------------------------------------------ validation
    def validate(self) -> None:
        """Raise BundleError naming the first malformed field."""
        mean, basis, faces, uv, uv_faces = self.mean, self.basis, self.faces, self.uv, self.uv_faces
        _check_float(mean, "mean", 2, (None, 3))
        num_vertices = mean.shape[0]
        if num_vertices < 3:
            raise BundleError(f"field 'mean' needs at least 3 vertices, got {num_vertices}")
        _check_float(basis, "basis", 3, (None, num_vertices, 3))
        if basis.shape[0] == 0:
            raise BundleError("field 'basis' has no components: a morphable model needs at least one")
        if len(self.names) != basis.shape[0]:
            raise BundleError(f"field 'names' has {len(self.names)} entries but 'basis' has K={basis.shape[0]} components")
        _check_names(self.names, "names")
        _check_index(faces, "faces", (None, 3), num_vertices, "mean")
        if faces.shape[0] == 0:
            raise BundleError("field 'faces' is empty")
        _check_float(uv, "uv", 2, (None, 2))
        if uv.size and (uv.min() < 0.0 or uv.max() > 1.0):
            raise BundleError(f"field 'uv' must lie in [0, 1], got range [{uv.min():.4g}, {uv.max():.4g}]")
        _check_index(uv_faces, "uv_faces", (faces.shape[0], 3), uv.shape[0], "uv")
        if self.polygons is not None:
            polygons = self.polygons
            if polygons.ndim != 2 or polygons.shape[1] not in (3, 4):
                raise BundleError(f"field 'polygons' must have shape [P, 3] or [P, 4], got {polygons.shape}")
            if not np.issubdtype(polygons.dtype, np.integer):
                raise BundleError(f"field 'polygons' must be integer, got {polygons.dtype}")
            if polygons[:, :3].min(initial=0) < 0 or polygons.max(initial=0) >= num_vertices:
                raise BundleError(f"field 'polygons' indexes outside [0, {num_vertices}) of 'mean'")
            if polygons.shape[1] == 4 and polygons[:, 3].min(initial=0) < -1:
                raise BundleError("field 'polygons' pads triangles with -1 only")
        if self.expr_basis is not None:
            _check_float(self.expr_basis, "expr_basis", 3, (None, num_vertices, 3))
            if len(self.expr_names) != self.expr_basis.shape[0]:
                raise BundleError(
                    f"field 'expr_names' has {len(self.expr_names)} entries but 'expr_basis' has E={self.expr_basis.shape[0]}")
            _check_names(self.expr_names, "expr_names")
        elif self.expr_names:
            raise BundleError("field 'expr_names' given without 'expr_basis'")

    def _canonical(self) -> "MorphableModel":
        """Same model with the dtypes the rest of the code relies on."""
        def f32(a: np.ndarray | None) -> np.ndarray | None:
            return None if a is None else np.ascontiguousarray(a, dtype=np.float32)

        def i32(a: np.ndarray | None) -> np.ndarray | None:
            return None if a is None else np.ascontiguousarray(a, dtype=np.int32)

        return MorphableModel(
            mean=f32(self.mean), basis=f32(self.basis), names=self.names, faces=i32(self.faces),
            uv=f32(self.uv), uv_faces=i32(self.uv_faces), polygons=i32(self.polygons),
            expr_basis=f32(self.expr_basis), expr_names=self.expr_names, meta=self.meta,
        )

    # --------------------------------------------------------------- geometry
    def torch_buffers(self, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> "MorphableTensors":
        return MorphableTensors(
            mean=torch.as_tensor(self.mean, device=device, dtype=dtype),
            basis=torch.as_tensor(self.basis.reshape(self.num_components, -1), device=device, dtype=dtype),
            faces=torch.as_tensor(self.faces, device=device, dtype=torch.int64),
        )

    def vertices(self, weights: torch.Tensor | np.ndarray) -> torch.Tensor:
        """mean + weights . basis.  weights float [..., K] -> float [..., V, 3] on the weights' device."""
        weights = torch.as_tensor(weights)
        if not weights.is_floating_point():
            weights = weights.float()
        return self.torch_buffers(weights.device, weights.dtype).vertices(weights)


@dataclass(frozen=True)
class MorphableTensors:
    """The model's arrays as tensors on one device, for use inside a loop."""

    mean: torch.Tensor    # [V, 3]
    basis: torch.Tensor   # [K, V*3]
    faces: torch.Tensor   # int64 [F, 3]

    def vertices(self, weights: torch.Tensor) -> torch.Tensor:
        """weights [..., K] -> vertices [..., V, 3]; differentiable in the weights."""
        num_components = self.basis.shape[0]
        if weights.shape[-1] != num_components:
            raise ValueError(f"weights: expected last dimension K={num_components}, got shape {tuple(weights.shape)}")
        offsets = weights.to(self.basis.dtype) @ self.basis
        return self.mean + offsets.reshape(*weights.shape[:-1], -1, 3)


def _check_float(array: np.ndarray, name: str, ndim: int, shape: tuple[int | None, ...]) -> None:
    if not isinstance(array, np.ndarray) or not np.issubdtype(array.dtype, np.floating):
        raise BundleError(f"field '{name}' must be a float array, got {getattr(array, 'dtype', type(array).__name__)}")
    if array.ndim != ndim or any(want is not None and got != want for got, want in zip(array.shape, shape)):
        expected = "[" + ", ".join("?" if s is None else str(s) for s in shape) + "]"
        raise BundleError(f"field '{name}' must have shape {expected}, got {list(array.shape)}")
    if not np.isfinite(array).all():
        raise BundleError(f"field '{name}' contains NaN or inf ({int((~np.isfinite(array)).sum())} values)")


def _check_index(array: np.ndarray, name: str, shape: tuple[int | None, ...], bound: int, target: str) -> None:
    if not isinstance(array, np.ndarray) or not np.issubdtype(array.dtype, np.integer):
        raise BundleError(f"field '{name}' must be an integer array, got {getattr(array, 'dtype', type(array).__name__)}")
    if array.ndim != len(shape) or any(want is not None and got != want for got, want in zip(array.shape, shape)):
        expected = "[" + ", ".join("?" if s is None else str(s) for s in shape) + "]"
        raise BundleError(f"field '{name}' must have shape {expected}, got {list(array.shape)}")
    if array.size and (array.min() < 0 or array.max() >= bound):
        raise BundleError(f"field '{name}' indexes outside [0, {bound}) of '{target}' "
                          f"(range [{array.min()}, {array.max()}])")


def _check_names(names: tuple[str, ...], field_name: str) -> None:
    if any(not n.strip() for n in names):
        raise BundleError(f"field '{field_name}' contains an empty name")
    if len(set(names)) != len(names):
        dupes = sorted({n for n in names if names.count(n) > 1})
        raise BundleError(f"field '{field_name}' has duplicate names: {', '.join(dupes[:5])}")


def _strip_zip_timestamps(data: bytes) -> bytes:
    """Rewrite a zip archive with fixed member timestamps so identical content gives identical bytes."""
    source = zipfile.ZipFile(io.BytesIO(data))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED) as target:
        for info in source.infolist():
            fixed = zipfile.ZipInfo(info.filename, date_time=(1980, 1, 1, 0, 0, 0))
            fixed.compress_type = zipfile.ZIP_DEFLATED
            fixed.external_attr = 0o644 << 16
            target.writestr(fixed, source.read(info.filename), compresslevel=9)
    return out.getvalue()
