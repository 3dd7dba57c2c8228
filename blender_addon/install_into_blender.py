"""Install the SDS Head add-on into the Blender that runs this script, enable it, set its preferences.

    blender -b --python-exit-code 1 -P blender_addon/install_into_blender.py -- \\
        --addon-dir blender_addon --backend-python .venv/bin/python [--mode link|copy] [--model M] [--device D]

Modes (the add-on is always installed as the module `sds_head` in Blender's user add-on folder,
which Blender 3.4 to 5.x load as a (legacy) add-on):
  link  (default where symlinks work) a symlink to the repository's blender_addon/: edits and
        `git pull` take effect on the next Blender start, and the add-on loads the repository's
        own sds_backend/protocol.py.
  copy  a self-contained copy: blender_addon/ plus sds_backend/protocol.py (byte for byte) and
        assets/default_head.npz, the same files a 4.2+ extension zip holds.
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
    parser.add_argument("--mode", choices=("link", "copy"), default="link" if os.name != "nt" else "copy")
    parser.add_argument("--model", default=None, help="model preference (hub id or folder)")
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default=None)
    return parser.parse_args(argv)


def is_ours(path: Path) -> bool:
    init = path / "__init__.py"
    try:
        return init.is_file() and f'"name": "{ADDON_NAME}"' in init.read_text(encoding="utf-8")
    except OSError:
        return False


def stage_copy(addon_dir: Path, target: Path) -> None:
    """blender_addon/ + the protocol module + the default head: a self-contained add-on folder."""
    repo = addon_dir.parent
    shutil.copytree(addon_dir, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    shutil.copyfile(repo / "sds_backend" / "protocol.py", target / "protocol.py")
    head = repo / "assets" / "default_head.npz"
    if head.is_file():
        (target / "assets").mkdir(exist_ok=True)
        shutil.copyfile(head, target / "assets" / head.name)
        for extra in sorted(head.parent.glob("default_head*")):
            if extra != head and extra.is_file():
                shutil.copyfile(extra, target / "assets" / extra.name)


def install(args: argparse.Namespace) -> Path:
    addon_dir = args.addon_dir.resolve()
    if not (addon_dir / "__init__.py").is_file() or not is_ours(addon_dir):
        raise SystemExit(f"--addon-dir {addon_dir} is not the SDS Head add-on folder")
    backend_python = Path(os.path.expanduser(args.backend_python)).absolute()
    if not backend_python.is_file():
        say(f"warning: backend Python {backend_python} does not exist (yet); set it later in the preferences")
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
        stage_copy(addon_dir, target)
    say(f"{args.mode}: {target} -> {addon_dir if args.mode == 'link' else 'copy'}")

    bpy.utils.refresh_script_paths()  # a user add-on folder created just now joins sys.path
    if str(addons) not in sys.path:
        sys.path.append(str(addons))
    addon_utils.modules_refresh()
    module = addon_utils.enable(MODULE, default_set=True, persistent=True)
    if module is None or MODULE not in bpy.context.preferences.addons:
        raise SystemExit(f"Blender could not enable {MODULE} (see the messages above)")
    prefs = bpy.context.preferences.addons[MODULE].preferences
    prefs.backend_python = str(backend_python)
    if args.model is not None:
        prefs.model = args.model
    if args.device is not None:
        prefs.device = args.device
    bpy.context.preferences.use_preferences_save = True
    bpy.ops.wm.save_userpref()
    say(f"enabled {MODULE} in Blender {bpy.app.version_string}; backend Python: {backend_python}")
    say(f"preferences saved in {bpy.utils.user_resource('CONFIG')}")
    return target


def main() -> int:
    argv = sys.argv[sys.argv.index("--") + 1:] if "--" in sys.argv else []
    install(parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
