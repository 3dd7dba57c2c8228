"""Layer 0: the package itself — metadata, registration, the shared protocol, no torch."""
from __future__ import annotations

import ast
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import addon_utils
import bpy
import pytest

from conftest import ADDON, ROOT

ADDON_DIR = ROOT / "blender_addon"


def test_bl_info_and_manifest_agree():
    import blender_addon

    info = blender_addon.bl_info
    assert info["blender"] == (3, 4, 0)
    manifest = tomllib.loads((ADDON_DIR / "blender_manifest.toml").read_text())
    assert manifest["type"] == "add-on"
    assert manifest["id"] == "sds_head"
    assert manifest["blender_version_min"] == "4.2.0"
    assert manifest["version"] == ".".join(map(str, info["version"]))
    assert manifest["name"] == info["name"]
    assert manifest["license"] == ["SPDX:MIT"]


def test_register_unregister_twice(addon):
    """Enable/disable cycles leave no class, property or handler behind."""
    for _ in range(2):
        addon_utils.disable(ADDON, default_set=True)
        assert not hasattr(bpy.types.Scene, "sdshead")
        assert not hasattr(bpy.types.WindowManager, "sdshead_status")
        assert not _operator_registered("sdshead.fit")
        assert not any(getattr(h, "__name__", "") == "_on_load_pre" for h in bpy.app.handlers.load_pre)
        module = addon_utils.enable(ADDON, default_set=True)
        assert module is not None
        assert hasattr(bpy.types.Scene, "sdshead")
        assert _operator_registered("sdshead.fit")
        assert sum(getattr(h, "__name__", "") == "_on_load_pre" for h in bpy.app.handlers.load_pre) == 1
    from blender_addon import controller, properties

    assert controller.CONTROLLER.listeners.count(properties.publish_status) == 1


def _operator_registered(idname: str) -> bool:
    module, name = idname.split(".")
    try:
        getattr(getattr(bpy.ops, module), name).get_rna_type()
        return True
    except (KeyError, AttributeError):
        return False


def test_every_operator_shares_the_prefix(addon):
    from blender_addon import operators, panel

    assert all(cls.bl_idname.startswith("sdshead.") for cls in operators.CLASSES)
    drawn = set()
    for path in (ADDON_DIR / "panel.py", ADDON_DIR / "preferences.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "operator":
                drawn.add(node.args[0].value)
    assert drawn and drawn <= {cls.bl_idname for cls in operators.CLASSES}
    assert panel.SDSHEAD_PT_main.bl_category == "SDS Head"


def test_protocol_is_the_backend_file_itself():
    """One definition: the add-on executes sds_backend/protocol.py, not a copy."""
    from blender_addon import bridge, paths

    assert paths.protocol_path() == ROOT / "sds_backend" / "protocol.py"
    assert bridge.protocol.__file__ == str(ROOT / "sds_backend" / "protocol.py")
    assert not (ADDON_DIR / "protocol.py").exists(), "a copy of protocol.py in the repository would drift"


def test_addon_never_imports_torch_or_other_backend_modules():
    """Static: no blender_addon module imports torch, numpy-heavy backends or sds_backend."""
    for path in ADDON_DIR.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            else:
                continue
            for name in names:
                assert name.split(".")[0] not in ("torch", "diffusers", "transformers", "sds_backend"), \
                    f"{path.name} imports {name}"


def test_plain_layers_import_without_bpy():
    """bridge/bundle_io/paths run in a Python that has no bpy (and no torch)."""
    code = ("import sys; sys.modules['bpy'] = None\n"
            "import blender_addon.bridge, blender_addon.bundle_io, blender_addon.paths, blender_addon.synthetic\n"
            "assert 'torch' not in sys.modules\n"
            "print(blender_addon.bridge.protocol.PROTOCOL_VERSION)")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "1"


def test_registering_imports_no_torch(addon):
    assert "torch" not in sys.modules


def test_fit_config_the_addon_sends_is_one_the_backend_accepts():
    """The add-on keeps no copy of FitConfig's fields; this catches a rename on either side."""
    from conftest import BACKEND_PYTHON

    if not (ROOT / "sds_backend" / "fit.py").is_file() or not BACKEND_PYTHON.is_file():
        pytest.skip("sds_backend/fit.py or the backend environment is missing")
    import json

    from blender_addon import controller

    config = controller.FitInputs(prompt="x", stages=("shape", "texture")).config()
    code = ("import json, sys; from sds_backend.fit import FitConfig; "
            "c = FitConfig.from_dict(json.loads(sys.argv[1])); print(json.dumps(c.to_dict()))")
    result = subprocess.run([str(BACKEND_PYTHON), "-c", code, json.dumps(config)], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    accepted = json.loads(result.stdout)
    assert {k: accepted[k] for k in config} == config


def _blender_ext_cli():
    import addon_utils as _  # noqa: F401  (the bpy wheel's addons_core is on sys.path after import bpy)

    found = list(Path(bpy.utils.system_resource("SCRIPTS")).glob("addons_core/bl_pkg/cli/blender_ext.py"))
    if not found:
        pytest.skip("this Blender has no extension tooling (bl_pkg)")
    return found[0]


def test_extension_package_validates_and_installs_in_blender_5(tmp_path):
    """Blender's own validator accepts the manifest; installing the zip as a 4.2+ extension works,
    and the installed extension runs on its byte-identical copy of protocol.py."""
    env = dict(os.environ, BLENDER_USER_CONFIG=str(tmp_path / "config"), BLENDER_USER_SCRIPTS=str(tmp_path / "scripts"),
               BLENDER_USER_EXTENSIONS=str(tmp_path / "ext"))
    zip_path = tmp_path / "sds_head.zip"
    install = subprocess.run([sys.executable, str(ADDON_DIR / "install_into_blender.py"), "--", "--addon-dir",
                              str(ADDON_DIR), "--backend-python", "/opt/sds/python", "--mode", "extension",
                              "--zip", str(zip_path)], env=env, capture_output=True, text=True, timeout=120)
    assert install.returncode == 0, install.stdout + install.stderr
    validate = subprocess.run([sys.executable, str(_blender_ext_cli()), "validate", str(zip_path)],
                              capture_output=True, text=True, timeout=60)
    assert validate.returncode == 0, validate.stdout + validate.stderr
    installed = tmp_path / "ext" / "user_default" / "sds_head"
    assert (installed / "protocol.py").read_bytes() == (ROOT / "sds_backend" / "protocol.py").read_bytes()
    check = subprocess.run([sys.executable, "-c", (
        "import bpy, sys; bpy.ops.wm.read_userpref()\n"
        "name = 'bl_ext.user_default.sds_head'\n"
        "print('PYTHON', bpy.context.preferences.addons[name].preferences.backend_python)\n"
        "print('PROTOCOL', sys.modules[name + '.bridge'].protocol.__file__)\n"
        "print('PANEL', hasattr(bpy.types, 'SDSHEAD_PT_main'))")], env=env, capture_output=True, text=True,
        timeout=120)
    assert check.returncode == 0, check.stderr
    assert "PYTHON /opt/sds/python" in check.stdout
    assert f"PROTOCOL {installed / 'protocol.py'}" in check.stdout
    assert "PANEL True" in check.stdout
