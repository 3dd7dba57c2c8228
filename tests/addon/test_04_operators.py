"""Layer 3: operators + controller, failure paths. Each shows a specific message in the panel's status
and leaves the weights from before the fit intact (directly, or after Reset once updates arrived)."""
from __future__ import annotations

import os
import signal
import time

import bpy
import numpy as np
import pytest

from conftest import BACKEND_PYTHON, SERVE_PYTHON, backend_ready, pid_gone, processes_in_group, wait_until


@pytest.fixture
def head(addon, synthetic_bundle):
    from blender_addon import scene

    assert bpy.ops.sdshead.create_head(bundle_path=str(synthetic_bundle)) == {"FINISHED"}
    obj = bpy.context.active_object
    names = scene.component_names(obj)
    weights = np.random.default_rng(3).normal(size=len(names)).astype(np.float32).tolist()
    scene.apply_weights(obj, scene.key_indices(obj, names), weights)
    settings = bpy.context.scene.sdshead
    settings.prompt = "a bald old man"
    settings.shape_steps = 5
    settings.render_size = 64
    return obj, names, weights


def _fit_error() -> str:
    with pytest.raises(RuntimeError) as info:
        bpy.ops.sdshead.fit()
    return str(info.value)


def _status():
    return bpy.context.window_manager.sdshead_status


def _run(timeout: float = 60.0):
    from blender_addon.controller import CONTROLLER

    deadline = time.monotonic() + timeout
    while CONTROLLER.busy and time.monotonic() < deadline:
        CONTROLLER.tick(wait=0.1)
    assert not CONTROLLER.busy, "fit did not end"


def test_empty_prompt(head, prefs):
    from blender_addon import scene
    from blender_addon.controller import CONTROLLER

    obj, names, weights = head
    bpy.context.scene.sdshead.prompt = "   "
    backend = CONTROLLER.backend
    assert "Prompt is empty" in _fit_error()
    assert "Prompt is empty" in _status().last_error
    assert CONTROLLER.backend is backend and not CONTROLLER.busy   # nothing was started
    assert scene.read_weights(obj, names) == weights


def test_missing_backend_python(head, prefs):
    from blender_addon import scene
    from blender_addon.controller import CONTROLLER

    obj, names, weights = head
    prefs.backend_python = "/nonexistent/venv/bin/python"
    backend = CONTROLLER.backend
    assert "Backend Python not found: /nonexistent/venv/bin/python" in _fit_error()
    assert "Preferences > Add-ons > SDS Head" in _status().last_error
    assert CONTROLLER.backend is backend and not CONTROLLER.busy
    assert scene.read_weights(obj, names) == weights


def test_missing_model_folder(head, prefs):
    from blender_addon import scene

    obj, names, weights = head
    prefs.model = "/nonexistent/models/sd15"
    assert "model: folder /nonexistent/models/sd15 not found" in _fit_error()
    assert scene.read_weights(obj, names) == weights


def test_active_mesh_without_shape_keys(head, prefs):
    obj, names, weights = head
    bpy.ops.mesh.primitive_cube_add()
    assert "Active mesh 'Cube' has no shape keys" in _fit_error()
    assert "has no shape keys" in _status().last_error


def test_texture_stage_on_mesh_without_uvs_is_refused(addon, prefs):
    bpy.ops.mesh.primitive_cube_add()
    obj = bpy.context.active_object
    obj.data.uv_layers.remove(obj.data.uv_layers[0])
    obj.shape_key_add(name="Basis")
    obj.shape_key_add(name="taller")
    settings = bpy.context.scene.sdshead
    settings.prompt, settings.stage_texture = "a box", True
    assert "has no UV map" in _fit_error()


def test_texture_stage_over_a_linked_base_color_is_refused_before_any_change(addon, prefs):
    """The user's material already feeds Base Color from a node: the fitted texture would not show,
    so the fit is refused, and no image, node or link is added."""
    bpy.ops.mesh.primitive_cube_add()
    obj = bpy.context.active_object
    obj.shape_key_add(name="Basis")
    obj.shape_key_add(name="taller")
    material = bpy.data.materials.new("Painted")
    if material.node_tree is None:       # Blender < 5 makes the tree on request
        material.use_nodes = True
    tree = material.node_tree
    bsdf = next(n for n in tree.nodes if n.type == "BSDF_PRINCIPLED")
    colour = tree.nodes.new("ShaderNodeRGB")
    tree.links.new(colour.outputs[0], bsdf.inputs["Base Color"])
    obj.data.materials.append(material)
    images, nodes, links = len(bpy.data.images), len(tree.nodes), len(tree.links)
    settings = bpy.context.scene.sdshead
    settings.prompt, settings.stage_texture = "a box", True
    assert f"takes its Base Color from node '{colour.name}'" in _fit_error()
    assert (len(bpy.data.images), len(tree.nodes), len(tree.links)) == (images, nodes, links)
    assert bsdf.inputs["Base Color"].links[0].from_node == colour


@pytest.mark.parametrize("mode, message, stderr", [
    ("garbage", "Backend answered garbage", "fake backend (garbage) starting"),
    ("crash", "ended during the fit (exit code 3)", "CUDA out of memory (fake)"),
])
def test_backend_failure_is_shown_and_reset_restores(head, prefs, fake_backend, mode, message, stderr):
    from blender_addon import scene
    from blender_addon.controller import CONTROLLER

    obj, names, weights = head
    prefs.backend_python = fake_backend(mode)
    assert bpy.ops.sdshead.fit() == {"FINISHED"}
    pid = CONTROLLER.backend.pid
    _run(20)
    status = _status()
    assert status.state == "failed"
    assert message in status.last_error and stderr in status.last_error
    # the last good state (progress 2 of the fake) is in the scene; Reset brings back the previous weights
    assert scene.read_weights(obj, names) == pytest.approx([w + 0.02 for w in weights], abs=1e-6)
    assert bpy.ops.sdshead.reset() == {"FINISHED"}
    assert scene.read_weights(obj, names) == weights
    assert wait_until(lambda: pid_gone(pid), 5)


def _backends():
    return ["fake", pytest.param("real", marks=pytest.mark.skipif(backend_ready() is not None,
                                                                   reason=str(backend_ready())))]


def _start_long_fit(kind: str, prefs, fake_backend, tiny_sd_dir_factory):
    from blender_addon.controller import CONTROLLER

    if kind == "fake":
        prefs.backend_python = fake_backend("slow")
    else:
        prefs.backend_python = str(SERVE_PYTHON)
        prefs.model = str(tiny_sd_dir_factory())
        prefs.device = "cpu"
        settings = bpy.context.scene.sdshead
        settings.shape_steps, settings.event_every = 10000, 1
    assert bpy.ops.sdshead.fit() == {"FINISHED"}
    deadline = time.monotonic() + 120
    while CONTROLLER.status.updates_applied < 2 and time.monotonic() < deadline:
        CONTROLLER.tick(wait=0.2)
    assert CONTROLLER.status.updates_applied >= 2, CONTROLLER.status
    return CONTROLLER.backend.pid


@pytest.fixture
def tiny_sd_dir_factory(request):
    return lambda: request.getfixturevalue("tiny_sd_dir")


@pytest.mark.parametrize("kind", _backends())
def test_sigkill_mid_fit_is_reported_and_reset_restores(head, prefs, fake_backend, tiny_sd_dir_factory, kind):
    from blender_addon import scene

    obj, names, weights = head
    pid = _start_long_fit(kind, prefs, fake_backend, tiny_sd_dir_factory)
    fitted = scene.read_weights(obj, names)
    assert fitted != weights
    os.kill(pid, signal.SIGKILL)
    _run(20)
    status = _status()
    assert status.state == "failed"
    assert "Backend failed: Backend process ended during the fit (killed by signal SIGKILL)" in status.last_error
    # the last good state is kept: the weights of the last update applied before the kill
    from blender_addon.controller import CONTROLLER

    assert scene.read_weights(obj, names) == pytest.approx(CONTROLLER.status.weights, abs=1e-6)
    assert all(np.isfinite(scene.read_weights(obj, names)))
    assert bpy.ops.sdshead.reset() == {"FINISHED"}
    assert scene.read_weights(obj, names) == weights


@pytest.mark.parametrize("kind", _backends())
def test_unregister_during_a_fit_leaves_no_backend_process(head, prefs, fake_backend, tiny_sd_dir_factory, kind):
    import addon_utils

    from conftest import ADDON

    pid = _start_long_fit(kind, prefs, fake_backend, tiny_sd_dir_factory)
    started = time.monotonic()
    addon_utils.disable(ADDON, default_set=True)
    try:
        elapsed = time.monotonic() - started
        assert pid_gone(pid), "backend still running after unregister"
        assert wait_until(lambda: processes_in_group(pid) == [], 2), processes_in_group(pid)
        assert elapsed < 10
    finally:
        addon_utils.enable(ADDON, default_set=True)


def test_ticks_with_nothing_new_leave_the_panel_alone(head, prefs, fake_backend):
    """The UI timer ticks ten times a second; only a tick that changed the status is published
    (each publish redraws the 3D views), so a backend that is quiet, e.g. loading a model, costs
    Blender no redraws."""
    from blender_addon.controller import CONTROLLER

    prefs.backend_python = fake_backend("hang")     # hello, one progress event, then silence
    heard = []
    CONTROLLER.listeners.append(heard.append)
    try:
        assert bpy.ops.sdshead.fit() == {"FINISHED"}
        assert wait_until(lambda: CONTROLLER.tick(wait=0.05) and CONTROLLER.status.updates_applied == 1, 20)
        assert heard[-1].iteration == 1 and heard[-1].state == "running"
        published = len(heard)
        for _ in range(20):
            assert CONTROLLER.tick(wait=0.01)
        assert len(heard) == published
        assert bpy.ops.sdshead.stop() == {"FINISHED"}    # a change again: published at once
        assert len(heard) == published + 1 and heard[-1].state == "stopping"
    finally:
        CONTROLLER.listeners.remove(heard.append)
        if CONTROLLER.backend is not None:
            CONTROLLER.backend.close(timeout=0.2)   # this fake reads no more input: no clean shutdown


def test_a_loading_heartbeat_leaves_the_head_alone(head, prefs, fake_backend):
    """While the model loads the backend sends "loading" progress every few seconds: the panel
    shows how long it has been loading; the head and the count of applied updates stay as they
    are (a test waiting for two updates must not take two heartbeats for a fit under way)."""
    from blender_addon import scene
    from blender_addon.controller import CONTROLLER

    obj, names, weights = head
    prefs.backend_python = fake_backend("loading")
    try:
        assert bpy.ops.sdshead.fit() == {"FINISHED"}
        assert wait_until(lambda: CONTROLLER.tick(wait=0.05) and CONTROLLER.status.stage == "loading", 20)
        status = CONTROLLER.status
        assert (status.state, status.message, status.total) == ("running", "loading the model (5 s)", 1000)
        assert status.updates_applied == 0
        assert scene.read_weights(obj, names) == weights
    finally:
        if CONTROLLER.backend is not None:
            CONTROLLER.backend.close(timeout=0.2)


@pytest.mark.skipif(not BACKEND_PYTHON.is_file(), reason="backend environment missing")
def test_check_backend_shows_the_doctors_answer(addon, prefs, tiny_sd_dir, tmp_path):
    prefs.backend_python, prefs.device = str(BACKEND_PYTHON), "cpu"
    prefs.model = str(tiny_sd_dir)
    assert bpy.ops.sdshead.check_backend(wait=True) == {"FINISHED"}
    status = _status()
    assert status.doctor_state in ("ok", "failed"), status.doctor_text
    assert "Device: cpu" in status.doctor_text
    assert f"Model: {tiny_sd_dir} loads in" in status.doctor_text, status.doctor_text


def test_check_backend_with_missing_python(addon, prefs):
    prefs.backend_python = "/nonexistent/python"
    with pytest.raises(RuntimeError, match="Backend Python not found"):
        bpy.ops.sdshead.check_backend(wait=True)


def test_deleting_the_head_mid_fit_stops_it_and_the_backend_takes_the_next_fit(head, prefs, fake_backend):
    from blender_addon.controller import CONTROLLER

    obj, names, weights = head
    prefs.backend_python = fake_backend("slow")
    assert bpy.ops.sdshead.fit() == {"FINISHED"}
    while CONTROLLER.status.updates_applied < 2:
        CONTROLLER.tick(wait=0.1)
    pid = CONTROLLER.backend.pid
    bpy.data.objects.remove(obj)
    _run(10)
    status = _status()
    assert status.state == "failed"
    assert "The head 'SDS Head' was deleted or lost its shape keys during the fit; the fit was stopped" in status.last_error
    bpy.ops.mesh.primitive_cube_add()
    cube = bpy.context.active_object
    cube.shape_key_add(name="Basis")
    cube.shape_key_add(name="wide")
    assert bpy.ops.sdshead.fit() == {"FINISHED"}
    while CONTROLLER.status.updates_applied < 2:
        CONTROLLER.tick(wait=0.1)
    assert CONTROLLER.backend.pid == pid          # same process, not 'busy'
    assert CONTROLLER.status.state == "running"
    assert cube.data.shape_keys.key_blocks["wide"].value > 0
