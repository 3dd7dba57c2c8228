"""Fit outputs: weights.json, texture.png, evolution.gif and head.glb (glTF 2.0 binary).

The GLB is written by hand (the format is small) so the backend needs no glTF library:
the mean mesh, one morph target per shape component (named in mesh.extras.targetNames, the
convention Blender, three.js and Babylon read), the fitted weights as the mesh's default
morph weights, UVs and the texture embedded as PNG. Vertices are split where a vertex has
more than one UV (seams), as glTF stores one UV per vertex.
"""
from __future__ import annotations

import io
import json
import struct
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from ..bundle import Bundle
from .. import png
from ..files import atomic_write
from .morphable import MorphableTensors
from .render import camera, prepare_topology, shading

_ARRAY_BUFFER, _ELEMENT_ARRAY_BUFFER = 34962, 34963
_FLOAT, _UNSIGNED_INT = 5126, 5125
SKIN_TONE = (0.72, 0.56, 0.48)


def write_weights_json(path: Path, names: Sequence[str], weights: np.ndarray) -> None:
    """{"component name": weight, ...} in the bundle's order."""
    mapping = {name: round(float(w), 6) for name, w in zip(names, weights)}
    atomic_write(path, (json.dumps(mapping, indent=2) + "\n").encode())


def write_texture_png(path: Path, texture: np.ndarray) -> None:
    """uint8 [H, W, 3] texture, row 0 = v 1."""
    atomic_write(path, png.encode(texture))


def write_json(path: Path, payload: dict[str, Any]) -> None:
    atomic_write(path, (json.dumps(payload, indent=2, sort_keys=True) + "\n").encode())


# ------------------------------------------------------------------------------------------ GIF
def write_evolution_gif(path: Path, model: Bundle, frames: Sequence[tuple[np.ndarray, np.ndarray | None]],
                        size: int = 256, seconds: float = 3.0) -> int:
    """The head turning as the fit changes it: one frame per (weights, texture or None).

    The camera sweeps from -60 to +60 degrees yaw and back over the frames. Returns the number
    of frames written (= len(frames)).
    """
    if not frames:
        raise ValueError("frames: expected at least one (weights, texture) snapshot")
    tensors = MorphableTensors.from_bundle(model)
    topology = prepare_topology(tensors.faces)
    uv = torch.as_tensor(model.uv)
    uv_faces = torch.as_tensor(model.uv_faces, dtype=torch.int64)
    center = (tensors.mean.min(0).values + tensors.mean.max(0).values) / 2
    radius = float((tensors.mean - center).norm(dim=1).max())
    distance = camera.framing_distance(radius, 30.0, 0.9)
    count = len(frames)
    phase = np.linspace(0, 2 * np.pi, count, endpoint=False)
    images = []
    with torch.no_grad():
        for index, (weights, texture) in enumerate(frames):
            yaw = torch.tensor([60.0 * np.sin(phase[index])])
            cams = camera.orbit_cameras(yaw, torch.tensor([5.0]), distance, center, fov_deg=30.0)
            vertices = tensors.vertices(torch.as_tensor(weights, dtype=torch.float32))
            if texture is None:
                image = shading.render_mesh(vertices, tensors.faces, cams, size, topology=topology).image
            else:
                tex = torch.as_tensor(texture, dtype=torch.float32)[None] / 255
                image = shading.render_textured(vertices, tensors.faces, uv, uv_faces, tex, cams, size,
                                                ambient=0.6, topology=topology).image
            images.append(Image.fromarray((image[0].clamp(0, 1) * 255 + 0.5).to(torch.uint8).numpy()))
    buffer = io.BytesIO()
    images[0].save(buffer, format="GIF", save_all=True, append_images=images[1:],
                   duration=max(20, int(1000 * seconds / count)), loop=0, optimize=False)
    atomic_write(path, buffer.getvalue())
    return count


def resample_snapshots(snapshots: Sequence[Any], count: int) -> list[Any]:
    """Exactly `count` items from a list of snapshots, spread evenly (repeats when fewer)."""
    if not snapshots:
        return []
    index = np.round(np.linspace(0, len(snapshots) - 1, count)).astype(int)
    return [snapshots[i] for i in index]


# ------------------------------------------------------------------------------------------ GLB
def seam_split(model: Bundle) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One glTF vertex per distinct (position vertex, uv vertex) pair.

    -> source vertex index [N], uv index [N], triangles [F, 3] into the N new vertices.
    """
    corners = np.stack([model.faces.reshape(-1), model.uv_faces.reshape(-1)], 1).astype(np.int64)
    pairs, inverse = np.unique(corners, axis=0, return_inverse=True)
    return pairs[:, 0], pairs[:, 1], inverse.reshape(-1, 3).astype(np.uint32)


def _vertex_normals(vertices: np.ndarray, triangles: np.ndarray, weld: np.ndarray) -> np.ndarray:
    """Area-weighted normals, welded across seams through the source-vertex index `weld`."""
    v0, v1, v2 = (vertices[triangles[:, k]] for k in range(3))
    face = np.cross(v1 - v0, v2 - v0)
    accumulated = np.zeros((weld.max() + 1, 3))
    for k in range(3):
        np.add.at(accumulated, weld[triangles[:, k]], face)
    normals = accumulated[weld]
    return (normals / np.maximum(np.linalg.norm(normals, axis=1, keepdims=True), 1e-12)).astype(np.float32)


class _GlbBuilder:
    """Accumulates binary buffer views and accessors for one GLB."""

    def __init__(self) -> None:
        self.blob = bytearray()
        self.views: list[dict] = []
        self.accessors: list[dict] = []

    def view(self, data: bytes, target: int | None = None) -> int:
        while len(self.blob) % 4:
            self.blob.append(0)
        view = {"buffer": 0, "byteOffset": len(self.blob), "byteLength": len(data)}
        if target is not None:
            view["target"] = target
        self.blob.extend(data)
        self.views.append(view)
        return len(self.views) - 1

    def accessor(self, array: np.ndarray, kind: str, target: int | None = None, bounds: bool = False) -> int:
        component = _UNSIGNED_INT if array.dtype == np.uint32 else _FLOAT
        array = np.ascontiguousarray(array, dtype=np.uint32 if component == _UNSIGNED_INT else np.float32)
        accessor = {"bufferView": self.view(array.tobytes(), target), "componentType": component,
                    "count": int(array.shape[0]), "type": kind}
        if bounds:  # required for POSITION (and its morph deltas)
            accessor["min"] = array.min(0).astype(float).tolist()
            accessor["max"] = array.max(0).astype(float).tolist()
        self.accessors.append(accessor)
        return len(self.accessors) - 1


def glb_bytes(model: Bundle, weights: np.ndarray, texture: np.ndarray | None = None,
              include_expressions: bool = False, name: str = "SDSHead") -> bytes:
    """The head as a GLB: mean mesh + named morph targets, default weights = `weights`."""
    weights = np.asarray(weights, dtype=np.float32)
    if weights.shape != (model.num_components,):
        raise ValueError(f"weights: expected {model.num_components} values, got shape {weights.shape}")
    source, uv_index, triangles = seam_split(model)
    mean = model.mean[source]
    target_names = list(model.names)
    deltas = [model.basis[k][source] for k in range(model.num_components)]
    default_weights = weights.tolist()
    if include_expressions and model.expr_basis is not None:
        target_names += list(model.expr_names)
        deltas += [model.expr_basis[k][source] for k in range(model.num_expressions)]
        default_weights += [0.0] * model.num_expressions

    glb = _GlbBuilder()
    base_normals = _vertex_normals(mean, triangles, source)
    uv = model.uv[uv_index].copy()
    uv[:, 1] = 1.0 - uv[:, 1]       # glTF's v runs down the image
    attributes = {
        "POSITION": glb.accessor(mean, "VEC3", _ARRAY_BUFFER, bounds=True),
        "NORMAL": glb.accessor(base_normals, "VEC3", _ARRAY_BUFFER),
        "TEXCOORD_0": glb.accessor(uv, "VEC2", _ARRAY_BUFFER),
    }
    targets = []
    for delta in deltas:
        # normal deltas at weight 1, so viewers that blend normals shade morphed heads sensibly
        normal_delta = _vertex_normals(mean + delta, triangles, source) - base_normals
        targets.append({"POSITION": glb.accessor(delta, "VEC3", _ARRAY_BUFFER, bounds=True),
                        "NORMAL": glb.accessor(normal_delta, "VEC3", _ARRAY_BUFFER)})
    indices = glb.accessor(triangles.reshape(-1), "SCALAR", _ELEMENT_ARRAY_BUFFER)

    material: dict[str, Any] = {"name": f"{name}Skin", "doubleSided": False,
                                "pbrMetallicRoughness": {"metallicFactor": 0.0, "roughnessFactor": 0.6}}
    document: dict[str, Any] = {
        "asset": {"version": "2.0", "generator": "SDS Head"},
        "scene": 0, "scenes": [{"nodes": [0]}],
        "nodes": [{"name": name, "mesh": 0}],
        "meshes": [{"name": name, "weights": default_weights, "extras": {"targetNames": target_names},
                    "primitives": [{"attributes": attributes, "indices": indices, "material": 0,
                                    "mode": 4, "targets": targets}]}],
        "materials": [material],
    }
    if texture is not None:
        document["images"] = [{"bufferView": glb.view(png.encode(texture)), "mimeType": "image/png", "name": "texture"}]
        document["samplers"] = [{"magFilter": 9729, "minFilter": 9987, "wrapS": 33071, "wrapT": 33071}]
        document["textures"] = [{"sampler": 0, "source": 0}]
        material["pbrMetallicRoughness"]["baseColorTexture"] = {"index": 0}
    else:
        material["pbrMetallicRoughness"]["baseColorFactor"] = [*SKIN_TONE, 1.0]
    document["accessors"], document["bufferViews"] = glb.accessors, glb.views
    while len(glb.blob) % 4:
        glb.blob.append(0)
    document["buffers"] = [{"byteLength": len(glb.blob)}]
    text = json.dumps(document, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 4)
    total = 12 + 8 + len(text) + 8 + len(glb.blob)
    return (struct.pack("<III", 0x46546C67, 2, total) + struct.pack("<II", len(text), 0x4E4F534A) + text
            + struct.pack("<II", len(glb.blob), 0x004E4942) + bytes(glb.blob))


def write_glb(path: Path, model: Bundle, weights: np.ndarray, texture: np.ndarray | None = None,
              include_expressions: bool = False) -> None:
    atomic_write(path, glb_bytes(model, weights, texture, include_expressions))
