"""End to end under a real `blender -b` with the real backend and the tiny SD: the headless run
writes weights.json / fit.json / texture.png / head.glb / head.fbx / a .blend, and fresh Blenders
re-import them with the same 50 shape keys, the fitted values and a textured material. The
README's own invocation (default shape-only stage, relative --out, --glb --fbx --save) runs too.

Blender 3.4's FBX importer clamps shape-key values to the default slider range [0, 1] (it sets
`value` before widening the slider; fixed in Blender 4.x, whose importer widens it first), so the
3.4 re-import of the FBX is checked for names and clamped values, and the exact values are checked
by re-importing the same file in Blender 5.0 (the bpy wheel).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import BLENDER, ROOT, SERVE_PYTHON, needs_backend, needs_blender
from reimport import reimport as _import

pytestmark = [needs_blender, needs_backend, pytest.mark.blender]
HEADLESS = ROOT / "blender_addon" / "headless.py"
@pytest.fixture(scope="module")
def headless_run(tmp_path_factory, tiny_sd_dir, head_bundle):
    out = tmp_path_factory.mktemp("e2e") / "out"
    env = dict(os.environ, BLENDER_USER_CONFIG=str(out.parent / "config"),
               BLENDER_USER_SCRIPTS=str(out.parent / "scripts"))
    command = [BLENDER, "-b", "--factory-startup", "--python-exit-code", "1", "-P", str(HEADLESS), "--",
               "--prompt", "a bald old man with a big nose", "--out", str(out), "--bundle", str(head_bundle),
               "--model", str(tiny_sd_dir), "--device", "cpu", "--backend-python", str(SERVE_PYTHON), "--stages", "shape,texture", "--steps", "3",
               "--texture-steps", "2", "--render-size", "64", "--texture-size", "64", "--event-every", "1",
               "--texture-every", "2", "--glb", "--fbx", "--save", str(out / "head.blend")]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    return out, result, env


def test_headless_run_exits_0_and_writes_the_outputs(headless_run):
    out, result, _ = headless_run
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for name in ("weights.json", "fit.json", "texture.png", "head.glb", "head.fbx", "head.blend"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert "[sds-head] shape 1/5" in result.stdout and "[sds-head] texture 5/5" in result.stdout
    weights = json.loads((out / "weights.json").read_text())
    record = json.loads((out / "fit.json").read_text())
    assert len(weights) == 50 and record["weights"] == pytest.approx(weights, abs=1e-6)
    assert record["state"] == "done" and record["iterations"] == 5 and not record["stopped"]
    assert record["config"]["stages"] == ["shape", "texture"] and record["config"]["shape_steps"] == 3
    assert any(abs(w) > 1e-4 for w in weights.values())
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["weights.json", "fit.json", "texture.png", "head.glb", "head.fbx", "head.blend"])   # nothing staged or temporary


@pytest.fixture(scope="module")
def readme_run(tmp_path_factory, tiny_sd_dir):
    """The README's headless command as written (relative blender_addon/headless.py and --out, the default
    shape-only stage, --glb --fbx --save), with the tiny model and few steps so that it runs here."""
    cwd = tmp_path_factory.mktemp("readme")
    (cwd / "blender_addon").symlink_to(ROOT / "blender_addon")
    env = dict(os.environ, BLENDER_USER_CONFIG=str(cwd / "config"), BLENDER_USER_SCRIPTS=str(cwd / "scripts"))
    command = [BLENDER, "-b", "--factory-startup", "--python-exit-code", "1", "-P", "blender_addon/headless.py", "--",
               "--prompt", "an old sailor", "--out", "out/sailor", "--glb", "--fbx", "--save", "out/sailor/head.blend",
               "--model", str(tiny_sd_dir), "--backend-python", str(SERVE_PYTHON), "--steps", "2",
               "--render-size", "64"]
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    return cwd / "out" / "sailor", result, env


def test_readme_headless_command_on_the_default_stage_writes_every_output(readme_run):
    out, result, env = readme_run
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for name in ("weights.json", "fit.json", "head.glb", "head.fbx", "head.blend"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    record = json.loads((out / "fit.json").read_text())
    assert record["config"] == {"shape_steps": 2, "render_size": 64}      # only what was set is sent
    assert record["state"] == "done" and record["iterations"] == 2
    assert not [p for p in out.rglob("*") if ".tmp" in p.name or "staging" in p.name]
    _check_keys(_import(out / "head.glb", env, python=sys.executable), record)
    _check_keys(_import(out / "head.blend", env), record)


def _check_keys(imported, record, clamp=False):
    fitted = record["weights"]
    assert imported["meshes"] == 1
    assert list(imported["keys"])[:50] == list(fitted)            # same 50 keys, same order (+ expressions)
    for name, value in fitted.items():
        expected = min(1.0, max(0.0, value)) if clamp else value
        assert imported["keys"][name] == pytest.approx(expected, abs=1e-4), name


def _check_texture(imported, out):
    assert imported["images"], "no textured material"
    image = imported["images"][0]
    assert image["size"] == [64, 64]
    # the first pixels (bottom row) equal texture.png's bottom row
    sys.path.insert(0, str(ROOT))
    from blender_addon import pngfile

    decoded = pngfile.read_png(out / "texture.png")
    assert decoded is not None
    expected = decoded[2].reshape(-1, 4)[:16, :3]
    got = np.array(image["head"]).reshape(-1, image["channels"])[:16, :3]
    np.testing.assert_allclose(got, expected, atol=1.5 / 255)


def test_glb_reimports_in_blender_34_with_values_and_texture(headless_run):
    out, result, env = headless_run
    record = json.loads((out / "fit.json").read_text())
    imported = _import(out / "head.glb", env)
    assert imported["blender"].startswith("3.4")
    _check_keys(imported, record)
    _check_texture(imported, out)


def test_glb_reimports_in_blender_50(headless_run):
    out, result, env = headless_run
    imported = _import(out / "head.glb", env, python=sys.executable)
    assert imported["blender"].startswith("5.0")
    _check_keys(imported, json.loads((out / "fit.json").read_text()))
    _check_texture(imported, out)


def test_fbx_reimports_in_blender_50_with_exact_values(headless_run):
    out, result, env = headless_run
    imported = _import(out / "head.fbx", env, python=sys.executable)
    _check_keys(imported, json.loads((out / "fit.json").read_text()))
    _check_texture(imported, out)


def test_fbx_reimports_in_blender_34_with_names_and_clamped_values(headless_run):
    out, result, env = headless_run
    imported = _import(out / "head.fbx", env)
    _check_keys(imported, json.loads((out / "fit.json").read_text()), clamp=True)
    _check_texture(imported, out)


def test_saved_blend_keeps_values_and_packed_texture(headless_run):
    out, result, env = headless_run
    imported = _import(out / "head.blend", env)
    _check_keys(imported, json.loads((out / "fit.json").read_text()))
    assert imported["images"][0]["packed"]
    _check_texture(imported, out)


def test_headless_model_the_backend_cannot_load_exits_4(tmp_path, head_bundle):
    empty = tmp_path / "not-a-model"
    empty.mkdir()
    (empty / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')   # and nothing else
    env = dict(os.environ, BLENDER_USER_CONFIG=str(tmp_path / "config"), BLENDER_USER_SCRIPTS=str(tmp_path / "scripts"))
    command = [BLENDER, "-b", "--factory-startup", "--python-exit-code", "1", "-P", str(HEADLESS), "--",
               "--prompt", "a head", "--out", str(tmp_path / "out"), "--bundle", str(head_bundle),
               "--model", str(empty), "--device", "cpu", "--backend-python", str(SERVE_PYTHON)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)
    assert result.returncode == 4, result.stdout[-2000:] + result.stderr[-2000:]
    assert "error: Model could not be loaded:" in result.stderr
    assert not (tmp_path / "out" / "weights.json").exists()
