"""The backend environment a packaged add-on installs for itself, and the model it downloads.

No bpy here (preferences.py and operators.py are the bpy layer). The environment is a virtual
environment in the add-on's user folder, never Blender's own Python: `install.py --env DIR`,
run by the Python Blender runs (or one the user names), installs torch and the backend's
dependencies there, and the backend runs from the add-on's `backend/` folder
(paths.repo_root()). install.py marks the folder complete only at its very end, so a cancelled
or failed install never looks complete; `state` asks install.py itself.

Each long step runs as a `StepRun`: a subprocess in its own process group, read by a thread,
its output appended to a log file the messages point at, cancellable at any time.
"""
from __future__ import annotations

import functools
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

from . import bridge, paths

# install.py's step names, in the order it runs them, with how far along an install is when each
# starts (torch is most of the download)
INSTALL_STEPS = (
    ("create ", 0.03), ("install uv", 0.06), ("install pip", 0.10), ("install torch", 0.15),
    ("install torch: install it with uv", 0.45), ("install the backend's dependencies", 0.60),
    ("import the backend once", 0.85),
)
_INSTALL_LINE = re.compile(r"^\[install\] (?P<step>[^:]+?)(?::| failed| \(with pip\)|$)")


@functools.lru_cache(maxsize=1)
def installer_module():
    """install.py of the backend this add-on runs (stdlib only; its main() is not run), loaded once:
    the panel asks for the environment's state on every redraw."""
    root = paths.repo_root()
    if root is None or not (root / "install.py").is_file():
        raise FileNotFoundError("this add-on has no backend/ folder with install.py: reinstall it from its zip")
    spec = importlib.util.spec_from_file_location("_sds_head_install", root / "install.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def state(venv: Path) -> str:
    """'missing', 'incomplete' (an install stopped half-way), 'outdated' (made for another
    version of the backend), 'broken' (its Python is gone) or 'ready'."""
    if not venv.exists():
        return "missing"
    installer = installer_module()
    stamp = venv / installer.COMPLETE_STAMP
    if not stamp.is_file():
        return "incomplete"
    if not _python_runs_here(venv):
        return "broken"
    return "ready" if installer.is_complete(venv) else "outdated"


def _python_runs_here(venv: Path) -> bool:
    """The environment's interpreter and the Python it was made from both still exist."""
    if not paths.venv_python(venv).is_file():
        return False
    try:
        config = (venv / "pyvenv.cfg").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    home = re.search(r"(?m)^home\s*=\s*(.+?)\s*$", config)
    return home is None or Path(home.group(1)).is_dir()


def remove(venv: Path) -> None:
    """Delete an environment this add-on made (a folder with pyvenv.cfg or its install log only)."""
    if not venv.exists():
        return
    if not (venv / "pyvenv.cfg").is_file() and any(p.name != "pyvenv.cfg" for p in venv.iterdir()):
        raise OSError(f"{venv} is not a Python environment: not removing it")
    shutil.rmtree(venv)


class StepRun:
    """One command run in the background: progress from its output lines, a log, Cancel.

    `ok` is None while it runs, then True or False; `message` is one line saying what happened
    (for a failure: which step failed and why), `log_path` holds the whole output.
    """

    name = "step"

    def __init__(self, command: list[str], log_path: Path, cwd: Path | None = None):
        self.command, self.log_path, self.cwd = [str(c) for c in command], log_path, cwd
        self.ok: bool | None = None
        self.cancelled = False
        self.message = ""
        self.step = "starting"
        self.progress = 0.0
        self.started = time.monotonic()
        self._proc: subprocess.Popen | None = None
        self._thread: threading.Thread | None = None
        self._lines: list[str] = []

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> StepRun:
        self._thread = threading.Thread(target=self._run, name=f"sds-head-{self.name}", daemon=True)
        self._thread.start()
        return self

    def join(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def cancel(self) -> None:
        self.cancelled = True
        proc = self._proc
        if proc is not None and proc.poll() is None:
            if os.name == "nt":   # the whole tree: pip and uv run as children of install.py
                subprocess.run(["taskkill", "/T", "/F", "/PID", str(proc.pid)], capture_output=True)
            else:
                bridge._kill_group(proc, signal.SIGKILL)

    def before(self) -> None:
        """Work done in the thread before the command starts."""

    def after(self, returncode: int) -> None:
        """Work done in the thread after the command ended (not after a cancel)."""

    def on_line(self, line: str) -> None:
        """One line of the command's output (stdout and stderr together)."""

    def failure(self, returncode: int) -> str:
        lines = [line for line in self._lines if line.strip()]
        return f"{lines[-1].strip() if lines else 'no output'} (exit code {returncode})"

    def _run(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "a", encoding="utf-8", errors="replace") as log:
            log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(self.command)}\n")
            try:
                self.before()
                env = dict(os.environ)
                env.pop("PYTHONHOME", None)     # Blender's own; the child is another Python
                env.pop("PYTHONPATH", None)
                self._proc = subprocess.Popen(
                    self.command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                    text=True, encoding="utf-8", errors="replace", env=env, cwd=str(self.cwd) if self.cwd else None,
                    bufsize=1, **bridge._own_group())
                if self.cancelled:
                    self.cancel()
                for line in self._proc.stdout:
                    log.write(line)
                    log.flush()
                    self._lines = (self._lines + [line])[-50:]
                    self.on_line(line.rstrip("\n"))
                returncode = self._proc.wait()
                if self.cancelled:
                    self.ok, self.message = False, f"{self.name} cancelled"
                elif returncode != 0:
                    self.ok, self.message = False, f"{self.name} failed: {self.failure(returncode)}"
                else:
                    self.after(returncode)
                    self.ok = True
            except OSError as exc:
                self.ok, self.message = False, f"{self.name} failed: cannot run {self.command[0]}: {exc.strerror or exc}"
            except Exception as exc:     # a bug: still an answer in the panel, never a hung "running"
                self.ok, self.message = False, f"{self.name} failed: {type(exc).__name__}: {exc}"
            log.write(f"=== {self.message or 'done'}\n")


class InstallRun(StepRun):
    """`<python> install.py --env VENV`; `fresh` deletes VENV first (repair, update)."""

    name = "backend install"

    def __init__(self, python: str, venv: Path, fresh: bool = False):
        installer = installer_module()
        super().__init__([python, installer.__file__, "--env", venv], venv.parent / "install.log",
                         cwd=Path(installer.__file__).parent)
        self.venv, self.fresh = venv, fresh

    def before(self) -> None:
        if self.fresh:
            self.step = "removing the old environment"
            remove(self.venv)

    def on_line(self, line: str) -> None:
        match = _INSTALL_LINE.match(line)
        if match is None:
            return
        step = match.group("step")
        for prefix, progress in INSTALL_STEPS:
            if step.startswith(prefix) and progress >= self.progress:
                self.step, self.progress = step, progress
        if line.startswith("[install] done"):
            self.step, self.progress = "done", 1.0

    def failure(self, returncode: int) -> str:
        failed = [line.strip()[len("[install] "):] for line in self._lines if " failed" in line and "[install]" in line]
        return failed[-1] if failed else super().failure(returncode)

    def _run(self) -> None:
        super()._run()
        if self.cancelled and state(self.venv) != "ready":
            try:
                remove(self.venv)      # nothing half-made is left behind
            except OSError:
                pass
        if self.ok:
            self.message = f"backend installed in {self.venv} ({time.monotonic() - self.started:.0f} s)"


class DownloadRun(StepRun):
    """`<python> -m sds_backend download-model --model M [--vae-model V]`, progress as JSON lines."""

    name = "model download"

    def __init__(self, python: str, model: str, tiny_vae: str, log_path: Path):
        command = [python, "-m", "sds_backend", "download-model"]
        command += ["--model", model] if model else []
        command += ["--vae-model", tiny_vae] if tiny_vae else []
        super().__init__(command, log_path, cwd=paths.repo_root())
        self.size_text = ""

    def on_line(self, line: str) -> None:
        try:
            report = json.loads(line)
        except json.JSONDecodeError:
            return
        if not isinstance(report, dict):
            return
        done, total = report.get("downloaded_bytes"), report.get("total_bytes")
        if isinstance(done, (int, float)):
            self.size_text = f"{done / 1e9:.2f} GB" + (f" of {total / 1e9:.2f} GB" if total else "")
            if total:
                self.progress = min(1.0, done / total)
        if isinstance(report.get("step"), str):
            self.step = report["step"]
        if isinstance(report.get("message"), str):
            self.message = report["message"]

    def failure(self, returncode: int) -> str:
        return self.message or super().failure(returncode)

    def _run(self) -> None:
        super()._run()
        if self.ok and not self.message:
            self.message = "model downloaded"
