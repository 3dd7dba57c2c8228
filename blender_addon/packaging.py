"""The self-contained add-on: one folder layout for copies, the 4.2+ extension zip and the legacy zip.

Standard library only: install.py (`--package`), which runs outside Blender, and
install_into_blender.py, which runs inside it, both load this file by its path.

A packaged add-on is `blender_addon/`'s files plus `backend/`, the part of the repository the
backend runs from (install.py, pyproject.toml, README.md, sds_backend/ and the default head in
assets/), so the add-on can install its own backend (backend_env.py). paths.repo_root() finds
`backend/` as the root, which makes the add-on import the very shared modules the backend runs.

The version comes from one place, `sds_backend.__version__`: packaging writes it into the
packaged bl_info and manifest (pyproject.toml reads it too).
"""
from __future__ import annotations

import re
import shutil
import tempfile
import zipfile
from pathlib import Path

MODULE = "sds_head"
BACKEND_FOLDER = "backend"
BACKEND_FILES = ("install.py", "pyproject.toml", "README.md")
BACKEND_TREES = ("sds_backend", "assets")
LEAVE_OUT = ("__pycache__", "*.pyc", "*.pyo", ".DS_Store", "*.tmp")
_VERSION = re.compile(r'^__version__ = "(\d+)\.(\d+)\.(\d+)"$', re.MULTILINE)


def version(repo: Path) -> tuple[int, int, int]:
    """sds_backend.__version__ of `repo`, read without importing the package."""
    match = _VERSION.search((repo / "sds_backend" / "__init__.py").read_text(encoding="utf-8"))
    if match is None:
        raise ValueError(f"{repo / 'sds_backend' / '__init__.py'} has no __version__ = \"X.Y.Z\"")
    return tuple(int(part) for part in match.groups())


def stage(repo: Path, target: Path) -> Path:
    """Write the self-contained add-on folder for `repo` at `target` (which must not exist)."""
    ignore = shutil.ignore_patterns(*LEAVE_OUT)
    shutil.copytree(repo / "blender_addon", target, ignore=ignore)
    backend = target / BACKEND_FOLDER
    for tree in BACKEND_TREES:
        shutil.copytree(repo / tree, backend / tree, ignore=ignore)
    for name in BACKEND_FILES:
        shutil.copyfile(repo / name, backend / name)
    _stamp_version(target, version(repo))
    return target


def _stamp_version(addon: Path, numbers: tuple[int, int, int]) -> None:
    text = ".".join(map(str, numbers))
    init = addon / "__init__.py"
    source, count = re.subn(r'"version": \(\d+, \d+, \d+\)', f'"version": {numbers!r}', init.read_text(encoding="utf-8"))
    manifest = addon / "blender_manifest.toml"
    toml, toml_count = re.subn(r'(?m)^version = "[^"]*"$', f'version = "{text}"', manifest.read_text(encoding="utf-8"))
    if count != 1 or toml_count != 1:
        raise ValueError("bl_info or blender_manifest.toml lost its version line")
    init.write_text(source, encoding="utf-8")
    manifest.write_text(toml, encoding="utf-8")


def _zip_folder(folder: Path, zip_path: Path, prefix: str) -> None:
    """`folder`'s files into `zip_path` under `prefix`, in a fixed order; written beside and renamed."""
    zip_path.parent.mkdir(parents=True, exist_ok=True)
    partial = zip_path.with_name(zip_path.name + ".tmp")
    with zipfile.ZipFile(partial, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                archive.write(path, prefix + path.relative_to(folder).as_posix())
    partial.replace(zip_path)


def build_extension_zip(repo: Path, zip_path: Path) -> Path:
    """The Blender 4.2+ extension package: the add-on's files at the zip's root."""
    with tempfile.TemporaryDirectory(prefix="sds-head-package-") as tmp:
        _zip_folder(stage(repo, Path(tmp) / MODULE), zip_path, "")
    return zip_path


def build_legacy_zip(repo: Path, zip_path: Path) -> Path:
    """The add-on zip Blender 3.4-4.1 installs (Preferences > Add-ons > Install): one `sds_head/` folder."""
    with tempfile.TemporaryDirectory(prefix="sds-head-package-") as tmp:
        _zip_folder(stage(repo, Path(tmp) / MODULE), zip_path, f"{MODULE}/")
    return zip_path


def build_packages(repo: Path, out: Path) -> list[Path]:
    """Both zips, named with the version, into `out`."""
    text = ".".join(map(str, version(repo)))
    return [build_extension_zip(repo, out / f"{MODULE}-{text}-extension.zip"),
            build_legacy_zip(repo, out / f"{MODULE}-{text}-legacy.zip")]
