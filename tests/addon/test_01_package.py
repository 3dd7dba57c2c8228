"""Layer 0: the package itself — metadata, registration, the shared protocol, no torch."""
from __future__ import annotations

import ast
import os
import subprocess
import sys
import tomllib

import addon_utils
import bpy
import pytest

from conftest import ADDON, ROOT, blender_ext_cli

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
    from blender_addon import operators, panel, setup_operators

    registered = operators.CLASSES + setup_operators.CLASSES
    assert all(cls.bl_idname.startswith("sdshead.") for cls in registered)
    drawn = set()
    for path in (ADDON_DIR / "panel.py", ADDON_DIR / "preferences.py", ADDON_DIR / "setup_operators.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "operator":
                drawn.add(node.args[0].value)
    assert drawn and drawn <= {cls.bl_idname for cls in registered}
    assert panel.SDSHEAD_PT_main.bl_category == "SDS Head"


def test_shared_modules_are_the_backend_files_themselves():
    """One definition: the add-on executes sds_backend/protocol.py, bundle.py, ... (paths.SHARED_MODULES),
    not copies; and those modules import nothing but the standard library, numpy and each other."""
    from blender_addon import bridge, paths

    assert paths.shared_dir() == ROOT / "sds_backend"
    assert bridge.protocol.__file__ == str(ROOT / "sds_backend" / "protocol.py")
    for name in paths.SHARED_MODULES:
        assert paths.shared(name).__file__ == str(ROOT / "sds_backend" / f"{name}.py")
        assert not (ADDON_DIR / f"{name}.py").exists(), f"a copy of {name}.py in the add-on would drift"
        for node in ast.walk(ast.parse((ROOT / "sds_backend" / f"{name}.py").read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                assert node.level == 1 and node.module in paths.SHARED_MODULES, f"{name}.py imports .{node.module}"
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                roots = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]
                for root in roots:
                    assert root.split(".")[0] in sys.stdlib_module_names | {"numpy", "__future__"}, \
                        f"{name}.py imports {root}"


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
    """bridge, paths and the shared modules run in a Python that has no bpy (and no torch)."""
    code = ("import sys; sys.modules['bpy'] = None\n"
            "import blender_addon.bridge, blender_addon.paths, blender_addon.synthetic\n"
            "[blender_addon.paths.shared(name) for name in blender_addon.paths.SHARED_MODULES]\n"
            "blender_addon.synthetic.make_bundle(rings=6, segments=8)\n"
            "assert 'torch' not in sys.modules and 'sds_backend' not in sys.modules\n"
            "print(blender_addon.bridge.protocol.PROTOCOL_VERSION)")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    from blender_addon import bridge

    assert result.stdout.strip() == str(bridge.protocol.PROTOCOL_VERSION)


def test_registering_imports_no_torch(addon):
    assert "torch" not in sys.modules


def test_panel_defaults_and_limits_are_the_backends_fit_config(addon):
    """The add-on keeps no copy of FitConfig's numbers: an untouched panel sends exactly FitConfig's
    defaults, and each setting's hard limits are FitConfig's range."""
    from blender_addon import paths, properties

    fit_config = paths.shared("fit_config")
    settings = bpy.context.scene.sdshead
    inputs = properties.fit_inputs(settings, "")
    assert fit_config.FitConfig.from_dict(inputs.config) == fit_config.FitConfig()
    for name in properties.NUMBER_SETTINGS:
        prop, limits = settings.bl_rna.properties[name], fit_config.RANGES[name]
        assert prop.hard_min == pytest.approx(limits.low), name
        if limits.high < 2 ** 31:
            assert prop.hard_max == pytest.approx(limits.high), name


def test_extension_package_validates_and_installs_in_blender_5(tmp_path):
    """Blender's own validator accepts the manifest; installing the zip as a 4.2+ extension works,
    and the installed extension runs on its byte-identical copies of the shared modules."""
    env = dict(os.environ, BLENDER_USER_CONFIG=str(tmp_path / "config"), BLENDER_USER_SCRIPTS=str(tmp_path / "scripts"),
               BLENDER_USER_EXTENSIONS=str(tmp_path / "ext"))
    zip_path = tmp_path / "sds_head.zip"
    install = subprocess.run([sys.executable, str(ADDON_DIR / "install_into_blender.py"), "--", "--addon-dir",
                              str(ADDON_DIR), "--backend-python", "/opt/sds/python", "--mode", "extension",
                              "--zip", str(zip_path)], env=env, capture_output=True, text=True, timeout=120)
    assert install.returncode == 0, install.stdout + install.stderr
    validate = subprocess.run([sys.executable, str(blender_ext_cli()), "validate", str(zip_path)],
                              capture_output=True, text=True, timeout=60)
    assert validate.returncode == 0, validate.stdout + validate.stderr
    installed = tmp_path / "ext" / "user_default" / "sds_head"
    from blender_addon import paths

    for name in paths.SHARED_MODULES:
        assert (installed / "backend" / "sds_backend" / f"{name}.py").read_bytes() == \
            (ROOT / "sds_backend" / f"{name}.py").read_bytes()
    check = subprocess.run([sys.executable, "-c", (
        "import bpy, sys; bpy.ops.wm.read_userpref()\n"
        "name = 'bl_ext.user_default.sds_head'\n"
        "print('PYTHON', bpy.context.preferences.addons[name].preferences.backend_python)\n"
        "print('PROTOCOL', sys.modules[name + '.bridge'].protocol.__file__)\n"
        "print('PANEL', hasattr(bpy.types, 'SDSHEAD_PT_main'))")], env=env, capture_output=True, text=True,
        timeout=120)
    assert check.returncode == 0, check.stderr
    assert "PYTHON /opt/sds/python" in check.stdout
    assert f"PROTOCOL {installed / 'backend' / 'sds_backend' / 'protocol.py'}" in check.stdout
    assert "PANEL True" in check.stdout
