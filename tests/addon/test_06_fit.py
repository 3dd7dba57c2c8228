"""Layer 3 with the REAL backend (`.venv/bin/python -m sds_backend serve`) and the tiny random SD:
a fit changes the scene's shape-key values and texture pixels, Stop ends it within one iteration,
Reset restores the exact previous values, the backend stays up between fits."""
from __future__ import annotations

import time

import bpy
import numpy as np
import pytest

from conftest import SERVE_PYTHON, needs_backend

pytestmark = needs_backend


@pytest.fixture
def real(prefs, tiny_sd_dir):
    prefs.backend_python = str(SERVE_PYTHON)
    prefs.model = str(tiny_sd_dir)
    prefs.device = "cpu"
    prefs.timeout = 120
    settings = bpy.context.scene.sdshead
    settings.prompt, settings.negative_prompt = "a bald old man with a big nose", "blurry"
    settings.render_size, settings.texture_size = 64, 64
    settings.event_every, settings.texture_every = 1, 2
    settings.shape_steps, settings.texture_steps = 2, 2
    return prefs


@pytest.fixture
def head(addon, head_bundle):
    from blender_addon import scene

    assert bpy.ops.sdshead.create_head(bundle_path=str(head_bundle)) == {"FINISHED"}
    obj = bpy.context.active_object
    names = scene.component_names(obj)
    before = np.random.default_rng(5).normal(scale=0.5, size=len(names)).astype(np.float32).tolist()
    scene.apply_weights(obj, scene.key_indices(obj, names), before)
    return obj, names, before


def _run(timeout=180.0):
    from blender_addon.controller import CONTROLLER

    deadline = time.monotonic() + timeout
    while CONTROLLER.busy and time.monotonic() < deadline:
        CONTROLLER.tick(wait=0.1)
    assert not CONTROLLER.busy, f"fit still running after {timeout} s: {CONTROLLER.status}"
    return CONTROLLER.status


def test_fit_changes_weights_and_pixels_then_reset_restores_them(real, head):
    from blender_addon import scene
    from blender_addon.controller import CONTROLLER

    obj, names, before = head
    settings = bpy.context.scene.sdshead
    settings.stage_texture = True
    image = scene.texture_image(obj)
    pixels_before, size_before = scene.read_pixels(image), tuple(image.size)

    assert bpy.ops.sdshead.fit() == {"FINISHED"}
    status = _run()
    assert status.state == "done", status.last_error
    assert status.iterations_done == 4 and status.updates_applied >= 1 and status.textures_applied >= 1
    after = scene.read_weights(obj, names)
    assert after != before
    assert after == pytest.approx(status.weights, abs=1e-6)           # the scene holds the backend's final weights
    assert max(abs(w) for w in after) <= 3.0 + 1e-6                    # weight_clamp
    assert tuple(image.size) == (64, 64)
    fitted = scene.read_pixels(image)
    final = bpy.data.images.load(status.outputs["texture"], check_existing=False)   # the backend's final PNG
    np.testing.assert_array_equal(fitted, scene.read_pixels(final))
    bpy.data.images.remove(final)
    assert fitted.reshape(-1, 4)[:, :3].std(axis=0).max() > 1e-3        # no longer the flat skin colour
    wm = bpy.context.window_manager.sdshead_status
    assert wm.state == "done" and wm.progress == pytest.approx(100.0)

    assert bpy.ops.sdshead.reset() == {"FINISHED"}
    assert scene.read_weights(obj, names) == before
    assert tuple(image.size) == size_before
    np.testing.assert_array_equal(scene.read_pixels(image), pixels_before)
    assert CONTROLLER.backend.alive  # the model stays loaded for the next fit


def test_saved_file_keeps_the_fitted_texture_and_reset_works_after_reopening(real, head, tmp_path):
    """A generated image's pixels are regenerated when a file is opened unless they are packed: the
    fit packs what it made, and Reset still finds the backup after the file is reopened (images
    load lazily then)."""
    from blender_addon import scene

    obj, names, before = head
    bpy.context.scene.sdshead.stage_texture = True
    pixels_before = scene.read_pixels(scene.texture_image(obj))
    assert bpy.ops.sdshead.fit() == {"FINISHED"}
    assert _run().state == "done"
    fitted, weights = scene.read_pixels(scene.texture_image(obj)), scene.read_weights(obj, names)
    assert scene.texture_image(obj).packed_file is not None

    path, name = tmp_path / "fitted.blend", obj.name
    bpy.ops.wm.save_as_mainfile(filepath=str(path))
    bpy.ops.wm.open_mainfile(filepath=str(path))
    obj = bpy.data.objects[name]
    bpy.context.view_layer.objects.active = obj
    assert not scene.texture_image(obj).has_data                        # not loaded until used
    np.testing.assert_array_equal(scene.read_pixels(scene.texture_image(obj)), fitted)
    assert scene.read_weights(obj, names) == weights

    assert bpy.ops.sdshead.reset() == {"FINISHED"}
    assert scene.read_weights(obj, names) == before
    np.testing.assert_array_equal(scene.read_pixels(scene.texture_image(obj)), pixels_before)


def test_stop_ends_the_fit_within_one_iteration(real, head):
    from blender_addon import scene
    from blender_addon.controller import CONTROLLER

    obj, names, before = head
    bpy.context.scene.sdshead.shape_steps = 5000
    assert bpy.ops.sdshead.fit() == {"FINISHED"}
    deadline = time.monotonic() + 120
    while CONTROLLER.status.updates_applied < 2 and time.monotonic() < deadline:
        CONTROLLER.tick(wait=0.1)
    CONTROLLER.tick(wait=0.0)
    seen = CONTROLLER.status.iteration
    seconds_per_iteration = CONTROLLER.status.seconds / max(1, seen)
    assert bpy.ops.sdshead.stop() == {"FINISHED"}
    status = _run(60)
    assert status.state == "stopped"
    assert status.iterations_done <= seen + 2, (status.iterations_done, seen)   # the one in flight, then stop
    # the latency also covers the backend writing the outputs the add-on asks for (weights.json and
    # texture.png) before it sends `done`, and a loaded machine: ~0.2 s here
    assert status.stop_latency < 2 * seconds_per_iteration + 2.0, (status.stop_latency, seconds_per_iteration)
    print(f"\nSTOP-LATENCY {status.stop_latency * 1000:.0f} ms; {seconds_per_iteration * 1000:.0f} ms per iteration; "
          f"stopped at iteration {status.iterations_done}, {seen} seen when Stop was pressed")
    stopped_weights = scene.read_weights(obj, names)
    assert stopped_weights != before and stopped_weights == pytest.approx(status.weights, abs=1e-6)
    assert bpy.ops.sdshead.reset() == {"FINISHED"}
    assert scene.read_weights(obj, names) == before


def test_model_the_backend_cannot_load_is_reported(real, head, tmp_path):
    from blender_addon import scene

    obj, names, before = head
    real.model = str(tmp_path)  # exists, but holds no model: refused before anything starts
    with pytest.raises(RuntimeError, match="has no model_index.json"):
        bpy.ops.sdshead.fit()
    (tmp_path / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')  # but nothing else
    assert bpy.ops.sdshead.fit() == {"FINISHED"}
    status = _run()
    assert status.state == "failed"
    assert status.last_error.startswith("Model could not be loaded:"), status.last_error
    assert scene.read_weights(obj, names) == before


def test_any_mesh_with_shape_keys_can_be_fitted(real, addon):
    """A user mesh: the add-on writes its bundle into the job folder; the backend fits its keys."""
    from blender_addon import scene

    bpy.ops.mesh.primitive_monkey_add()
    obj = bpy.context.active_object
    bpy.ops.mesh.uv_texture_add()
    obj.shape_key_add(name="Basis")
    rng = np.random.default_rng(0)
    for name in ("brow", "jaw", "cheeks"):
        kb = obj.shape_key_add(name=name, from_mix=False)
        co = np.empty(len(obj.data.vertices) * 3, np.float32)
        kb.data.foreach_get("co", co)
        kb.data.foreach_set("co", co + rng.normal(scale=0.05, size=co.size).astype(np.float32))
    bpy.context.scene.sdshead.shape_steps = 1
    assert bpy.ops.sdshead.fit() == {"FINISHED"}
    status = _run()
    assert status.state == "done", status.last_error
    weights = scene.read_weights(obj, ["brow", "jaw", "cheeks"])
    assert weights != [0.0, 0.0, 0.0] and weights == pytest.approx(status.weights, abs=1e-6)


def test_second_fit_reuses_the_running_backend(real, head):
    # last in the file: its Stop Backend ends the process the tests above share
    from blender_addon.controller import CONTROLLER

    bpy.context.scene.sdshead.shape_steps = 1
    assert bpy.ops.sdshead.fit() == {"FINISHED"}
    pid = CONTROLLER.backend.pid
    assert _run().state == "done"
    bpy.context.scene.sdshead.seed = 7
    assert bpy.ops.sdshead.fit() == {"FINISHED"}
    assert CONTROLLER.backend.pid == pid
    assert _run().state == "done"
    assert bpy.ops.sdshead.stop_backend() == {"FINISHED"}
    assert CONTROLLER.backend is None


def test_headless_shape_only_exports_in_blender_5(real, addon, tmp_path, monkeypatch, tiny_sd_dir):
    """The README's headless invocation in the bpy 5.0 module: the default shape-only stage, a
    relative --out, --glb --fbx --save (the texture was never fitted, and still packs and exports)."""
    from blender_addon import headless

    monkeypatch.chdir(tmp_path)
    code = headless.main(["--prompt", "an old sailor", "--out", "out/sailor", "--glb", "--fbx", "--save",
                          "out/sailor/head.blend", "--model", str(tiny_sd_dir), "--backend-python", str(SERVE_PYTHON),
                          "--steps", "2", "--render-size", "64"])
    out = tmp_path / "out" / "sailor"
    assert code == 0
    assert sorted(p.name for p in out.iterdir()) == ["fit.json", "head.blend", "head.fbx", "head.glb", "texture.png",
                                                     "weights.json"]
    assert all((out / name).stat().st_size > 0 for name in ("head.blend", "head.fbx", "head.glb"))


def test_headless_fits_through_the_tiny_vae_it_is_given(real, addon, tmp_path, tiny_sd_dir):
    """`--vae tiny --vae-model DIR` reaches the backend's loader: the tiny model's AutoencoderTiny fits,
    and a tiny VAE folder that cannot load fails the run with the backend's message (exit 4)."""
    import json

    from blender_addon import headless
    from sds_backend.tools.tiny_sd import TINY_VAE_FOLDER

    vae = tiny_sd_dir / TINY_VAE_FOLDER
    common = ["--prompt", "an old sailor", "--model", str(tiny_sd_dir), "--backend-python", str(SERVE_PYTHON),
              "--steps", "2", "--render-size", "64", "--vae", "tiny"]
    assert headless.main([*common, "--out", str(tmp_path / "tiny"), "--vae-model", str(vae)]) == 0
    record = json.loads((tmp_path / "tiny" / "fit.json").read_text())
    assert record["vae_model"] == str(vae) and record["config"]["vae"] == "tiny" and record["iterations"] == 2
    broken = tmp_path / "broken_vae"
    broken.mkdir()
    (broken / "config.json").write_text('{"_class_name": "AutoencoderTiny"}')
    assert headless.main([*common, "--out", str(tmp_path / "broken"), "--vae-model", str(broken)]) == 4
    assert not (tmp_path / "broken").exists()
