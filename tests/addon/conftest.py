"""Add-on tests: run in-process with the bpy wheel (`.venv-bpy/bin/python -m pytest tests/addon`).

Layers, in file order: package/registration, bundle <-> scene, bridge (no bpy), operators and the
fit flow against the real backend, and end to end under a real `blender -b`. The fake backend
(fake_backend.py) is only used for failure modes a real backend cannot be made to show on demand.
"""
from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BACKEND_PYTHON = ROOT / ".venv" / "bin" / "python"
# the interpreter that serves fits in the tests: the backend venv, or another build of the backend
SERVE_PYTHON = Path(os.environ.get("SDS_HEAD_TEST_SERVE_PYTHON", BACKEND_PYTHON))
BLENDER = shutil.which("blender")
HERE = Path(__file__).resolve().parent



def _path_without_pyenv_interpreter(path: str) -> str:
    """PATH without the folders a pyenv shim prepends for the interpreter it starts.

    Debian's Blender embeds the system libpython and takes its prefix from the first python3.x
    on PATH: run from under a pyenv shim (e.g. `python3 tests/run_all.py`), it would load pyenv's
    standard library and lose /usr/lib/python3/dist-packages, numpy included.
    """
    root = os.environ.get("PYENV_ROOT") or os.path.expanduser("~/.pyenv")
    prepended = (os.path.join(root, "versions") + os.sep, os.path.join(root, "libexec"),
                 os.path.join(root, "plugins") + os.sep)
    return os.pathsep.join(entry for entry in path.split(os.pathsep)
                           if not entry.startswith(prepended) or entry.endswith("shims"))


os.environ["PATH"] = _path_without_pyenv_interpreter(os.environ.get("PATH", ""))


if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

bpy = pytest.importorskip("bpy", reason="bpy wheel missing: run these tests with .venv-bpy/bin/python -m pytest")
import addon_utils  # noqa: E402

ADDON = "blender_addon"


def backend_ready() -> str | None:
    """None when the real backend can serve, else why not."""
    if "SDS_HEAD_TEST_SERVE_PYTHON" in os.environ:
        return None
    if not BACKEND_PYTHON.is_file():
        return f"backend environment missing ({BACKEND_PYTHON}); run install.py"
    return None


needs_backend = pytest.mark.skipif(backend_ready() is not None, reason=str(backend_ready()))
needs_blender = pytest.mark.skipif(BLENDER is None, reason="no 'blender' executable on PATH")


def blender_ext_cli() -> Path:
    """Blender's own extension tool (bl_pkg's blender_ext.py, which validates manifests), from the bpy wheel."""
    found = list(Path(bpy.utils.system_resource("SCRIPTS")).glob("addons_core/bl_pkg/cli/blender_ext.py"))
    if not found:
        pytest.skip("this Blender has no extension tooling (bl_pkg)")
    return found[0]


@pytest.fixture(scope="session")
def addon():
    """The add-on enabled through addon_utils (like Blender does), once per session."""
    from blender_addon import operators

    module = addon_utils.enable(ADDON, default_set=True)
    assert module is not None, "addon_utils could not enable the add-on"
    operators.OperatorBase.RAISE_EXCEPTIONS = True
    yield module
    addon_utils.disable(ADDON, default_set=True)


@pytest.fixture
def prefs(addon):
    """The add-on preferences, restored after the test."""
    p = bpy.context.preferences.addons[ADDON].preferences
    saved = {k: getattr(p, k) for k in ("backend_python", "model", "device", "timeout")}
    yield p
    p = bpy.context.preferences.addons[ADDON].preferences  # re-fetched: a disable/enable frees the old one
    for k, v in saved.items():
        setattr(p, k, v)


@pytest.fixture(autouse=True)
def clean_scene():
    """Every test starts from an empty scene and ends with no fit running. An idle backend stays up
    for the next test (as it does between fits in Blender) unless it is a fake one; the session's
    end closes it."""
    _empty_scene()
    yield
    from blender_addon import controller

    ctl = controller.CONTROLLER
    if ctl.busy or (ctl.backend is not None and ctl.backend.settings.python != str(SERVE_PYTHON)):
        ctl.shutdown("test ended")
    ctl.status = controller.Status()
    _empty_scene()


@pytest.fixture(scope="session", autouse=True)
def close_backends_at_the_end():
    yield
    if "blender_addon.controller" in sys.modules:
        sys.modules["blender_addon.controller"].CONTROLLER.shutdown("session ended")


def _empty_scene():
    for collection in (bpy.data.objects, bpy.data.meshes, bpy.data.materials, bpy.data.images):
        for item in list(collection):
            collection.remove(item)


@pytest.fixture(scope="session")
def synthetic_bundle(tmp_path_factory) -> Path:
    """50 components + 4 expressions, written by the backend's environment (numpy 2) when it exists,
    so the add-on (numpy < 2 here) proves it reads files the backend writes; else written here."""
    path = tmp_path_factory.mktemp("bundle") / "synthetic_head.npz"
    if BACKEND_PYTHON.is_file():
        code = (
            "import importlib.util, sys\n"
            f"spec = importlib.util.spec_from_file_location('synthetic', {str(ROOT / 'blender_addon' / 'synthetic.py')!r})\n"
            "synthetic = importlib.util.module_from_spec(spec); spec.loader.exec_module(synthetic)\n"
            "from sds_backend import bundle\n"
            "bundle.save(bundle.Bundle.from_arrays(**synthetic.make_arrays(rings=16, segments=24)), sys.argv[1])\n"
        )
        subprocess.run([str(BACKEND_PYTHON), "-c", code, str(path)], check=True, cwd=ROOT, timeout=120)
    else:
        from blender_addon import scene, synthetic

        scene.bundles().save(synthetic.make_bundle(rings=16, segments=24), path)
    return path


@pytest.fixture(scope="session")
def head_bundle(synthetic_bundle) -> Path:
    """The default head when assets/default_head.npz exists, else the synthetic one."""
    default = ROOT / "assets" / "default_head.npz"
    return default if default.is_file() else synthetic_bundle


@pytest.fixture
def fake_backend(tmp_path, monkeypatch):
    """make(mode) -> path of an executable that acts as the backend Python with that misbehaviour."""

    def make(mode: str) -> str:
        wrapper = tmp_path / f"fake-python-{mode}"
        wrapper.write_text(f"#!/bin/sh\nexec {sys.executable} {HERE / 'fake_backend.py'} \"$@\"\n")
        wrapper.chmod(wrapper.stat().st_mode | stat.S_IXUSR)
        monkeypatch.setenv("SDS_FAKE_MODE", mode)
        return str(wrapper)

    return make


@pytest.fixture(scope="session")
def tiny_sd_dir() -> Path:
    """The tiny random Stable Diffusion folder, the per-machine cached copy the backend's CLI
    builds once (`python -m sds_backend make-tiny-sd` prints its folder)."""
    if not BACKEND_PYTHON.is_file():
        pytest.skip(f"backend environment missing ({BACKEND_PYTHON}); run install.py")
    result = subprocess.run([str(BACKEND_PYTHON), "-m", "sds_backend", "make-tiny-sd"], cwd=ROOT, timeout=600,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    folder = Path(result.stdout.strip().splitlines()[-1])
    assert (folder / "model_index.json").is_file(), folder
    return folder


def pid_gone(pid: int) -> bool:
    """True when no process (zombies included) has this pid."""
    return not Path(f"/proc/{pid}").exists()


def processes_in_group(pgid: int) -> list[int]:
    """Live (non-zombie) processes whose process group is `pgid`."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid and fields[0] != "Z":
                found.append(int(entry.name))
    return found


def wait_until(predicate, timeout: float, step: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return predicate()


def write_png(path, rows) -> Path:
    """Write an 8-bit RGB PNG with the stdlib; rows[0] is the TOP row (PNG order)."""
    import struct
    import zlib

    height, width = len(rows), len(rows[0])
    raw = b"".join(b"\x00" + bytes(v for px in row for v in px) for row in rows)

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    data = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
    Path(path).write_bytes(data)
    return Path(path)
