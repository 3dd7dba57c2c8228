"""Install the SDS Head add-on into the Blender that runs this script, enable it, set its preferences.

    blender -b --python-exit-code 1 -P blender_addon/install_into_blender.py -- \\
        --addon-dir blender_addon --backend-python .venv/bin/python [--mode link|copy] [--model M] [--device D]

Modes (link and copy install the module `sds_head` in Blender's user add-on folder, which Blender
3.4 to 5.x load as a (legacy) add-on):
  link  (default where symlinks work) a symlink to the repository's blender_addon/: edits and
        `git pull` take effect on the next Blender start, and the add-on loads the repository's
        own shared modules (sds_backend/protocol.py, bundle.py, ...: paths.SHARED_MODULES).
  copy  a self-contained copy (packaging.py): blender_addon/ plus backend/ (the backend's source with
        the shared modules, its installer and the default head), the same files the zips hold.
  extension  (Blender 4.2+) the copy, zipped as an extension package (blender_manifest.toml) and
        installed into the user_default extension repository: the module is bl_ext.user_default.sds_head.
The user preferences are saved, so the backend Python is remembered. Running it again replaces
an earlier install of SDS Head; a different add-on with the same folder name is left alone.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

import bpy  # first: the bpy wheel provides addon_utils only once bpy is imported
import addon_utils  # noqa: E402

MODULE = "sds_head"
ADDON_NAME = "SDS Head"


def say(text: str) -> None:
    print(f"[install-addon] {text}", flush=True)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="install_into_blender.py")
    parser.add_argument("--addon-dir", required=True, type=Path, help="the repository's blender_addon/ folder")
    parser.add_argument("--backend-python", required=True, help="interpreter of the backend environment")
    parser.add_argument("--mode", choices=("link", "copy", "extension"), default="link" if os.name != "nt" else "copy")
    parser.add_argument("--zip", type=Path, default=None, help="extension mode: also keep the package zip here")
    parser.add_argument("--model", default=None, help="model preference (hub id or folder)")
    parser.add_argument("--device", choices=("auto", "cuda", "mps", "cpu"), default=None)
    return parser.parse_args(argv)


def is_ours(path: Path) -> bool:
    init = path / "__init__.py"
    try:
        return init.is_file() and f'"name": "{ADDON_NAME}"' in init.read_text(encoding="utf-8")
    except OSError:
        return False


def _packaging(addon_dir: Path):
    """packaging.py of the add-on being installed (this script runs outside the package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_sds_head_packaging", addon_dir / "packaging.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def install_extension(args: argparse.Namespace, addon_dir: Path, backend_python: Path) -> str:
    if bpy.app.version < (4, 2, 0):
        raise SystemExit(f"--mode extension needs Blender 4.2+, this is {bpy.app.version_string}; use link or copy")
    import tempfile

    zip_path = args.zip or Path(tempfile.mkdtemp(prefix="sds-head-ext-")) / f"{MODULE}.zip"
    _packaging(addon_dir).build_extension_zip(addon_dir.parent, zip_path)
    result = bpy.ops.extensions.package_install_files(filepath=str(zip_path), repo="user_default",
                                                      enable_on_install=True, overwrite=True)
    module = f"bl_ext.user_default.{MODULE}"
    if "FINISHED" not in result or module not in bpy.context.preferences.addons:
        raise SystemExit(f"Blender could not install/enable the extension {zip_path} ({result})")
    say(f"extension installed from {zip_path}")
    return module


def install(args: argparse.Namespace) -> Path:
    addon_dir = args.addon_dir.resolve()
    if not (addon_dir / "__init__.py").is_file() or not is_ours(addon_dir):
        raise SystemExit(f"--addon-dir {addon_dir} is not the SDS Head add-on folder")
    backend_python = Path(os.path.expanduser(args.backend_python)).absolute()
    if not backend_python.is_file():
        say(f"warning: backend Python {backend_python} does not exist (yet); set it later in the preferences")
    if args.mode == "extension":
        module_name = install_extension(args, addon_dir, backend_python)
        set_preferences(module_name, args, backend_python)
        return Path(bpy.utils.user_resource("EXTENSIONS", path="user_default")) / MODULE
    addons = Path(bpy.utils.user_resource("SCRIPTS", path="addons", create=True))
    target = addons / MODULE
    if target.is_symlink() or target.exists():
        if not target.is_symlink() and not is_ours(target):
            raise SystemExit(f"{target} exists and is not SDS Head: move it away first")
        if MODULE in bpy.context.preferences.addons:
            addon_utils.disable(MODULE, default_set=True)
        if target.is_symlink() or target.is_file():
            target.unlink()
        else:
            shutil.rmtree(target)
    if args.mode == "link":
        target.symlink_to(addon_dir, target_is_directory=True)
    else:
        _packaging(addon_dir).stage(addon_dir.parent, target)
    say(f"{args.mode}: {target} -> {addon_dir if args.mode == 'link' else 'copy'}")

    bpy.utils.refresh_script_paths()  # a user add-on folder created just now joins sys.path
    if str(addons) not in sys.path:
        sys.path.append(str(addons))
    addon_utils.modules_refresh()
    module = addon_utils.enable(MODULE, default_set=True, persistent=True)
    if module is None or MODULE not in bpy.context.preferences.addons:
        raise SystemExit(f"Blender could not enable {MODULE} (see the messages above)")
    set_preferences(MODULE, args, backend_python)
    return target


def set_preferences(module: str, args: argparse.Namespace, backend_python: Path) -> None:
    prefs = bpy.context.preferences.addons[module].preferences
    prefs.backend_python = str(backend_python)
    if args.model is not None:
        prefs.model = args.model
    if args.device is not None:
        prefs.device = args.device
    bpy.context.preferences.use_preferences_save = True
    bpy.ops.wm.save_userpref()
    say(f"enabled {module} in Blender {bpy.app.version_string}; backend Python: {backend_python}")
    say(f"preferences saved in {bpy.utils.user_resource('CONFIG')}")


def main() -> int:
    argv = sys.argv[sys.argv.index("--") + 1:] if "--" in sys.argv else []
    install(parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
