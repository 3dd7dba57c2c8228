"""Blender data services (bpy + numpy, no UI): head mesh <-> bundle, weights, texture, snapshots, export.

A head is a mesh object whose shape keys are the model: the reference key ("Basis") is the mean,
each component is one relative key named as in the bundle. Which keys a fit moves, keeps or
ignores is roles.py's business: a head built from a bundle records its components
(`sdshead_components`), so its expression keys are not fitted; on any other mesh muted, driven and
expression-named keys are left alone.

Everything here runs on the main thread. Functions that take an object name look it up each time,
so a tick never holds a stale reference after undo or a file load.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import bpy

from . import paths, roles
from .errors import UserError

PROP_COMPONENTS = roles.PROP_COMPONENTS  # object custom property: JSON list of component key names
PROP_SNAPSHOT = "sdshead_prefit"         # object custom property: weights + texture backup before the fit
TEXTURE_NODE = "SDSHead Texture"         # the image node whose image is the fitted texture
HEAD_NAME = "SDS Head"
DEFAULT_SLIDER = 5.0                     # +-5 sigma: wider than the fit's default clamp of 3
MAX_SLIDER = 10.0                        # Blender's hard limit for ShapeKey.slider_min/max
SKIN = (0.80, 0.62, 0.52, 1.0)


def _np():
    try:
        import numpy
    except ImportError:  # Debian's Blender uses the system numpy, which may be missing
        raise UserError("numpy is missing from Blender's Python (on Debian/Ubuntu: apt install python3-numpy)") from None
    return numpy


def bundles():
    """The shared bundle module (sds_backend/bundle.py): Bundle, load, save, BundleError."""
    _np()
    return paths.shared("bundle")


def load_bundle(path: str):
    """A bundle file as a Bundle; UserError (naming the file and the field) when it cannot be used."""
    module = bundles()
    try:
        return module.load(path)
    except module.BundleError as exc:
        raise UserError(str(exc)) from None


# glTF (x right, y up, z forward) -> Blender (x right, y back-to-front is -z_gltf, z up)
def to_blender(points):
    """float [..., 3] in glTF axes -> Blender axes: (x, y, z) -> (x, -z, y)."""
    out = _np().empty_like(points)
    out[..., 0] = points[..., 0]
    out[..., 1] = -points[..., 2]
    out[..., 2] = points[..., 1]
    return out


def from_blender(points):
    """float [..., 3] in Blender axes -> glTF axes: (x, y, z) -> (x, z, -y)."""
    out = _np().empty_like(points)
    out[..., 0] = points[..., 0]
    out[..., 1] = points[..., 2]
    out[..., 2] = -points[..., 1]
    return out


# ---------------------------------------------------------------------------- build from a bundle
def _polygons_and_loop_uvs(bundle):
    """Polygons for Blender and, per loop, the index into bundle.uv.

    Quads come from `polygons` when every corner's UV can be found on one of the triangles that
    split it; otherwise the triangles themselves are used.
    """
    np = _np()
    faces = bundle.faces.tolist()
    uv_faces = bundle.uv_faces.tolist()
    if bundle.polygons is not None:
        by_corners = {frozenset(tri): row for row, tri in enumerate(faces)}
        polygons, loop_uv = [], []
        for poly in bundle.polygons.tolist():
            verts = [v for v in poly if v >= 0]
            if len(verts) == 3:
                candidates = [verts]
            else:
                a, b, c, d = verts
                candidates = [(a, b, c), (a, c, d), (a, b, d), (b, c, d)]
            corner_uv: dict[int, int] = {}
            for tri in candidates:
                row = by_corners.get(frozenset(tri))
                if row is not None:
                    for vertex, uv_index in zip(faces[row], uv_faces[row]):
                        corner_uv.setdefault(vertex, uv_index)
            if any(v not in corner_uv for v in verts):
                break
            polygons.append(verts)
            loop_uv.extend(corner_uv[v] for v in verts)
        else:
            return polygons, np.asarray(loop_uv, dtype=np.int64)
    return faces, np.asarray(uv_faces, dtype=np.int64).reshape(-1)


def _check_key_name(name: str) -> None:
    if len(name.encode("utf-8")) > 63:
        raise UserError(f"shape-key name {name!r} is longer than Blender's 63-byte limit")


def build_head(bundle, *, name: str = HEAD_NAME, collection=None,
               texture_size: int = 1024, slider: float = DEFAULT_SLIDER):
    """A new mesh object: basis + one key per component (+ expressions), UVs, material with an image."""
    np = _np()
    for key_name in list(bundle.names) + list(bundle.expr_names):
        _check_key_name(key_name)
    mean = to_blender(bundle.mean)
    polygons, loop_uv = _polygons_and_loop_uvs(bundle)

    mesh = bpy.data.meshes.new(name)
    mesh.from_pydata(mean.tolist(), [], polygons)
    uv_layer = mesh.uv_layers.new(name="UVMap")
    uv_layer.data.foreach_set("uv", np.ascontiguousarray(bundle.uv[loop_uv], dtype=np.float32).ravel())
    mesh.polygons.foreach_set("use_smooth", np.ones(len(mesh.polygons), dtype=bool))
    mesh.update()

    obj = bpy.data.objects.new(name, mesh)
    (collection or bpy.context.scene.collection).objects.link(obj)
    obj.shape_key_add(name="Basis", from_mix=False)
    for k, key_name in enumerate(bundle.names):
        kb = obj.shape_key_add(name=key_name, from_mix=False)
        kb.data.foreach_set("co", to_blender(bundle.mean + bundle.basis[k]).ravel())
        kb.slider_min, kb.slider_max = -slider, slider
        kb.value = 0.0
    if bundle.expr_basis is not None:
        for e, key_name in enumerate(bundle.expr_names):
            kb = obj.shape_key_add(name=key_name, from_mix=False)
            kb.data.foreach_set("co", to_blender(bundle.mean + bundle.expr_basis[e]).ravel())
            kb.value = 0.0
    obj[PROP_COMPONENTS] = json.dumps(list(bundle.names))

    image = bpy.data.images.new(f"{name} Texture", texture_size, texture_size, alpha=False)
    image.generated_color = SKIN
    material = bpy.data.materials.new(name)
    _connect_texture(material, image)
    mesh.materials.append(material)
    return obj


def _node_tree(material, create: bool = False):
    """The material's node tree (Blender 5 always has one; 3.x only after use_nodes = True)."""
    if material is None:
        return None
    tree = material.node_tree
    if tree is None and create:
        material.use_nodes = True
        tree = material.node_tree
    return tree


def _connect_texture(material, image) -> bool:
    """Add the texture node to `material`; link it to Base Color when that input is free."""
    tree = _node_tree(material, create=True)
    bsdf = next((n for n in tree.nodes if n.type == "BSDF_PRINCIPLED"), None)
    if bsdf is None:
        bsdf = tree.nodes.new("ShaderNodeBsdfPrincipled")
        output = next((n for n in tree.nodes if n.type == "OUTPUT_MATERIAL"), None) or \
            tree.nodes.new("ShaderNodeOutputMaterial")
        tree.links.new(bsdf.outputs[0], output.inputs["Surface"])
    node = tree.nodes.new("ShaderNodeTexImage")
    node.name = node.label = TEXTURE_NODE
    node.image = image
    node.location = (bsdf.location.x - 320, bsdf.location.y)
    base_color = bsdf.inputs["Base Color"]
    if base_color.is_linked:
        return False
    tree.links.new(node.outputs["Color"], base_color)
    return True


# ---------------------------------------------------------------------------- heads in the scene
def check_head(obj) -> None:
    """Raise UserError unless `obj` is a mesh with shape keys beyond the basis."""
    if obj is None:
        raise UserError("No active object: select a head mesh with shape keys, or use Create Default Head")
    if obj.type != "MESH":
        raise UserError(f"Active object '{obj.name}' is a {obj.type.lower()}, not a mesh: select a head mesh "
                        "with shape keys, or use Create Default Head")
    keys = obj.data.shape_keys
    if keys is None or len(keys.key_blocks) == 0:
        raise UserError(f"Active mesh '{obj.name}' has no shape keys: use Create Default Head, or give it a "
                        "Basis key plus one key per shape component")
    if len(keys.key_blocks) < 2:
        raise UserError(f"Active mesh '{obj.name}' has only the '{keys.key_blocks[0].name}' key: add at least one "
                        "shape key to fit")
    if not keys.use_relative:
        raise UserError(f"Active mesh '{obj.name}' uses absolute shape keys: switch them to relative")
    if len(obj.data.vertices) < 3 or len(obj.data.polygons) == 0:
        raise UserError(f"Active mesh '{obj.name}' has no faces")


def component_names(obj) -> list[str]:
    """Names of the keys a fit moves (their role is fit), in the keys' order."""
    return [name for name, role in roles.roles(obj).items() if role == "fit"]


def all_key_names(obj) -> list[str]:
    """Every shape key but the reference key, in order."""
    keys = obj.data.shape_keys
    return [kb.name for kb in keys.key_blocks if kb.name != keys.reference_key.name]


def key_indices(obj, names: list[str]) -> list[int]:
    blocks = obj.data.shape_keys.key_blocks
    index = {kb.name: i for i, kb in enumerate(blocks)}
    missing = [n for n in names if n not in index]
    if missing:
        raise UserError(f"'{obj.name}' lost shape key(s) {', '.join(missing[:5])} during the fit")
    return [index[n] for n in names]


def read_weights(obj, names: list[str]) -> list[float]:
    blocks = obj.data.shape_keys.key_blocks
    return [blocks[i].value for i in key_indices(obj, names)]


def _key_cos(kb, count: int):
    np = _np()
    co = np.empty(count * 3, dtype=np.float32)
    kb.data.foreach_get("co", co)
    return co.reshape(count, 3)


def bundle_from_object(obj, names: list[str]):
    """The object's shape keys `names` as a bundle: mean = the reference key, one basis row per key
    (each the key's offset from its relative key). Other keys are not part of it: the fit ignores
    them (roles.py).

    The fit sees the head as it stands in the scene: the object's rotation and scale are applied
    (an FBX imported from a Y-up tool is often upright only through its object rotation), its
    location is not (the fit centres the head). Weights are unchanged by this linear map, so they
    apply to the keys as they are."""
    np = _np()
    mesh = obj.data
    count = len(mesh.vertices)
    blocks = mesh.shape_keys.key_blocks
    reference = mesh.shape_keys.reference_key
    cache: dict[str, object] = {}

    def cos(kb):
        if kb.name not in cache:
            cache[kb.name] = _key_cos(kb, count)
        return cache[kb.name]

    def delta(kb):
        d = cos(kb) - cos(kb.relative_key)
        if kb.vertex_group:
            group = obj.vertex_groups.get(kb.vertex_group)
            if group is not None:
                weights = np.zeros(count, dtype=np.float32)
                for v in mesh.vertices:
                    for g in v.groups:
                        if g.group == group.index:
                            weights[v.index] = g.weight
                d = d * weights[:, None]
        return d

    mean = cos(reference).copy()
    basis = np.stack([delta(blocks[n]) for n in names]).astype(np.float32)

    mesh.calc_loop_triangles()
    tri_count = len(mesh.loop_triangles)
    faces = np.empty(tri_count * 3, dtype=np.int32)
    mesh.loop_triangles.foreach_get("vertices", faces)
    faces = faces.reshape(-1, 3)
    uv_layer = mesh.uv_layers.active
    if uv_layer is None:
        uv = np.zeros((1, 2), dtype=np.float32)
        uv_faces = np.zeros_like(faces)
    else:
        loops = np.empty(tri_count * 3, dtype=np.int32)
        mesh.loop_triangles.foreach_get("loops", loops)
        loop_uv = np.empty(len(mesh.loops) * 2, dtype=np.float32)
        uv_layer.data.foreach_get("uv", loop_uv)
        loop_uv = loop_uv.reshape(-1, 2)
        outside = (loop_uv < 0.0) | (loop_uv > 1.0)
        loop_uv = np.where(outside, loop_uv - np.floor(loop_uv), loop_uv)   # tiles wrap into [0, 1)
        uv, inverse = np.unique(loop_uv, axis=0, return_inverse=True)
        uv_faces = inverse.reshape(-1)[loops].reshape(-1, 3).astype(np.int32)
    linear = np.array(obj.matrix_world.to_3x3(), dtype=np.float64)
    determinant = np.linalg.det(linear)
    if not abs(determinant) > 1e-12:
        raise UserError(f"'{obj.name}' is scaled to zero along some axis: give it a non-zero scale")
    mean, basis = (mean @ linear.T).astype(np.float32), (basis @ linear.T).astype(np.float32)
    if determinant < 0:                 # a mirroring transform turns the winding, and with it the facing
        faces = faces[:, [0, 2, 1]]
        uv_faces = uv_faces[:, [0, 2, 1]]
    module = bundles()
    try:
        return module.Bundle.from_arrays(
            mean=from_blender(mean), basis=from_blender(basis), names=np.array(names, dtype=np.str_),
            faces=faces, uv=uv.astype(np.float32), uv_faces=uv_faces,
            meta={"source": "blender", "object": obj.name, "has_uv": uv_layer is not None})
    except module.BundleError as exc:
        raise UserError(f"shape keys of '{obj.name}': {exc}") from None


# ---------------------------------------------------------------------------- weights
def apply_weights(obj, indices: list[int], weights, widen: bool = True) -> None:
    """Set the keys' values. widen: a head built from a bundle (our sliders) widens a slider that a
    value falls outside; on a user's rig (widen=False) the fit keeps within the sliders itself."""
    blocks = obj.data.shape_keys.key_blocks
    for i, w in zip(indices, weights):
        kb = blocks[i]
        if widen and w > kb.slider_max:
            kb.slider_max = min(MAX_SLIDER, float(math.ceil(w)))
        elif widen and w < kb.slider_min:
            kb.slider_min = max(-MAX_SLIDER, float(math.floor(w)))
        kb.value = w


# ---------------------------------------------------------------------------- texture
def texture_image(obj):
    """The image of the SDS texture node in the object's materials, or None."""
    for slot in obj.material_slots:
        material = slot.material
        tree = _node_tree(material)
        if tree is None:
            continue
        node = tree.nodes.get(TEXTURE_NODE)
        if node is not None and getattr(node, "image", None) is not None:
            return node.image
    return None


def ensure_texture_image(obj, size: int):
    """The fitted texture's image; adds a material/texture node when the object has none.

    Raises UserError, before changing anything, when the active material's Base Color already
    comes from another node: the fitted texture would neither show nor export."""
    image = texture_image(obj)
    if image is not None:
        return image
    material = obj.active_material
    tree = _node_tree(material)
    bsdf = next((n for n in tree.nodes if n.type == "BSDF_PRINCIPLED"), None) if tree is not None else None
    if bsdf is not None and bsdf.inputs["Base Color"].is_linked:
        source = bsdf.inputs["Base Color"].links[0].from_node.name
        raise UserError(f"Material '{material.name}' takes its Base Color from node '{source}': the fitted texture "
                        "would not show. Disconnect it, or fit the shape only")
    image = bpy.data.images.new(f"{obj.name} Texture", size, size, alpha=False)
    image.generated_color = SKIN
    if material is None:
        material = bpy.data.materials.new(obj.name)
        obj.data.materials.append(material)
    _connect_texture(material, image)
    return image


def has_pixels(image) -> bool:
    """True when the image holds pixels. After a file is opened Blender loads packed and file
    images on first use, and `has_data` stays False until then: reading the size loads them."""
    if image is None:
        return False
    if not image.has_data:
        image.size[0]
    return bool(image.has_data)


def read_pixels(image):
    np = _np()
    width, height = image.size
    pixels = np.empty(width * height * image.channels, dtype=np.float32)
    image.pixels.foreach_get(pixels)
    return pixels


def apply_texture_file(image, path: str) -> None:
    """Copy a PNG's pixels into `image` (resized to match). The PNG's row 0 is the top (v = 1)."""
    np = _np()
    if not os.path.isfile(path):
        raise UserError(f"texture file from the backend is missing: {path}")
    loaded = bpy.data.images.load(path, check_existing=False)
    try:
        width, height = loaded.size
        channels = loaded.channels
        if width == 0 or height == 0 or channels not in (3, 4):
            raise UserError(f"texture file from the backend cannot be read: {path}")
        pixels = np.empty(width * height * channels, dtype=np.float32)
        loaded.pixels.foreach_get(pixels)
    finally:
        bpy.data.images.remove(loaded)
    set_pixels(image, pixels, (width, height))


def set_pixels(image, pixels, size: tuple[int, int]) -> None:
    """pixels: float32 [w * h * channels] (RGBA or RGB), Blender row order; resizes the image to `size`."""
    np = _np()
    width, height = size
    channels = pixels.size // (width * height)
    if channels != image.channels:
        converted = np.ones((width * height, image.channels), dtype=np.float32)
        shared = min(channels, image.channels)
        converted[:, :shared] = pixels.reshape(width * height, channels)[:, :shared]
        pixels = converted.ravel()
    if tuple(image.size) != (width, height):
        image.scale(width, height)
    image.pixels.foreach_set(pixels)
    image.update()


# ---------------------------------------------------------------------------- snapshot for Reset
@dataclass
class Snapshot:
    weights: dict[str, float]
    image: str          # name of the backup image ('' when the head had no texture)


def take_snapshot(obj, names: list[str]) -> Snapshot:
    """Store the component weights and a packed copy of the texture on the object (replaces older ones)."""
    old = obj.get(PROP_SNAPSHOT)
    if old is not None:
        old_image = bpy.data.images.get(str(old.get("image", "")))
        if old_image is not None:
            bpy.data.images.remove(old_image)
    weights = dict(zip(names, read_weights(obj, names)))
    backup_name = ""
    image = texture_image(obj)
    if has_pixels(image):
        width, height = image.size
        backup = bpy.data.images.new(f"{image.name} (before fit)", width, height,
                                     alpha=image.channels == 4, float_buffer=image.is_float)
        backup.colorspace_settings.name = image.colorspace_settings.name
        backup.pixels.foreach_set(read_pixels(image))
        backup.use_fake_user = True
        pack_texture(backup)
        backup_name = backup.name
    obj[PROP_SNAPSHOT] = {"weights": weights, "image": backup_name}
    return Snapshot(weights, backup_name)


def has_snapshot(obj) -> bool:
    return obj is not None and obj.get(PROP_SNAPSHOT) is not None


def restore_snapshot(obj) -> Snapshot:
    """Put back the weights and texture from before the last fit (exact values)."""
    stored = obj.get(PROP_SNAPSHOT)
    if stored is None:
        raise UserError(f"'{obj.name}' has nothing to reset: it was not fitted in this file")
    weights = {str(k): float(v) for k, v in stored["weights"].items()}
    blocks = obj.data.shape_keys.key_blocks if obj.data.shape_keys else {}
    missing = [n for n in weights if n not in blocks]
    if missing:
        raise UserError(f"cannot reset '{obj.name}': shape key(s) {', '.join(missing[:5])} no longer exist")
    for name, value in weights.items():
        kb = blocks[name]
        kb.slider_min = min(kb.slider_min, math.floor(value))
        kb.slider_max = max(kb.slider_max, math.ceil(value))
        kb.value = value
    backup_name = str(stored.get("image", ""))
    if backup_name:
        backup = bpy.data.images.get(backup_name)
        image = texture_image(obj)
        if image is None or not has_pixels(backup):
            missing = "its texture node was removed" if image is None else f"its backup image '{backup_name}' is gone"
            raise UserError(f"cannot reset the texture of '{obj.name}': {missing} (the weights were reset)")
        set_pixels(image, read_pixels(backup), tuple(backup.size))
        pack_texture(image)
    return Snapshot(weights, backup_name)


# ---------------------------------------------------------------------------- export
def pack_texture(image) -> None:
    """Pack the image's current pixels as PNG into the .blend: saving the file keeps a fitted or reset
    texture (a generated image's pixels are otherwise regenerated on load), and exporters embed
    packed data (they skip unsaved pixels).

    Blender packs the pixels in memory only when they changed since loading; otherwise it packs
    the file at the image's path, which for a generated image (a head whose texture was never
    fitted) does not exist. Writing the pixels back marks them changed, so both cases pack pixels."""
    if not image.filepath_raw:
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in image.name)
        image.filepath_raw = f"//{safe}.png"
    image.file_format = "PNG"
    if not image.is_dirty and has_pixels(image):
        image.pixels.foreach_set(read_pixels(image))
    image.pack()


def pack_textures(obj) -> list[str]:
    """Pack every image used by the object's materials that holds unsaved pixels; returns their names."""
    packed = []
    for slot in obj.material_slots:
        material = slot.material
        tree = _node_tree(material)
        if tree is None:
            continue
        for node in tree.nodes:
            image = getattr(node, "image", None)
            if image is None or image.source not in ("GENERATED", "FILE"):
                continue
            if image.packed_file is None or image.is_dirty or image.source == "GENERATED":
                pack_texture(image)
                packed.append(image.name)
    return packed


def _operator_kwargs(operator, wanted: dict) -> dict:
    """Only the options this Blender's exporter knows (names changed between 3.4 and 5.x)."""
    known = {p.identifier for p in operator.get_rna_type().properties}
    return {k: v for k, v in wanted.items() if k in known}


class _OnlySelected:
    """Select just `obj` (and make it active) for an exporter, then restore the selection."""

    def __init__(self, obj):
        self.obj = obj

    def __enter__(self):
        view_layer = bpy.context.view_layer
        self.active = view_layer.objects.active
        self.selected = [o for o in view_layer.objects if o.select_get()]
        for o in self.selected:
            o.select_set(False)
        self.obj.select_set(True)
        view_layer.objects.active = self.obj
        return self

    def __exit__(self, *exc):
        view_layer = bpy.context.view_layer
        self.obj.select_set(False)
        for o in self.selected:
            if o.name in view_layer.objects:
                o.select_set(True)
        view_layer.objects.active = self.active
        return False


def _write(path: Path, write) -> Path:
    """write(tmp) writes the file at a temporary path beside `path`, which then replaces `path`:
    a failed or interrupted export never leaves half a file, nor changes an existing one."""
    files = paths.shared("files")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return files.write_through_temporary(path, write)
    except OSError as exc:
        raise UserError(f"cannot write {path}: {exc.strerror or exc}") from None
    except files.OutputError as exc:
        raise UserError(str(exc)) from None


class _MutedKeysAsZero:
    """While exporting glTF: muted keys unmuted at value 0, then put back exactly as they were.

    Blender's glTF exporter leaves muted keys out; a morph target at weight 0 keeps the key (a rig's
    corrective or expression) in the file and looks the same, as a muted key deforms nothing. glTF
    has no 'muted', so the key's own value does not travel (FBX keeps both)."""

    def __init__(self, obj):
        keys = obj.data.shape_keys
        self.muted = [kb for kb in keys.key_blocks if kb.mute] if keys is not None else []
        self.values = [kb.value for kb in self.muted]

    def __enter__(self):
        for kb in self.muted:
            kb.mute, kb.value = False, 0.0
        return self

    def __exit__(self, *exc):
        for kb, value in zip(self.muted, self.values):
            kb.mute, kb.value = True, value
        return False


def export_gltf(obj, filepath: str) -> Path:
    """Binary glTF with every shape key (names + current values as mesh weights; muted keys at 0, see
    _MutedKeysAsZero) and the texture embedded. Modifiers are not applied: applying them would drop
    the shape keys."""
    path = Path(filepath)
    if path.suffix.lower() not in (".glb", ".gltf"):
        path = path.with_suffix(".glb")
    pack_textures(obj)
    operator = bpy.ops.export_scene.gltf

    def write(tmp: Path) -> None:
        kwargs = _operator_kwargs(operator, dict(
            filepath=str(tmp), export_format="GLB" if path.suffix.lower() == ".glb" else "GLTF_EMBEDDED",
            use_selection=True, export_apply=False, export_morph=True, export_morph_normal=False,
            export_materials="EXPORT", export_image_format="AUTO", export_texcoords=True, export_normals=True,
            export_yup=True, export_animations=False, export_extras=False,
        ))
        with _OnlySelected(obj), _MutedKeysAsZero(obj):
            result = operator(**kwargs)
        if "FINISHED" not in result:
            raise UserError(f"glTF export to {path} failed (see the system console)")

    return _write(path, write)


def export_fbx(obj, filepath: str) -> Path:
    """FBX with every shape key (values as DeformPercent) and the texture embedded; modifiers not
    applied, since applying them would drop the shape keys."""
    path = Path(filepath)
    if path.suffix.lower() != ".fbx":
        path = path.with_suffix(".fbx")
    pack_textures(obj)
    operator = bpy.ops.export_scene.fbx

    def write(tmp: Path) -> None:
        kwargs = _operator_kwargs(operator, dict(
            filepath=str(tmp), use_selection=True, object_types={"MESH"}, use_mesh_modifiers=False,
            mesh_smooth_type="FACE", add_leaf_bones=False, bake_anim=False, path_mode="COPY", embed_textures=True,
            use_custom_props=False,
        ))
        with _OnlySelected(obj):
            result = operator(**kwargs)
        if "FINISHED" not in result:
            raise UserError(f"FBX export to {path} failed (see the system console)")

    return _write(path, write)


def save_blend_copy(obj, filepath: str | Path) -> Path:
    """Save the open file as a copy at `filepath` with the head's textures packed; the file Blender
    has open (and its path) stays as it is."""
    path = Path(filepath)
    pack_textures(obj)

    def write(tmp: Path) -> None:
        result = bpy.ops.wm.save_as_mainfile(filepath=str(tmp), copy=True, check_existing=False)
        if "FINISHED" not in result:
            raise UserError(f"saving {path} failed (see the system console)")

    return _write(path, write)
