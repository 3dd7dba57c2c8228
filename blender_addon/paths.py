"""Where the add-on finds the project's files: the shared modules, the default head, the backend.

No bpy here. The add-on shares seven modules with the backend, the very same files: protocol (the
wire format), bundle (the head format), fit_config (settings, their defaults and ranges), inputs
(prompt and model checks), files (safe reading, atomic and staged writing), exits (exit codes,
Ctrl-C) and png (the textures' file format). They import only the standard library, numpy and each
other, and are imported here as the subpackage `<add-on>._shared` from `<root>/sds_backend/`,
where the root is

* the repository, when the add-on runs from it (tests, `blender -P blender_addon/headless.py`, or
  a link install of `<repo>/blender_addon`): the package's own `__init__` is not run;
* `backend/` beside this file in a packaged add-on (a copy, the extension zip or the legacy zip:
  packaging.py), which holds the backend's source, its installer and the default head.

The repository wins whenever it is reachable through this file's real path.
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
    """The folder holding sds_backend/ and assets/: the repository, else a package's backend/."""
    for candidate in (ADDON_DIR.parent, ADDON_DIR / "backend"):
        if (candidate / "sds_backend" / "protocol.py").is_file():
            return candidate
    return None


def shared_dir() -> Path:
    """The folder of the shared modules: sds_backend/ of repo_root()."""
    root = repo_root()
    if root is None:
        raise FileNotFoundError(
            f"the shared modules are missing: neither {ADDON_DIR.parent / 'sds_backend'} (repository) nor "
            f"{ADDON_DIR / 'backend' / 'sds_backend'} (package) holds protocol.py; reinstall the add-on")
    return root / "sds_backend"


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
    """assets/default_head.npz of repo_root() (may not exist)."""
    root = repo_root() or ADDON_DIR
    return root / "assets" / DEFAULT_BUNDLE_NAME


def in_repository() -> bool:
    """Whether the add-on runs from the repository (not from a package with its own backend/)."""
    return repo_root() == ADDON_DIR.parent


def venv_python(venv: Path) -> Path:
    return venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def default_backend_python() -> str:
    """The repository's `.venv` interpreter (install.py makes it) when the add-on runs from the
    repository; else '' (a packaged add-on runs the environment *Install Backend* makes)."""
    return str(venv_python(ADDON_DIR.parent / ".venv")) if in_repository() else ""
