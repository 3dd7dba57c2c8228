"""Layer 1: bundle <-> Blender data (scene.py): build, weights, texture, snapshots, export."""
from __future__ import annotations

import json
import subprocess

import bpy
import numpy as np
import pytest

from conftest import BACKEND_PYTHON, ROOT, write_png


def _create(head_bundle):
    assert bpy.ops.sdshead.create_head(bundle_path=str(head_bundle)) == {"FINISHED"}
    return bpy.context.active_object


def _cos(obj, kb=None):
    kb = kb or obj.data.shape_keys.reference_key
    co = np.empty(len(obj.data.vertices) * 3, dtype=np.float32)
    kb.data.foreach_get("co", co)
    return co.reshape(-1, 3)


def test_create_head_has_one_key_per_component_named_as_in_bundle(addon, head_bundle):
    from blender_addon import scene

    bundle = scene.load_bundle(str(head_bundle))
    obj = _create(head_bundle)
    blocks = obj.data.shape_keys.key_blocks
    assert bundle.num_components == 50
    assert [kb.name for kb in blocks][1:51] == list(bundle.names)
    assert [kb.name for kb in blocks][51:] == list(bundle.expr_names)
    assert scene.component_names(obj) == list(bundle.names)          # expressions are not fitted
    for kb in list(blocks)[1:51]:
        assert (kb.slider_min, kb.slider_max) == (-5.0, 5.0)
        assert kb.relative_key == blocks[0] and kb.value == 0.0
    assert len(obj.data.vertices) == bundle.num_vertices
    image = scene.texture_image(obj)
    assert image is not None and image.size[0] == 1024
    node = obj.active_material.node_tree.nodes[scene.TEXTURE_NODE]
    assert node.outputs["Color"].links[0].to_socket.name == "Base Color"


def test_bundle_axes_become_blender_z_up(addon, head_bundle):
    """glTF +Y up -> Blender +Z up; glTF +Z forward (the face) -> Blender -Y (front view looks along +Y)."""
    from blender_addon import scene

    bundle = scene.load_bundle(str(head_bundle))
    obj = _create(head_bundle)
    co = _cos(obj)
    assert int(np.argmax(co[:, 2])) == int(np.argmax(bundle.mean[:, 1]))
    assert int(np.argmin(co[:, 1])) == int(np.argmax(bundle.mean[:, 2]))
    np.testing.assert_array_equal(co[:, 0], bundle.mean[:, 0])
    k = 7
    delta = _cos(obj, obj.data.shape_keys.key_blocks[bundle.names[k]]) - co
    np.testing.assert_allclose(delta, scene.to_blender(bundle.basis[k]), atol=1e-7)


def test_uvs_match_the_bundle_corner_for_corner(addon, head_bundle):
    from blender_addon import scene

    bundle = scene.load_bundle(str(head_bundle))
    obj = _create(head_bundle)
    back = scene.bundle_from_object(obj, scene.component_names(obj))
    pairs = lambda b: {(int(v), tuple(np.round(b.uv[u], 6))) for f, uf in zip(b.faces, b.uv_faces) for v, u in zip(f, uf)}
    assert pairs(back) == pairs(bundle)
    np.testing.assert_array_equal(back.mean, bundle.mean)
    np.testing.assert_allclose(back.basis, bundle.basis, atol=1e-6)


def test_weights_drive_the_evaluated_mesh_linearly(addon, head_bundle):
    """mean + w . basis, evaluated by Blender, equals the bundle's model; values beyond the slider widen it."""
    from blender_addon import scene

    bundle = scene.load_bundle(str(head_bundle))
    obj = _create(head_bundle)
    names = scene.component_names(obj)
    weights = np.linspace(-2.5, 2.5, len(names)).astype(np.float32)
    weights[3] = 7.25
    scene.apply_weights(obj, scene.key_indices(obj, names), weights.tolist())
    blocks = obj.data.shape_keys.key_blocks
    assert blocks[names[3]].value == pytest.approx(7.25) and blocks[names[3]].slider_max == 8.0
    assert scene.read_weights(obj, names) == [float(w) for w in weights]
    depsgraph = bpy.context.evaluated_depsgraph_get()
    evaluated = obj.evaluated_get(depsgraph).to_mesh()
    co = np.empty(len(evaluated.vertices) * 3, dtype=np.float32)
    evaluated.vertices.foreach_get("co", co)
    expected = scene.to_blender(bundle.mean + np.einsum("k,kvc->vc", weights, bundle.basis))
    np.testing.assert_allclose(co.reshape(-1, 3), expected, atol=1e-5)


def test_texture_png_row_zero_lands_at_the_top_of_uv_space(addon, head_bundle, tmp_path):
    from blender_addon import scene

    obj = _create(head_bundle)
    image = scene.texture_image(obj)
    red, blue = (255, 0, 0), (0, 0, 255)
    rows = [[red] * 8] + [[(128, 128, 128)] * 8] * 6 + [[blue] * 8]
    scene.apply_texture_file(image, str(write_png(tmp_path / "t.png", rows)))
    assert tuple(image.size) == (8, 8)
    pixels = scene.read_pixels(image).reshape(8, 8, 4)   # Blender: row 0 = bottom (v = 0)
    np.testing.assert_allclose(pixels[-1, 0, :3], [1, 0, 0], atol=1e-6)
    np.testing.assert_allclose(pixels[0, 0, :3], [0, 0, 1], atol=1e-6)
    with pytest.raises(Exception, match="missing"):
        scene.apply_texture_file(image, str(tmp_path / "absent.png"))


def test_snapshot_restores_exact_weights_and_pixels(addon, head_bundle, tmp_path):
    from blender_addon import scene

    obj = _create(head_bundle)
    names = scene.component_names(obj)
    indices = scene.key_indices(obj, names)
    rng = np.random.default_rng(1)
    before = rng.normal(size=len(names)).astype(np.float32).tolist()
    scene.apply_weights(obj, indices, before)
    image = scene.texture_image(obj)
    rows = [[tuple(int(v) for v in rng.integers(0, 256, 3)) for _ in range(16)] for _ in range(16)]
    scene.apply_texture_file(image, str(write_png(tmp_path / "a.png", rows)))
    pixels_before = scene.read_pixels(image)
    scene.take_snapshot(obj, names)

    scene.apply_weights(obj, indices, (rng.normal(size=len(names)) * 2).tolist())
    scene.apply_texture_file(image, str(write_png(tmp_path / "b.png", [[(9, 9, 9)] * 32] * 32)))
    assert tuple(image.size) == (32, 32)
    assert bpy.ops.sdshead.reset() == {"FINISHED"}
    assert scene.read_weights(obj, names) == before
    assert tuple(image.size) == (16, 16)
    np.testing.assert_array_equal(scene.read_pixels(image), pixels_before)


def test_user_mesh_becomes_a_bundle_the_backend_loads(addon, tmp_path):
    """Any mesh with shape keys is a model: non-component keys (here 'smile' at 0.5) are baked into the mean."""
    from blender_addon import scene

    bpy.ops.mesh.primitive_monkey_add()
    obj = bpy.context.active_object
    bpy.ops.mesh.uv_texture_add()
    obj.shape_key_add(name="Basis")
    for name, offset in (("wide", (0.2, 0, 0)), ("tall", (0, 0, 0.3)), ("smile", (0, 0.1, 0))):
        kb = obj.shape_key_add(name=name, from_mix=False)
        for point in kb.data:
            point.co = point.co + __import__("mathutils").Vector(offset)
    obj.data.shape_keys.key_blocks["smile"].value = 0.5
    names = scene.component_names(obj)
    assert names == ["wide", "tall"]                  # 'smile' names an expression: off by default
    bundle = scene.bundle_from_object(obj, names)
    assert bundle.names == ("wide", "tall")
    ref = _cos(obj)
    np.testing.assert_allclose(bundle.mean, scene.from_blender(ref), atol=1e-6)   # an off key is not part of it
    np.testing.assert_allclose(bundle.basis[1], np.tile([0, 0.3, 0], (len(ref), 1)), atol=1e-6)  # Blender +Z = glTF +Y
    path = scene.bundles().save(bundle, tmp_path / "monkey.npz")
    if not BACKEND_PYTHON.is_file():
        pytest.skip("backend environment missing: cannot cross-check with the backend's numpy")
    code = ("import sys; from sds_backend import bundle; m = bundle.load(sys.argv[1]); "
            "print(m.num_vertices, m.num_components, ','.join(m.names), m.faces.shape[0])")
    out = subprocess.run([str(BACKEND_PYTHON), "-c", code, str(path)], capture_output=True, text=True, cwd=ROOT,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [str(len(ref)), "2", "wide,tall", str(len(bundle.faces))]


def test_user_mesh_is_fitted_as_it_stands_in_the_scene(addon):
    """An object upright only through its rotation (a Y-up FBX import) and scale gives the bundle its
    data would give with that transform applied; a mirroring scale also turns the winding."""
    from mathutils import Matrix

    from blender_addon import scene

    def monkey(matrix, bake: bool):
        bpy.ops.mesh.primitive_monkey_add()
        obj = bpy.context.active_object
        if bake:
            obj.data.transform(matrix)
        else:
            obj.matrix_world = matrix
        obj.shape_key_add(name="Basis")
        kb = obj.shape_key_add(name="wide", from_mix=False)
        for point in kb.data:
            point.co.x *= 1.3
        obj["sdshead_components"] = json.dumps(["wide"])
        return scene.bundle_from_object(obj, ["wide"])

    upright = Matrix.Rotation(np.pi / 2, 4, "X") @ Matrix.Diagonal((0.01, 0.01, 0.01, 1.0))
    for matrix in (upright, Matrix.Diagonal((-1.0, 1.0, 1.0, 1.0))):
        # keys made after the transform in both cases: the baked one widens along world x,
        # the transformed one along local x, which this rotation and mirror keep as world x
        by_transform, baked = monkey(matrix, bake=False), monkey(matrix, bake=True)
        np.testing.assert_allclose(by_transform.mean, baked.mean, atol=1e-6)
        np.testing.assert_allclose(by_transform.basis, baked.basis, atol=1e-6)
        mirrored = matrix.determinant() < 0
        expected_faces = baked.faces[:, [0, 2, 1]] if mirrored else baked.faces
        np.testing.assert_array_equal(by_transform.faces, expected_faces)
    bpy.ops.mesh.primitive_monkey_add()
    flat = bpy.context.active_object
    flat.shape_key_add(name="Basis")
    flat.shape_key_add(name="wide", from_mix=False)
    flat.scale = (1.0, 0.0, 1.0)
    bpy.context.view_layer.update()
    with pytest.raises(Exception, match="scaled to zero"):
        scene.bundle_from_object(flat, ["wide"])


@pytest.mark.parametrize("setup, message", [
    ("none", "No active object"),
    ("camera", "is a camera, not a mesh"),
    ("cube", "has no shape keys"),
    ("basis_only", "has only the 'Basis' key"),
])
def test_check_head_names_the_problem(addon, setup, message):
    from blender_addon import scene
    from blender_addon.errors import UserError

    obj = None
    if setup == "camera":
        bpy.ops.object.camera_add()
        obj = bpy.context.active_object
    elif setup in ("cube", "basis_only"):
        bpy.ops.mesh.primitive_cube_add()
        obj = bpy.context.active_object
        if setup == "basis_only":
            obj.shape_key_add(name="Basis")
    with pytest.raises(UserError, match=message):
        scene.check_head(obj)


@pytest.mark.parametrize("fmt", ["glb", "fbx"])
def test_export_keeps_shape_keys_values_and_texture_with_modifiers(addon, head_bundle, tmp_path, fmt):
    from blender_addon import scene

    obj = _create(head_bundle)
    obj.modifiers.new("Subdivision", "SUBSURF")
    names = scene.component_names(obj)
    weights = np.linspace(-3, 3, len(names)).astype(np.float32).tolist()
    scene.apply_weights(obj, scene.key_indices(obj, names), weights)
    rows = [[(200, 40, 10)] * 4] * 4
    scene.apply_texture_file(scene.texture_image(obj), str(write_png(tmp_path / "skin.png", rows)))
    all_keys = {kb.name: kb.value for kb in obj.data.shape_keys.key_blocks[1:]}
    path = (scene.export_gltf if fmt == "glb" else scene.export_fbx)(obj, str(tmp_path / f"head.{fmt}"))
    assert len(obj.modifiers) == 1   # the user's modifier stays

    for collection in (bpy.data.objects, bpy.data.meshes, bpy.data.materials, bpy.data.images):
        for item in list(collection):
            collection.remove(item)
    if fmt == "glb":
        bpy.ops.import_scene.gltf(filepath=str(path))
    else:
        bpy.ops.import_scene.fbx(filepath=str(path))
    meshes = [o for o in bpy.data.objects if o.type == "MESH"]
    assert len(meshes) == 1
    imported = meshes[0]
    got = {kb.name: kb.value for kb in imported.data.shape_keys.key_blocks[1:]}
    assert list(got) == list(all_keys)
    for name, value in all_keys.items():
        assert got[name] == pytest.approx(value, abs=1e-4), name
    images = [i for i in bpy.data.images if i.size[0] > 0]
    assert images, "no texture came back"
    px = np.empty(images[0].size[0] * images[0].size[1] * images[0].channels, np.float32)
    images[0].pixels.foreach_get(px)
    np.testing.assert_allclose(px[:3], [200 / 255, 40 / 255, 10 / 255], atol=1 / 255)


def _png_with_row_filters(path, rows_uint8, filters):
    """Encode uint8 [H, W, C] (row 0 = top) with the given PNG filter type per row (0..4)."""
    import struct
    import zlib

    height, width, channels = rows_uint8.shape
    data = rows_uint8.reshape(height, width * channels).astype(np.int16)
    out = []
    for r in range(height):
        row = data[r]
        up = data[r - 1] if r else np.zeros_like(row)
        left = np.concatenate([np.zeros(channels, np.int16), row[:-channels]])
        up_left = np.concatenate([np.zeros(channels, np.int16), up[:-channels]])
        p = left + up - up_left
        pa, pb, pc = np.abs(p - left), np.abs(p - up), np.abs(p - up_left)
        paeth = np.where((pa <= pb) & (pa <= pc), left, np.where(pb <= pc, up, up_left))
        predictor = [np.zeros_like(row), left, up, (left + up) >> 1, paeth][filters[r]]
        out.append(bytes([filters[r]]) + ((row - predictor) % 256).astype(np.uint8).tobytes())

    def chunk(tag, body):
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 6 if channels == 4 else 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"".join(out)))
                     + chunk(b"IEND", b""))
    return path


@pytest.mark.parametrize("channels", [3, 4])
def test_reader_thread_png_decoder_matches_blender_and_leaves_filtered_pngs_to_it(addon, tmp_path, channels):
    """pngfile.read_png (run on the bridge's reader thread) decodes the unfiltered PNGs the backend
    writes to exactly what Blender's own decoder gives; for rows with any other filter it returns
    None, and the controller lets Blender decode the file."""
    from blender_addon import paths, pngfile, scene

    rng = np.random.default_rng(channels)
    height, width = 37, 53
    smooth = np.cumsum(rng.integers(-3, 4, (height, width, channels)), axis=1) + 128
    pixels = np.clip(smooth, 0, 255).astype(np.uint8)
    path = tmp_path / "backend.png"
    path.write_bytes(paths.shared("png").encode(pixels))
    decoded = pngfile.read_png(path)
    assert decoded is not None and decoded[:2] == (width, height)
    reference = bpy.data.images.load(str(path))
    np.testing.assert_array_equal(decoded[2], scene.read_pixels(reference))
    for only in range(1, 5):  # Sub, Up, Average, Paeth rows: Blender's job
        filters = np.zeros(height, int)
        filters[height // 2] = only
        filtered = _png_with_row_filters(tmp_path / f"filter{only}.png", pixels, filters)
        assert pngfile.read_png(filtered) is None
        np.testing.assert_array_equal(scene.read_pixels(bpy.data.images.load(str(filtered))), decoded[2])


def test_default_roles_leave_a_rigs_expressions_muted_and_driven_keys_alone(addon):
    from blender_addon import roles

    bpy.ops.mesh.primitive_monkey_add()
    obj = bpy.context.active_object
    obj.shape_key_add(name="Basis")
    names = ("nose_width", "ear", "chin_L", "brow_height", "EyeBlink_L", "mouthSmile.R", "Smile", "viseme_aa",
             "jaw_open", "browInnerUp", "muted_width", "driven_depth")
    for name in names:
        obj.shape_key_add(name=name, from_mix=False)
    blocks = obj.data.shape_keys.key_blocks
    blocks["muted_width"].mute = True
    driver = blocks["driven_depth"].driver_add("value").driver
    driver.expression = "0.5"
    expected = {"nose_width": "fit", "ear": "fit", "chin_L": "fit", "brow_height": "fit", "EyeBlink_L": "off",
                "mouthSmile.R": "off", "Smile": "off", "viseme_aa": "off", "jaw_open": "off", "browInnerUp": "off",
                "muted_width": "off", "driven_depth": "off"}
    assert roles.roles(obj) == expected
    roles.set_roles(obj, ["ear"], "locked")
    roles.set_roles(obj, ["Smile"], "fit")
    assert roles.roles(obj) == {**expected, "ear": "locked", "Smile": "fit"}
    plan = roles.plan(obj, roles.roles(obj))
    assert plan.components == ["nose_width", "ear", "chin_L", "brow_height", "Smile"]
    assert plan.fit == ["nose_width", "chin_L", "brow_height", "Smile"] and not plan.built_head
    assert plan.bounds == {name: [0.0, 1.0] for name in plan.fit}          # each key's own slider range
    headless = roles.with_patterns(roles.roles(obj), keys=["nose*", "BROW*"], lock=None)
    # a pattern may name an off key too: it was asked for
    assert [n for n, r in headless.items() if r == "fit"] == ["nose_width", "brow_height", "browInnerUp"]
    assert headless["chin_L"] == headless["Smile"] == "locked" and headless["EyeBlink_L"] == "off"
    with pytest.raises(ValueError, match="matches none"):
        roles.with_patterns(roles.roles(obj), keys=["zz*"], lock=None)



def test_a_keys_role_button_names_its_role_and_the_next_one(addon):
    from types import SimpleNamespace

    from blender_addon import roles
    from blender_addon.operators import SDSHEAD_OT_set_key_role

    bpy.ops.mesh.primitive_monkey_add()
    obj = bpy.context.active_object
    obj.shape_key_add(name="Basis")
    obj.shape_key_add(name="nose_width", from_mix=False)
    tip = SDSHEAD_OT_set_key_role.description(bpy.context, SimpleNamespace(key="nose_width", role="locked"))
    assert tip.startswith("nose_width is Fit. Click to make it Locked: The key keeps its value"), tip
    assert bpy.ops.sdshead.set_key_role(key="nose_width", role="locked") == {"FINISHED"}
    assert roles.roles(obj) == {"nose_width": "locked"}
    with pytest.raises(RuntimeError, match="has no shape key 'nobody'"):
        bpy.ops.sdshead.set_key_role(key="nobody", role="off")
    assert roles.roles(obj) == {"nose_width": "locked"}
