"""The morphable head bundle: its fields, its checks and its two file formats (numpy + stdlib).

This is the one definition of a bundle for both processes: the backend imports it as
`sds_backend.bundle`, the Blender add-on imports the very same file through its shared
subpackage (blender_addon/paths.py), as it does protocol.py. It imports nothing but numpy, the
standard library and `files`.

Fields (glTF axes: +Y up, +Z forward; metres):

    mean        float32 [V, 3]      rest shape
    basis       float32 [K, V, 3]   shape components; weight 1 = one standard deviation
    names       str     [K]         one name per component (Blender shape-key names)
    faces       int32   [F, 3]      triangles for rendering, indices into `mean`
    uv          float32 [T, 2]      texture coordinates in [0, 1], v up (glTF flips v on export)
    uv_faces    int32   [F, 3]      triangles into `uv`, one per row of `faces`
    polygons    int32   [P, 4]      optional quads for Blender; -1 pads a triangle (last slot)
    expr_basis  float32 [E, V, 3]   optional expression block (ARKit blendshapes)
    expr_names  str     [E]
    meta        JSON object         optional: provenance, licence, build details

Files: `.npz` (numpy's zip of .npy arrays, read with pickling off, member sizes checked before
anything is decompressed) or `.glb` (the first mesh's POSITION, TEXCOORD_0, indices and POSITION
morph targets; every accessor is bounds-checked against its buffer before it is read).

`check` rejects what would break a fit later, naming the field: wrong shapes or dtypes, NaN or
inf (also values that overflow float32), indices out of range, duplicate or unprintable names,
and degenerate geometry (all vertices at one point, every triangle of zero area, a size outside
LIMITS, components that move vertices by more than MAX_DISPLACEMENT_RATIO head sizes).
"""
from __future__ import annotations

import hashlib
import io
import json
import struct
import unicodedata
import zipfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from .files import InputError, atomic_write, check_input_file, parse_json

REQUIRED_FIELDS = ("mean", "basis", "names", "faces", "uv", "uv_faces")
OPTIONAL_FIELDS = ("polygons", "expr_basis", "expr_names", "meta")
SUFFIXES = (".npz", ".glb")
MAX_FILE_BYTES = 2 << 30            # a bundle file, and all arrays of an .npz once decompressed
MAX_VERTICES = 1_000_000
MAX_FACES = 2_000_000
MAX_COMPONENTS = 1024               # components, and expressions
MAX_NAME_CHARS = 200
MAX_META_CHARS = 1 << 20
MIN_SIZE_M, MAX_SIZE_M = 1e-4, 1e4  # the mesh's largest bounding-box side
MAX_COORDINATE_M = 1e4
MAX_DISPLACEMENT_RATIO = 10.0       # a component may move a vertex by at most this many mesh sizes


class BundleError(ValueError):
    """A bundle that cannot be used; the message names the file (when there is one) and the field."""


@dataclass(frozen=True)
class Bundle:
    """A validated bundle with canonical dtypes (float32 arrays, int32 indices, str names)."""

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

    @property
    def num_vertices(self) -> int:
        return int(self.mean.shape[0])

    @property
    def num_components(self) -> int:
        return int(self.basis.shape[0])

    @property
    def num_expressions(self) -> int:
        return 0 if self.expr_basis is None else int(self.expr_basis.shape[0])

    @classmethod
    def from_arrays(cls, **arrays: Any) -> "Bundle":
        """A checked bundle from raw arrays (as read from a file, or built in memory)."""
        missing = [name for name in REQUIRED_FIELDS if arrays.get(name) is None]
        if missing:
            raise BundleError(f"missing required field(s): {', '.join(missing)}")
        unknown = sorted(set(arrays) - set(REQUIRED_FIELDS) - set(OPTIONAL_FIELDS))
        if unknown:
            raise BundleError(f"unknown field(s): {', '.join(unknown)}")
        bundle = cls(
            mean=_float_array(arrays["mean"], "mean"), basis=_float_array(arrays["basis"], "basis"),
            names=_names(arrays["names"], "names"), faces=_index_array(arrays["faces"], "faces"),
            uv=_float_array(arrays["uv"], "uv"), uv_faces=_index_array(arrays["uv_faces"], "uv_faces"),
            polygons=None if arrays.get("polygons") is None else _index_array(arrays["polygons"], "polygons"),
            expr_basis=None if arrays.get("expr_basis") is None else _float_array(arrays["expr_basis"], "expr_basis"),
            expr_names=() if arrays.get("expr_names") is None else _names(arrays["expr_names"], "expr_names"),
            meta=_meta(arrays.get("meta")),
        )
        check(bundle)
        return bundle

    def to_arrays(self) -> dict[str, np.ndarray]:
        """The fields as arrays, in the order a file stores them."""
        arrays = {"mean": self.mean, "basis": self.basis, "names": np.array(self.names, dtype=np.str_),
                  "faces": self.faces, "uv": self.uv, "uv_faces": self.uv_faces}
        if self.polygons is not None:
            arrays["polygons"] = self.polygons
        if self.expr_basis is not None:
            arrays["expr_basis"] = self.expr_basis
            arrays["expr_names"] = np.array(self.expr_names, dtype=np.str_)
        if self.meta:
            arrays["meta"] = np.array(json.dumps(self.meta, sort_keys=True))
        return arrays

    def with_meta(self, **meta: Any) -> "Bundle":
        return replace(self, meta={**self.meta, **meta})

    def digest(self) -> str:
        """Identity of the geometry (mean, basis, faces): a checkpoint resumes only on the same one."""
        hasher = hashlib.sha256()
        for array in (self.mean, self.basis, self.faces):
            hasher.update(np.ascontiguousarray(array).tobytes())
        return hasher.hexdigest()[:16]


# ------------------------------------------------------------------------------------ conversion
def _float_array(value: Any, name: str) -> np.ndarray:
    array = np.asarray(value)
    if not np.issubdtype(array.dtype, np.floating):
        raise BundleError(f"field '{name}' must be a float array, got {array.dtype}")
    with np.errstate(over="ignore"):
        return np.ascontiguousarray(array, dtype=np.float32)   # values beyond float32 become inf: caught below


def _index_array(value: Any, name: str) -> np.ndarray:
    array = np.asarray(value)
    if not np.issubdtype(array.dtype, np.integer):
        raise BundleError(f"field '{name}' must be an integer array, got {array.dtype}")
    limits = np.iinfo(np.int32)
    if array.size and (array.min() < limits.min or array.max() > limits.max):
        raise BundleError(f"field '{name}' has indices outside the int32 range")
    return np.ascontiguousarray(array, dtype=np.int32)


def _names(value: Any, name: str) -> tuple[str, ...]:
    array = np.asarray(value)
    if array.ndim != 1:
        raise BundleError(f"field '{name}' must be 1-D, got shape {list(array.shape)}")
    if array.dtype.kind == "S":
        try:
            return tuple(item.decode("utf-8") for item in array.tolist())
        except UnicodeDecodeError:
            raise BundleError(f"field '{name}' holds bytes that are not UTF-8") from None
    if array.dtype.kind != "U":
        raise BundleError(f"field '{name}' must be an array of strings, got {array.dtype}")
    return tuple(str(item) for item in array.tolist())


def _meta(value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if isinstance(value, np.ndarray):
        if value.dtype.kind != "U" or value.shape != ():
            raise BundleError(f"field 'meta' must be one JSON string, got {value.dtype} {list(value.shape)}")
        value = str(value.item())
    if isinstance(value, str):
        if len(value) > MAX_META_CHARS:
            raise BundleError(f"field 'meta' has {len(value)} characters, more than {MAX_META_CHARS}")
        try:
            value = parse_json(value, "field 'meta'") if value else {}
        except InputError as exc:
            raise BundleError(str(exc).replace(": not valid JSON", " is not valid JSON")) from None
    if not isinstance(value, dict):
        raise BundleError(f"field 'meta' must be a JSON object, got {type(value).__name__}")
    return dict(value)


# ------------------------------------------------------------------------------------------ checks
def check(bundle: Bundle) -> None:
    """Raise BundleError naming the first field that a fit, the renderer or Blender cannot use."""
    mean, basis, faces, uv, uv_faces = bundle.mean, bundle.basis, bundle.faces, bundle.uv, bundle.uv_faces
    _check_shape(mean, "mean", (None, 3))
    num_vertices = mean.shape[0]
    if not 3 <= num_vertices <= MAX_VERTICES:
        raise BundleError(f"field 'mean' must have 3 to {MAX_VERTICES} vertices, got {num_vertices}")
    _check_finite(mean, "mean")
    _check_shape(basis, "basis", (None, num_vertices, 3))
    if basis.shape[0] == 0:
        raise BundleError("field 'basis' has no components: a morphable model needs at least one")
    if basis.shape[0] > MAX_COMPONENTS:
        raise BundleError(f"field 'basis' has {basis.shape[0]} components, more than {MAX_COMPONENTS}")
    if len(bundle.names) != basis.shape[0]:
        raise BundleError(f"field 'names' has {len(bundle.names)} entries but 'basis' has K={basis.shape[0]} components")
    _check_finite(basis, "basis")
    _check_shape(faces, "faces", (None, 3))
    if not 1 <= faces.shape[0] <= MAX_FACES:
        raise BundleError(f"field 'faces' must have 1 to {MAX_FACES} triangles, got {faces.shape[0]}")
    _check_indices(faces, "faces", num_vertices, "mean")
    _check_shape(uv, "uv", (None, 2))
    _check_finite(uv, "uv")
    if uv.size and (uv.min() < 0.0 or uv.max() > 1.0):
        raise BundleError(f"field 'uv' must lie in [0, 1], got range [{uv.min():.4g}, {uv.max():.4g}]")
    _check_shape(uv_faces, "uv_faces", (faces.shape[0], 3))
    _check_indices(uv_faces, "uv_faces", uv.shape[0], "uv")
    if bundle.polygons is not None:
        polygons = bundle.polygons
        if polygons.ndim != 2 or polygons.shape[1] not in (3, 4):
            raise BundleError(f"field 'polygons' must have shape [P, 3] or [P, 4], got {list(polygons.shape)}")
        if polygons[:, :3].min(initial=0) < 0 or polygons.max(initial=0) >= num_vertices:
            raise BundleError(f"field 'polygons' indexes outside [0, {num_vertices}) of 'mean'")
        if polygons.shape[1] == 4 and polygons[:, 3].min(initial=0) < -1:
            raise BundleError("field 'polygons' pads triangles with -1 only")
    if bundle.expr_basis is not None:
        _check_shape(bundle.expr_basis, "expr_basis", (None, num_vertices, 3))
        if bundle.expr_basis.shape[0] > MAX_COMPONENTS:
            raise BundleError(f"field 'expr_basis' has more than {MAX_COMPONENTS} expressions")
        if len(bundle.expr_names) != bundle.expr_basis.shape[0]:
            raise BundleError(f"field 'expr_names' has {len(bundle.expr_names)} entries but 'expr_basis' has "
                              f"E={bundle.expr_basis.shape[0]}")
        _check_finite(bundle.expr_basis, "expr_basis")
    elif bundle.expr_names:
        raise BundleError("field 'expr_names' given without 'expr_basis'")
    _check_names(bundle.names, "names")
    _check_names(bundle.expr_names, "expr_names")
    shared = sorted(set(bundle.names) & set(bundle.expr_names))
    if shared:
        raise BundleError(f"fields 'names' and 'expr_names' share the name(s) {', '.join(shared[:5])}")
    _check_geometry(bundle)


def _check_shape(array: np.ndarray, name: str, shape: tuple[int | None, ...]) -> None:
    if array.ndim != len(shape) or any(want is not None and got != want for got, want in zip(array.shape, shape)):
        expected = "[" + ", ".join("?" if s is None else str(s) for s in shape) + "]"
        raise BundleError(f"field '{name}' must have shape {expected}, got {list(array.shape)}")


def _check_finite(array: np.ndarray, name: str) -> None:
    bad = ~np.isfinite(array)
    if bad.any():
        raise BundleError(f"field '{name}' contains NaN or inf ({int(bad.sum())} values; values beyond float32's "
                          "range count as inf)")


def _check_indices(array: np.ndarray, name: str, bound: int, target: str) -> None:
    if array.size and (array.min() < 0 or array.max() >= bound):
        raise BundleError(f"field '{name}' indexes outside [0, {bound}) of '{target}' "
                          f"(range [{array.min()}, {array.max()}])")


def _check_names(names: tuple[str, ...], field_name: str) -> None:
    for name in names:
        if not name.strip():
            raise BundleError(f"field '{field_name}' contains an empty name")
        if len(name) > MAX_NAME_CHARS:
            raise BundleError(f"field '{field_name}': name {name[:40]!r}... has {len(name)} characters, "
                              f"more than {MAX_NAME_CHARS}")
        if any(unicodedata.category(char) in ("Cc", "Cs") for char in name):
            raise BundleError(f"field '{field_name}': name {name!r} contains a control character or a lone "
                              "UTF-16 surrogate")
    if len(set(names)) != len(names):
        duplicates = sorted({n for n in names if names.count(n) > 1})
        raise BundleError(f"field '{field_name}' has duplicate names: {', '.join(duplicates[:5])}")


def _check_geometry(bundle: Bundle) -> None:
    """Sizes a renderer and an optimiser can work with: a real extent, a real surface, sane components."""
    mean = bundle.mean.astype(np.float64)
    size = float((mean.max(0) - mean.min(0)).max())
    if size == 0.0:
        raise BundleError("field 'mean': all vertices lie at one point")
    if not MIN_SIZE_M <= size <= MAX_SIZE_M:
        raise BundleError(f"field 'mean': the mesh is {size:.4g} m across; expected {MIN_SIZE_M:g} m to "
                          f"{MAX_SIZE_M:g} m (metres, glTF axes)")
    far = float(np.abs(mean).max())
    if far > MAX_COORDINATE_M:
        raise BundleError(f"field 'mean': a vertex lies {far:.4g} m from the origin; expected within "
                          f"{MAX_COORDINATE_M:g} m")
    corners = mean[bundle.faces]
    areas = np.linalg.norm(np.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0]), axis=1)
    if not (areas > 0).any():
        raise BundleError("field 'faces': every triangle has zero area")
    for block, names, field_name in ((bundle.basis, bundle.names, "basis"),
                                     (bundle.expr_basis, bundle.expr_names, "expr_basis")):
        if block is None:
            continue
        largest = np.abs(block).reshape(block.shape[0], -1).max(1)
        worst = int(largest.argmax())
        if largest[worst] > MAX_DISPLACEMENT_RATIO * size:
            raise BundleError(f"field '{field_name}': component '{names[worst]}' moves a vertex by "
                              f"{largest[worst]:.4g} m, more than {MAX_DISPLACEMENT_RATIO:g} times the mesh's size "
                              f"({size:.4g} m)")


# ------------------------------------------------------------------------------------------- files
def load(path: str | Path) -> Bundle:
    """A bundle from an `.npz` file, or from a `.glb` whose first mesh has morph targets."""
    try:
        path = check_input_file(path, "bundle", MAX_FILE_BYTES)
    except InputError as exc:
        raise BundleError(str(exc)) from None
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise BundleError(f"bundle: {path} is neither .npz nor .glb")
    try:
        return _load_glb(path) if suffix == ".glb" else _load_npz(path)
    except BundleError as exc:
        raise BundleError(f"{path}: {exc}") from None


def _load_npz(path: Path) -> Bundle:
    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
            unpacked = sum(member.file_size for member in members)
            if unpacked > MAX_FILE_BYTES:
                raise BundleError(f"the arrays would take {unpacked} bytes once decompressed, more than "
                                  f"{MAX_FILE_BYTES}")
            arrays = {}
            for member in members:
                name = member.filename.removesuffix(".npy")
                with archive.open(member) as handle:
                    arrays[name] = np.lib.format.read_array(handle, allow_pickle=False)
    except BundleError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, NotImplementedError, RuntimeError) as exc:
        raise BundleError(f"cannot read the file as an .npz bundle: {type(exc).__name__}: {str(exc)[:200]}") from None
    return Bundle.from_arrays(**arrays)


def npz_bytes(bundle: Bundle, compress: bool = True) -> bytes:
    """The bundle as `.npz` bytes, identical for identical content (fixed member timestamps)."""
    check(bundle)
    out = io.BytesIO()
    method = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
    with zipfile.ZipFile(out, "w", compression=method) as archive:
        for name, array in bundle.to_arrays().items():
            member = io.BytesIO()
            np.lib.format.write_array(member, np.asanyarray(array), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = method
            info.external_attr = 0o644 << 16
            archive.writestr(info, member.getvalue(), compresslevel=9 if compress else None)
    return out.getvalue()


def save(bundle: Bundle, path: str | Path, compress: bool = True) -> Path:
    """Write the bundle atomically (files.OutputError when that fails; the target is then unchanged).
    compress=False is for short-lived copies, where writing fast matters more than size."""
    return atomic_write(Path(path), npz_bytes(bundle, compress))


# -------------------------------------------------------------------------------------------- glTF
_GLB_MAGIC, _JSON_CHUNK, _BIN_CHUNK = b"glTF", 0x4E4F534A, 0x004E4942
_COMPONENTS = {"SCALAR": 1, "VEC2": 2, "VEC3": 3, "VEC4": 4}
_DTYPES = {5120: np.int8, 5121: np.uint8, 5122: np.int16, 5123: np.uint16, 5125: np.uint32, 5126: np.float32}


def read_glb(data: bytes) -> tuple[dict, bytes]:
    """The JSON document and the binary chunk of a GLB file's bytes."""
    if len(data) < 20 or data[:4] != _GLB_MAGIC:
        raise BundleError("not a binary glTF (.glb) file")
    version, total = struct.unpack_from("<II", data, 4)
    if version != 2:
        raise BundleError(f"glTF version {version}, expected 2")
    offset, document, binary = 12, None, b""
    end = min(total, len(data))
    while offset + 8 <= end:
        length, kind = struct.unpack_from("<II", data, offset)
        if offset + 8 + length > end:
            raise BundleError(f"a chunk of {length} bytes runs past the end of the file")
        chunk = data[offset + 8: offset + 8 + length]
        if kind == _JSON_CHUNK and document is None:
            try:
                document = parse_json(chunk, "the glTF JSON chunk")
            except InputError as exc:
                raise BundleError(str(exc)) from None
        elif kind == _BIN_CHUNK and not binary:
            binary = chunk
        offset += 8 + length
    if not isinstance(document, dict):
        raise BundleError("no JSON chunk with a glTF document")
    return document, binary


def _item(container: Any, key: str | int, kind: type | tuple[type, ...], where: str) -> Any:
    """container[key] of the expected JSON type, or BundleError naming where it should be."""
    try:
        value = container[key]
    except (KeyError, IndexError, TypeError):
        raise BundleError(f"{where}: missing") from None
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise BundleError(f"{where}: expected {getattr(kind, '__name__', kind)}, got {type(value).__name__}")
    return value


def _accessor(document: dict, binary: bytes, index: Any, where: str) -> np.ndarray:
    """Accessor `index` as float64/int64 [count] or [count, width], bounds-checked against the buffer."""
    accessors = _item(document, "accessors", list, "accessors")
    if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < len(accessors):
        raise BundleError(f"{where}: accessor index {index!r} is not one of the {len(accessors)} accessors")
    accessor = _item(accessors, index, dict, f"accessor {index}")
    if "sparse" in accessor:
        raise BundleError(f"{where}: sparse accessors are not supported; export the morph targets densely")
    if "bufferView" not in accessor:
        raise BundleError(f"{where}: the accessor has no data (compressed with Draco or meshopt?); export uncompressed")
    views = _item(document, "bufferViews", list, "bufferViews")
    view_index = _item(accessor, "bufferView", int, f"accessor {index} bufferView")
    view = _item(views, view_index, dict, f"bufferView {view_index}") if 0 <= view_index < len(views) else None
    if view is None:
        raise BundleError(f"accessor {index}: bufferView {view_index} does not exist")
    buffer_index = view.get("buffer", 0)
    buffers = document.get("buffers") or [{}]
    if buffer_index != 0 or (isinstance(buffers, list) and buffers and isinstance(buffers[0], dict)
                             and "uri" in buffers[0]):
        raise BundleError(f"accessor {index}: data outside the .glb's own binary chunk is not supported")
    component = accessor.get("componentType")
    kind = accessor.get("type")
    if component not in _DTYPES or kind not in _COMPONENTS:
        raise BundleError(f"accessor {index}: unsupported componentType {component!r} / type {kind!r}")
    dtype, width = np.dtype(_DTYPES[component]), _COMPONENTS[kind]
    count = _item(accessor, "count", int, f"accessor {index} count")
    element = dtype.itemsize * width
    view_start = view.get("byteOffset", 0)
    view_length = _item(view, "byteLength", int, f"bufferView {view_index} byteLength")
    stride = view.get("byteStride") or element
    offset = accessor.get("byteOffset", 0)
    numbers = (count, view_start, view_length, stride, offset)
    if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in numbers) or stride < element:
        raise BundleError(f"accessor {index}: negative or non-integer count, offset, length or stride")
    needed = 0 if count == 0 else offset + stride * (count - 1) + element
    if needed > view_length or view_start + view_length > len(binary):
        raise BundleError(f"accessor {index}: {count} elements run past the end of their buffer")
    raw = np.frombuffer(binary, dtype=np.uint8, count=needed, offset=view_start) if count else np.zeros(0, np.uint8)
    rows = np.lib.stride_tricks.as_strided(raw[offset:], shape=(count, element), strides=(stride, 1))
    array = np.ascontiguousarray(rows).view(dtype).reshape(count, width)
    if accessor.get("normalized") and np.issubdtype(dtype, np.integer):
        # glTF's normalized integers: unsigned map to [0, 1], signed to [-1, 1]
        array = np.maximum(array.astype(np.float64) / np.iinfo(dtype).max, -1.0)
    array = array.astype(np.int64 if np.issubdtype(array.dtype, np.integer) else np.float64)
    return array[:, 0] if width == 1 else array


def _load_glb(path: Path) -> Bundle:
    return from_glb(path.read_bytes(), path.name)


def from_glb(data: bytes, source: str = "a .glb") -> Bundle:
    """The first mesh of a GLB as a bundle: POSITION, TEXCOORD_0, indices and POSITION targets.

    glTF stores one UV per vertex, so exporters split vertices along UV seams. Split copies are
    welded back (same position and same morph deltas) for `faces`, which keeps seams from
    looking like open boundaries to the renderer, while `uv_faces` keeps the per-corner UVs.
    The mesh's node transform is not applied: the bundle uses the mesh's own coordinates.
    """
    document, binary = read_glb(data)
    mesh = _item(_item(document, "meshes", list, "meshes"), 0, dict, "meshes[0]")
    primitives = _item(mesh, "primitives", list, "meshes[0].primitives")
    if len(primitives) != 1:
        raise BundleError(f"the first mesh has {len(primitives)} primitives; join them into one")
    primitive = _item(primitives, 0, dict, "meshes[0].primitives[0]")
    attributes = _item(primitive, "attributes", dict, "the mesh's attributes")
    if primitive.get("mode", 4) != 4:
        raise BundleError(f"the mesh is drawn with glTF mode {primitive['mode']!r}; only triangle lists (4) "
                          "are supported")
    if "POSITION" not in attributes:
        raise BundleError("the mesh has no POSITION attribute")
    positions = _accessor(document, binary, attributes["POSITION"], "POSITION")
    if positions.ndim != 2 or positions.shape[1] != 3:
        raise BundleError("POSITION must be VEC3")
    targets = primitive.get("targets") or []
    if not isinstance(targets, list) or not targets:
        raise BundleError("the mesh has no morph targets (shape keys) to fit")
    if "indices" in primitive:
        indices = _accessor(document, binary, primitive["indices"], "indices")
    else:
        indices = np.arange(len(positions))
    if indices.ndim != 1 or indices.size % 3 or not np.issubdtype(indices.dtype, np.integer):
        raise BundleError("indices must be one integer per corner, three per triangle")
    if indices.size and (indices.min() < 0 or indices.max() >= len(positions)):
        raise BundleError(f"indices point outside the {len(positions)} vertices")
    indices = indices.reshape(-1, 3)
    deltas = []
    for k, target in enumerate(targets):
        if not isinstance(target, dict) or "POSITION" not in target:
            raise BundleError(f"morph target {k} has no POSITION")
        delta = _accessor(document, binary, target["POSITION"], f"morph target {k}")
        if delta.shape != positions.shape:
            raise BundleError(f"morph target {k} has shape {list(delta.shape)}, POSITION {list(positions.shape)}")
        deltas.append(delta)
    deltas = np.stack(deltas)
    names = (mesh.get("extras") or {}).get("targetNames") if isinstance(mesh.get("extras"), dict) else None
    if not (isinstance(names, list) and len(names) == len(targets) and all(isinstance(n, str) for n in names)):
        names = [f"target_{k:02d}" for k in range(len(targets))]
    if "TEXCOORD_0" in attributes:
        uv = _accessor(document, binary, attributes["TEXCOORD_0"], "TEXCOORD_0").astype(np.float32)
        if uv.shape != (len(positions), 2):
            raise BundleError("TEXCOORD_0 must be VEC2, one per vertex")
        uv[:, 1] = 1.0 - uv[:, 1]                    # glTF's v runs down the image
        uv = np.clip(uv, 0.0, 1.0)
    else:
        uv = np.zeros((len(positions), 2), np.float32)
    # weld split copies: identical position and identical deltas
    key = np.concatenate([positions, deltas.transpose(1, 0, 2).reshape(len(positions), -1)], 1)
    _, first, weld = np.unique(key, axis=0, return_index=True, return_inverse=True)
    generator = document.get("asset", {}).get("generator") if isinstance(document.get("asset"), dict) else None
    return Bundle.from_arrays(
        mean=positions[first], basis=deltas[:, first], names=np.array(names, dtype=np.str_),
        faces=weld.reshape(-1)[indices], uv=uv, uv_faces=indices,
        meta={"source": f"imported from {source}", "generator": generator if isinstance(generator, str) else None},
    )
