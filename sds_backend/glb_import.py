"""Read a morphable model from a .glb: the first mesh's morph targets become the components.

glTF stores one UV per vertex, so exporters split vertices along UV seams. Split copies are
welded back (same position and same morph deltas) for `faces`, which keeps seams from
looking like open boundaries to the renderer, while `uv_faces` keeps the per-corner UVs.
"""
from __future__ import annotations

import json
import logging
import struct
from pathlib import Path

import numpy as np

from .morphable import BundleError, MorphableModel

log = logging.getLogger("sds_backend")
_COMPONENTS = {"SCALAR": 1, "VEC2": 2, "VEC3": 3, "VEC4": 4}
_DTYPES = {5120: np.int8, 5121: np.uint8, 5122: np.int16, 5123: np.uint16, 5125: np.uint32, 5126: np.float32}


def read_glb(path: Path) -> tuple[dict, bytes]:
    data = Path(path).read_bytes()
    if len(data) < 20 or data[:4] != b"glTF":
        raise BundleError(f"{path}: not a binary glTF (.glb) file")
    version, total = struct.unpack_from("<II", data, 4)
    if version != 2:
        raise BundleError(f"{path}: glTF version {version}, expected 2")
    offset, document, binary = 12, None, b""
    while offset + 8 <= min(total, len(data)):
        length, kind = struct.unpack_from("<II", data, offset)
        chunk = data[offset + 8: offset + 8 + length]
        if kind == 0x4E4F534A:
            document = json.loads(chunk)
        elif kind == 0x004E4942:
            binary = chunk
        offset += 8 + length
    if document is None:
        raise BundleError(f"{path}: no JSON chunk")
    return document, binary


def _accessor(document: dict, binary: bytes, index: int) -> np.ndarray:
    """Accessor `index` as a numpy array [count] or [count, width]; normalized integers become floats."""
    accessor = document["accessors"][index]
    if "sparse" in accessor:
        raise BundleError("sparse accessors are not supported; export the morph targets densely")
    if "bufferView" not in accessor:
        raise BundleError("an accessor has no data (compressed with Draco or meshopt?); export uncompressed")
    view = document["bufferViews"][accessor["bufferView"]]
    dtype = np.dtype(_DTYPES[accessor["componentType"]])
    width = _COMPONENTS[accessor["type"]]
    start = view.get("byteOffset", 0) + accessor.get("byteOffset", 0)
    stride = view.get("byteStride") or dtype.itemsize * width
    count = accessor["count"]
    raw = np.frombuffer(binary, dtype=np.uint8, count=stride * (count - 1) + dtype.itemsize * width, offset=start)
    rows = np.lib.stride_tricks.as_strided(raw, shape=(count, dtype.itemsize * width), strides=(stride, 1))
    array = np.ascontiguousarray(rows).view(dtype).reshape(count, width)
    if accessor.get("normalized") and np.issubdtype(dtype, np.integer):
        # glTF's normalized integers: unsigned map to [0, 1], signed to [-1, 1]
        array = np.maximum(array.astype(np.float64) / np.iinfo(dtype).max, -1.0)
    return array[:, 0] if width == 1 else array


def morphable_from_glb(path: str | Path) -> MorphableModel:
    """The first mesh of a .glb as a bundle: POSITION, TEXCOORD_0, indices and POSITION targets."""
    path = Path(path)
    document, binary = read_glb(path)
    try:
        mesh = document["meshes"][0]
        primitive = mesh["primitives"][0]
        attributes = primitive["attributes"]
        positions = _accessor(document, binary, attributes["POSITION"]).astype(np.float64)
        targets = primitive.get("targets") or []
    except (KeyError, IndexError) as exc:
        raise BundleError(f"{path}: no mesh with POSITION in the file ({exc})") from None
    if len(mesh["primitives"]) > 1:
        raise BundleError(f"{path}: the first mesh has {len(mesh['primitives'])} primitives; join them into one")
    if primitive.get("mode", 4) != 4:
        raise BundleError(f"{path}: the mesh is drawn with glTF mode {primitive['mode']}; only triangle lists (4) "
                          "are supported")
    if any(key in node for node in document.get("nodes", []) if node.get("mesh") == 0
           for key in ("matrix", "rotation", "scale")):
        log.warning("%s: the mesh's node transform is ignored; the bundle uses the mesh's own coordinates "
                    "(glTF axes: +Y up, +Z forward, metres)", path)
    if not targets:
        raise BundleError(f"{path}: the mesh has no morph targets (shape keys) to fit")
    indices = (_accessor(document, binary, primitive["indices"]) if "indices" in primitive
               else np.arange(len(positions))).astype(np.int64).reshape(-1, 3)
    deltas = np.stack([_accessor(document, binary, t["POSITION"]) for t in targets]).astype(np.float64)
    names = (mesh.get("extras") or {}).get("targetNames") or [f"target_{k:02d}" for k in range(len(targets))]
    if "TEXCOORD_0" in attributes:
        uv = _accessor(document, binary, attributes["TEXCOORD_0"]).astype(np.float32).copy()
        uv[:, 1] = 1.0 - uv[:, 1]                    # glTF's v runs down the image
        uv = np.clip(uv, 0.0, 1.0)
    else:
        uv = np.zeros((len(positions), 2), np.float32)
    # weld split copies: identical position and identical deltas
    key = np.concatenate([positions, deltas.transpose(1, 0, 2).reshape(len(positions), -1)], 1)
    _, first, weld = np.unique(key, axis=0, return_index=True, return_inverse=True)
    return MorphableModel.from_arrays(
        mean=positions[first].astype(np.float32), basis=deltas[:, first].astype(np.float32),
        names=np.array(names), faces=weld.reshape(-1)[indices].astype(np.int32), uv=uv,
        uv_faces=indices.astype(np.int32),
        meta=json.dumps({"source": f"imported from {path.name}", "generator": document.get("asset", {}).get("generator")}),
    )
