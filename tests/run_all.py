#!/usr/bin/env python3
"""Run the whole test suite: backend tests in .venv/, add-on tests in .venv-bpy/ (stdlib only).

Each suite runs in its own environment because Blender's bpy wheel needs numpy < 2 and the
backend needs numpy 2. The two suites run at the same time: the backend suite is mostly one
busy core, the add-on suite mostly waits on Blender and backend subprocesses, so together they
take little longer than the add-on suite alone. Each suite's output is printed whole when it
ends (`--serial` runs them one after the other, streaming). Exit status is non-zero when any
suite fails; a suite whose environment is missing is reported as SKIPPED with the reason,
never as passed. Extra arguments go to both pytest runs.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SUITES = [
    ("backend", ROOT / ".venv", ROOT / "tests" / "backend"),
    ("add-on", ROOT / ".venv-bpy", ROOT / "tests" / "addon"),
]


def main(argv: list[str]) -> int:
    serial = "--serial" in argv
    pytest_args = [arg for arg in argv if arg != "--serial"]
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONDONTWRITEBYTECODE="1")
    failed, skipped, running = [], [], []
    started = time.monotonic()
    for name, venv, folder in SUITES:
        python = venv / "bin" / "python"
        if not python.exists():
            reason = f"{python.relative_to(ROOT)} missing; run `python3 install.py --dev`"
            print(f"\n=== {name} tests: SKIPPED ({reason})", flush=True)
            (failed if name == "backend" else skipped).append(f"{name} ({reason})")
            continue
        title = f"{name} tests ({python.relative_to(ROOT)} -m pytest {folder.relative_to(ROOT)})"
        command = [str(python), "-m", "pytest", str(folder), *pytest_args]
        if serial:
            print(f"\n=== {title}", flush=True)
            if subprocess.run(command, cwd=ROOT, env=env).returncode != 0:
                failed.append(name)
            continue
        log = tempfile.TemporaryFile("w+", encoding="utf-8", errors="replace")
        running.append((name, title, log, subprocess.Popen(command, cwd=ROOT, env=env, stdout=log,
                                                           stderr=subprocess.STDOUT)))
        print(f"=== {title}: started", flush=True)
    while running:
        for entry in list(running):
            name, title, log, process = entry
            if process.poll() is None:
                continue
            running.remove(entry)
            log.seek(0)
            print(f"\n=== {title}: ended after {time.monotonic() - started:.0f} s", flush=True)
            sys.stdout.write(log.read())
            sys.stdout.flush()
            log.close()
            if process.returncode != 0:
                failed.append(name)
        time.sleep(0.2)
    print(f"\n=== {'FAILED: ' + ', '.join(failed) if failed else 'every suite that ran passed'} "
          f"({time.monotonic() - started:.0f} s)", flush=True)
    if skipped:
        print("=== NOT RUN: " + "; ".join(skipped), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
