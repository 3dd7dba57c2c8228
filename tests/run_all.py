#!/usr/bin/env python3
"""Run the whole test suite: backend tests in .venv/, add-on tests in .venv-bpy/ (stdlib only).

Each suite runs in its own environment because Blender's bpy wheel needs numpy < 2 and the
backend needs numpy 2. Exit status is non-zero when any suite fails; a suite whose
environment is missing is reported as SKIPPED with the reason, never as passed.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SUITES = [
    ("backend", ROOT / ".venv", ROOT / "tests" / "backend"),
    ("add-on", ROOT / ".venv-bpy", ROOT / "tests" / "addon"),
]


def main(argv: list[str]) -> int:
    failed, skipped = [], []
    for name, venv, folder in SUITES:
        python = venv / "bin" / "python"
        if not python.exists():
            reason = f"{python.relative_to(ROOT)} missing; run `python3 install.py --dev`"
            print(f"\n=== {name} tests: SKIPPED ({reason})", flush=True)
            (failed if name == "backend" else skipped).append(f"{name} ({reason})")
            continue
        print(f"\n=== {name} tests ({python.relative_to(ROOT)} -m pytest {folder.relative_to(ROOT)})", flush=True)
        env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONDONTWRITEBYTECODE="1")
        result = subprocess.run([str(python), "-m", "pytest", str(folder), *argv], cwd=ROOT, env=env)
        if result.returncode != 0:
            failed.append(name)
    print("\n=== " + ("FAILED: " + ", ".join(failed) if failed else "every suite that ran passed"), flush=True)
    if skipped:
        print("=== NOT RUN: " + "; ".join(skipped), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
