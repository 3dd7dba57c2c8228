"""Where the add-on finds the project's files: the protocol module, the default head, the backend Python.

No bpy here. The add-on runs from one of two places:

* the repository itself (tests, `blender -P blender_addon/headless.py`, or an install that links
  Blender's add-on folder to `<repo>/blender_addon`): `<repo>/sds_backend/protocol.py` is loaded
  by file path, so the add-on and the backend use the very same file;
* a self-contained copy (install_into_blender.py --mode copy, or a 4.2+ extension zip): the
  packaging step copies `sds_backend/protocol.py` next to this file byte for byte, and the
  default head under `assets/`.

The repository copy wins whenever it is reachable through this file's real path.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

ADDON_DIR = Path(__file__).resolve().parent
DEFAULT_BUNDLE_NAME = "default_head.npz"
_protocol_module: ModuleType | None = None


def repo_root() -> Path | None:
    """The SDS Head repository this add-on lives in, or None for a self-contained copy."""
    candidate = ADDON_DIR.parent
    if (candidate / "sds_backend" / "protocol.py").is_file():
        return candidate
    return None


def protocol_path() -> Path:
    """The protocol module's file: the repository's, else the packaged copy beside this file."""
    root = repo_root()
    if root is not None:
        return root / "sds_backend" / "protocol.py"
    packaged = ADDON_DIR / "protocol.py"
    if packaged.is_file():
        return packaged
    raise FileNotFoundError(
        f"protocol.py not found: neither {ADDON_DIR.parent / 'sds_backend' / 'protocol.py'} (repository) "
        f"nor {packaged} (packaged copy) exists; reinstall the add-on with install.py")


def load_protocol() -> ModuleType:
    """Import the shared protocol module (stdlib only) once, by file path."""
    global _protocol_module
    if _protocol_module is None:
        path = protocol_path()
        package = __package__ or "sds_head"
        name = f"{package}._protocol"
        spec = importlib.util.spec_from_file_location(name, path)
        assert spec is not None and spec.loader is not None, path
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[name]
            raise
        _protocol_module = module
    return _protocol_module


def default_bundle_path() -> Path:
    """assets/default_head.npz of the repository, else of the packaged copy (may not exist)."""
    root = repo_root()
    if root is not None:
        return root / "assets" / DEFAULT_BUNDLE_NAME
    return ADDON_DIR / "assets" / DEFAULT_BUNDLE_NAME


def default_backend_python() -> str:
    """The `.venv` interpreter that install.py creates, when the repository is reachable; else ''."""
    root = repo_root()
    if root is None:
        return ""
    if os.name == "nt":
        return str(root / ".venv" / "Scripts" / "python.exe")
    return str(root / ".venv" / "bin" / "python")
