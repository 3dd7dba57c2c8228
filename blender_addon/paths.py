"""Where the add-on finds the project's files: the shared modules, the default head, the backend Python.

No bpy here. The add-on shares seven modules with the backend, the very same files: protocol (the
wire format), bundle (the head format), fit_config (settings, their defaults and ranges), inputs
(prompt and model checks), files (safe reading, atomic and staged writing), exits (exit codes,
Ctrl-C) and png (the textures' file format). They import only the standard library, numpy and each
other, and are imported here as the subpackage `<add-on>._shared`, whose folder is

* `<repo>/sds_backend/` when the add-on runs from the repository (tests, `blender -P
  blender_addon/headless.py`, or a link install of `<repo>/blender_addon`): the package's own
  `__init__` is not run, only the shared modules are imported;
* `shared/` beside this file in a self-contained copy (install_into_blender.py --mode copy, or
  an extension zip), where packaging copies them byte for byte, and the default head under
  `assets/`.

The repository copy wins whenever it is reachable through this file's real path.
"""
from __future__ import annotations

import importlib
import os
import sys
import types
from pathlib import Path

ADDON_DIR = Path(__file__).resolve().parent
DEFAULT_BUNDLE_NAME = "default_head.npz"
SHARED_MODULES = ("protocol", "bundle", "fit_config", "inputs", "files", "exits", "png")


def repo_root() -> Path | None:
    """The SDS Head repository this add-on lives in, or None for a self-contained copy."""
    candidate = ADDON_DIR.parent
    if (candidate / "sds_backend" / "protocol.py").is_file():
        return candidate
    return None


def shared_dir() -> Path:
    """The folder of the shared modules: the repository's sds_backend/, else the packaged copy."""
    root = repo_root()
    if root is not None:
        return root / "sds_backend"
    packaged = ADDON_DIR / "shared"
    if (packaged / "protocol.py").is_file():
        return packaged
    raise FileNotFoundError(
        f"the shared modules are missing: neither {ADDON_DIR.parent / 'sds_backend'} (repository) nor "
        f"{packaged} (packaged copy) holds protocol.py; reinstall the add-on with install.py")


def shared(name: str) -> types.ModuleType:
    """Import one of SHARED_MODULES (stdlib and numpy only), from shared_dir()."""
    assert name in SHARED_MODULES, name
    package = f"{__package__ or 'sds_head'}._shared"
    if package not in sys.modules:
        module = types.ModuleType(package, "the modules the add-on shares with the backend")
        module.__path__ = [str(shared_dir())]
        sys.modules[package] = module
    return importlib.import_module(f"{package}.{name}")


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
