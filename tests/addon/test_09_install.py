"""Installing from inside Blender: the zips `install.py --package` builds, the Install Backend
button against the package registries this machine reaches, and a fit through what it installed.

Each Blender runs with its own user folders, so the environment the add-on makes lands in a
temporary folder; uv's and pip's caches make a second install take seconds.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import time
import zipfile
from pathlib import Path

import pytest

from conftest import BLENDER, ROOT, blender_ext_cli, needs_blender

VERSION = re.search(r'__version__ = "([^"]+)"', (ROOT / "sds_backend" / "__init__.py").read_text()).group(1)
TINY_FIT = ["--prompt", "an old sailor", "--steps", "2", "--render-size", "64", "--device", "cpu"]


@pytest.fixture(scope="module")
def packages(tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("dist")
    result = subprocess.run([sys.executable, str(ROOT / "install.py"), "--package", "--out", str(out)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    return {"extension": out / f"sds_head-{VERSION}-extension.zip", "legacy": out / f"sds_head-{VERSION}-legacy.zip"}


def test_the_zips_hold_the_addon_and_its_backend_and_nothing_else(packages):
    """Both layouts, the one version, no caches, venvs, tests or weights; the manifest is what
    Blender's own validator accepts, with the permissions and platforms an extension declares."""
    import tomllib

    names = {}
    for kind, path in packages.items():
        with zipfile.ZipFile(path) as archive:
            names[kind] = archive.namelist()
    assert all(name.startswith("sds_head/") for name in names["legacy"])
    assert [n.removeprefix("sds_head/") for n in names["legacy"]] == names["extension"]
    files = names["extension"]
    for needed in ("__init__.py", "blender_manifest.toml", "backend/install.py", "backend/pyproject.toml",
                   "backend/sds_backend/protocol.py", "backend/sds_backend/core/guidance.py",
                   "backend/assets/default_head.npz"):
        assert needed in files, needed
    for name in files:
        assert not re.search(r"__pycache__|\.pyc$|(^|/)\.?venv|(^|/)tests/|\.safetensors$|\.ckpt$|(^|/)dist/", name), name
    with zipfile.ZipFile(packages["extension"]) as archive:
        manifest = tomllib.loads(archive.read("blender_manifest.toml").decode())
        init = archive.read("__init__.py").decode()
        backend_init = archive.read("backend/sds_backend/__init__.py").decode()
    assert manifest["version"] == VERSION and f'"version": {tuple(map(int, VERSION.split(".")))!r}' in init
    assert f'__version__ = "{VERSION}"' in backend_init
    assert set(manifest["permissions"]) == {"files", "network"}
    assert all(isinstance(reason, str) and reason for reason in manifest["permissions"].values())
    assert set(manifest["platforms"]) == {"windows-x64", "windows-arm64", "macos-x64", "macos-arm64", "linux-x64"}
    validate = subprocess.run([sys.executable, str(blender_ext_cli()), "validate", str(packages["extension"])],
                              capture_output=True, text=True, timeout=60)
    assert validate.returncode == 0, validate.stdout + validate.stderr
    # the repository's own copies agree with the one version (a link install shows them)
    repo_manifest = tomllib.loads((ROOT / "blender_addon" / "blender_manifest.toml").read_text())
    assert repo_manifest["version"] == VERSION
    assert f'"version": {tuple(map(int, VERSION.split(".")))!r}' in (ROOT / "blender_addon" / "__init__.py").read_text()


def _environment(tmp_path: Path, **extra) -> dict[str, str]:
    env = dict(os.environ, BLENDER_USER_CONFIG=str(tmp_path / "config"), BLENDER_USER_SCRIPTS=str(tmp_path / "scripts"),
               BLENDER_USER_EXTENSIONS=str(tmp_path / "ext"), HF_HUB_OFFLINE="1", **extra)
    env.pop("PYTHONPATH", None)
    return env


def _fit_record(out: Path) -> dict:
    record = json.loads((out / "fit.json").read_text())
    assert record["iterations"] == 2 and not record["stopped"]
    return record


@needs_blender
@pytest.mark.blender
def test_blender_3_installs_the_legacy_zip_then_its_backend_and_fits_through_it(packages, tmp_path, tiny_sd_dir):
    """Blender 3.4: Preferences > Install the zip, enable, Install Backend (a real environment in
    Blender's user config folder, made by the Python Blender runs); headless then fits through it.
    A second Install Backend changes nothing; an environment whose Python is gone reads 'broken'."""
    env = _environment(tmp_path)
    script = tmp_path / "install.py"
    script.write_text(textwrap.dedent(f"""
        import bpy, addon_utils, time
        bpy.ops.preferences.addon_install(filepath={str(packages["legacy"])!r})
        addon_utils.enable("sds_head", default_set=True)
        from sds_head import backend_env, preferences
        venv = preferences.environment_dir()
        print("STATE-BEFORE", backend_env.state(venv))
        start = time.monotonic()
        bpy.ops.sdshead.install_backend(wait=True)
        print("SECONDS", time.monotonic() - start)   # the figure in the README: an install from Blender, warm caches
        print("STATE", backend_env.state(venv))
        print("VENV", venv)
        start = time.monotonic()
        bpy.ops.sdshead.install_backend(wait=True)
        print("SECOND-SECONDS", time.monotonic() - start)
        bpy.ops.wm.save_userpref()
    """))
    result = subprocess.run([BLENDER, "-b", "--factory-startup", "--python-exit-code", "1", "-P", str(script)],
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in result.stdout.splitlines() if line.split(" ", 1)[0].isupper()
                 and " " in line)
    assert lines["STATE-BEFORE"] == "missing" and lines["STATE"] == "ready", result.stdout[-3000:]
    venv = Path(lines["VENV"])
    assert venv.is_relative_to(tmp_path / "config"), venv        # the user folder, not Blender's Python
    assert float(lines["SECOND-SECONDS"]) < 2.0                   # already installed: nothing runs
    assert "already installed" in result.stdout + result.stderr
    installed = tmp_path / "scripts" / "addons" / "sds_head"
    fit = subprocess.run([BLENDER, "-b", "--python-exit-code", "1", "-P", str(installed / "headless.py"), "--",
                          *TINY_FIT, "--out", str(tmp_path / "out"), "--model", str(tiny_sd_dir), "--glb"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert fit.returncode == 0, fit.stdout[-3000:] + fit.stderr[-3000:]
    _fit_record(tmp_path / "out")
    assert (tmp_path / "out" / "head.glb").stat().st_size > 0
    # the Python the environment was made from disappears (Blender upgraded, say): broken, offered for repair
    (venv / "pyvenv.cfg").write_text((venv / "pyvenv.cfg").read_text().replace("home = ", "home = /gone"))
    check = subprocess.run([BLENDER, "-b", "--python-exit-code", "1", "--python-expr",
                            "from sds_head import setup_operators as s; print('STATE', s.current_state())"],
                           env=env, capture_output=True, text=True, timeout=120)
    assert "STATE broken" in check.stdout, check.stdout + check.stderr


def test_blender_5_installs_the_extension_then_its_backend_and_fits_through_it(packages, tmp_path, tiny_sd_dir):
    """The bpy 5.0 wheel: the zip installs as an extension, Install Backend puts the environment in
    the extension's user folder, and the installed add-on's headless script fits through it."""
    env = _environment(tmp_path)
    code = textwrap.dedent(f"""
        import bpy
        bpy.ops.extensions.package_install_files(filepath={str(packages["extension"])!r}, repo="user_default",
                                                 enable_on_install=True, overwrite=True)
        import sys
        name = "bl_ext.user_default.sds_head"
        backend_env, preferences = sys.modules[name + ".backend_env"], sys.modules[name + ".preferences"]
        bpy.ops.sdshead.install_backend(wait=True)
        print("STATE", backend_env.state(preferences.environment_dir()))
        print("VENV", preferences.environment_dir())
        bpy.ops.wm.save_userpref()
    """)
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "STATE ready" in result.stdout, result.stdout[-3000:] + result.stderr[-3000:]
    venv = Path(result.stdout.split("VENV ", 1)[1].splitlines()[0])
    assert venv.is_relative_to(tmp_path / "ext"), venv
    installed = tmp_path / "ext" / "user_default" / "sds_head"
    fit = subprocess.run([sys.executable, "-c", textwrap.dedent(f"""
        import bpy, runpy, sys
        bpy.ops.wm.read_userpref()
        sys.argv = ["headless.py", "--", *{TINY_FIT!r}, "--out", {str(tmp_path / "out")!r},
                    "--model", {str(tiny_sd_dir)!r}]
        runpy.run_path({str(installed / "headless.py")!r}, run_name="__main__")
    """)], env=env, capture_output=True, text=True, timeout=300)
    assert fit.returncode == 0, fit.stdout[-3000:] + fit.stderr[-3000:]
    _fit_record(tmp_path / "out")


def test_a_cancelled_install_leaves_nothing_that_looks_installed(tmp_path):
    """Cancel while torch installs: the half-made environment is removed and reads 'missing'; an
    environment without install.py's completion mark reads 'incomplete', whatever else it holds."""
    from blender_addon import backend_env

    venv = tmp_path / "env"
    run = backend_env.InstallRun(sys.executable, venv).start()
    deadline = time.monotonic() + 120
    while run.running and not run.step.startswith("install torch") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert run.running, run.message
    run.cancel()
    run.join(60)
    assert not run.running and run.ok is False and run.message == "backend install cancelled"
    assert not venv.exists() and backend_env.state(venv) == "missing"
    assert "install torch" in run.log_path.read_text()
    venv.mkdir()
    (venv / "pyvenv.cfg").write_text("home = /usr/bin\n")
    (venv / "bin").mkdir()
    (venv / "bin" / "python").write_text("")
    assert backend_env.state(venv) == "incomplete"
    installer = backend_env.installer_module()
    (venv / installer.COMPLETE_STAMP).write_text("made for another backend")
    assert backend_env.state(venv) == "outdated"
    backend_env.remove(venv)
    assert not venv.exists()


def test_remove_refuses_a_folder_that_is_not_an_environment(tmp_path):
    from blender_addon import backend_env

    (tmp_path / "precious.txt").write_text("mine")
    with pytest.raises(OSError, match="not a Python environment"):
        backend_env.remove(tmp_path)
    assert (tmp_path / "precious.txt").read_text() == "mine"


def test_install_progress_reads_install_py_steps():
    from blender_addon import backend_env

    run = backend_env.InstallRun(sys.executable, Path("/nonexistent/env"))
    seen = []
    for line in ("[install] create env (its pip is installed next): python -m venv",
                 "[install] install uv into it with this Python's pip: python -m pip",
                 "[install] install torch: download the wheel pip picks: python -m pip download",
                 "[install] install torch: install it with uv: uv pip install",
                 "[install] install the backend's dependencies: uv pip install",
                 "Downloading diffusers (5 MB)",
                 "[install] import the backend once (writes its .pyc files): python -c",
                 "[install] done. Backend Python: /x/bin/python"):
        run.on_line(line)
        seen.append(run.progress)
    assert seen == sorted(seen) and seen[0] > 0 and seen[-1] == 1.0
    run._lines = ["[install] step 'install torch' failed (exit code 1); see the output above\n"]
    assert run.failure(1) == "step 'install torch' failed (exit code 1); see the output above"


def test_a_python_that_cannot_run_install_py_fails_in_one_line_and_repair_starts_afresh(tmp_path):
    """Repair (fresh) removes the broken environment before installing; an interpreter that is not
    Python, or is too old, ends the run with its own one line, not a hung 'running'."""
    from blender_addon import backend_env

    venv = tmp_path / "env"
    venv.mkdir()
    (venv / "pyvenv.cfg").write_text("home = /gone\n")
    old = tmp_path / "python3.9"
    old.write_text('#!/bin/sh\necho "[install] needs Python >= 3.10, this is 3.9.18" >&2\nexit 2\n')
    old.chmod(0o755)
    run = backend_env.InstallRun(str(old), venv, fresh=True).start()
    run.join(30)
    assert not venv.exists()
    assert run.ok is False and run.message == ("backend install failed: [install] needs Python >= 3.10, "
                                               "this is 3.9.18 (exit code 2)")
    not_python = tmp_path / "notes.txt"
    not_python.write_text("hello")
    run = backend_env.InstallRun(str(not_python), venv).start()
    run.join(30)
    assert run.ok is False and run.message.startswith(f"backend install failed: cannot run {not_python}")


def test_install_backend_refuses_a_missing_python_before_changing_anything(addon, tmp_path, monkeypatch):
    import bpy
    from blender_addon import preferences

    monkeypatch.setattr(preferences, "environment_dir", lambda: tmp_path / "env")
    prefs = preferences.get_preferences()
    before = prefs.install_python
    prefs.install_python = str(tmp_path / "no-such-python")
    try:
        with pytest.raises(RuntimeError, match="Python for the install not found: .*no-such-python"):
            bpy.ops.sdshead.install_backend()
    finally:
        prefs.install_python = before
    assert not (tmp_path / "env").exists()


@pytest.mark.parametrize("args, code, message", [
    (["--package", "--out", "{tmp}/file.txt/dist"], 1, "cannot write the zips into"),
    (["--env", "{tmp}/file.txt"], 2, "--env {tmp}/file.txt: not a folder"),
])
def test_install_py_refuses_an_output_it_cannot_use_in_one_line(tmp_path, args, code, message):
    (tmp_path / "file.txt").write_text("mine")
    result = subprocess.run([sys.executable, str(ROOT / "install.py"), *(a.format(tmp=tmp_path) for a in args)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == code and message.format(tmp=tmp_path) in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and (tmp_path / "file.txt").read_text() == "mine"
