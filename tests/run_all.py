#!/usr/bin/env python3
"""Run the whole test suite: backend tests in .venv/, add-on tests in .venv-bpy/ (stdlib only).

Each suite runs in its own environment because Blender's bpy wheel needs numpy < 2 and the
backend needs numpy 2. Each suite is cut in two parts and the four parts run at the same
time: every part keeps about one core busy (tests run torch on one thread, Blender and backend
subprocesses take turns), so on two cores the whole run takes about half the sum of the parts;
one process per suite left a core idle while the longer suite finished. Backend part one is
test_fit.py, test_bench.py, test_allocator.py and test_hostile_inputs.py, part two every other
file; add-on part one
is test_05_blender.py, test_08_ui.py and test_09_install.py (Blender started per test, real installs), part two every other file;
so a new test file always lands in a part, and each suite's two parts take about the same CPU
time. Each part's output is printed whole when it ends (`--serial` runs the suites whole, one
after the other, streaming). Exit status is non-zero when any part fails; a suite whose environment is missing
is reported as SKIPPED with the reason, never as passed. Extra arguments go to every pytest
run; with a `-m` among them each suite runs whole, as one part.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BACKEND, ADDON = ROOT / "tests" / "backend", ROOT / "tests" / "addon"
# about half of each suite's CPU time (measured per test): the oracle fits and the bench's own,
# and the add-on files with the most Blender starts
BACKEND_PART_ONE = ("test_fit.py", "test_bench.py", "test_allocator.py", "test_hostile_inputs.py")
ADDON_PART_ONE = ("test_05_blender.py", "test_08_ui.py", "test_09_install.py")


def halves(folder: Path, part_one: tuple[str, ...]) -> list[list[str]]:
    """pytest arguments of the two parts: the files of `part_one`, and the folder without them."""
    return [[str(folder / name) for name in part_one],
            [str(folder), *(arg for name in part_one for arg in ("--ignore", str(folder / name)))]]


# suite -> (environment, folder, parts: the pytest arguments that select each part)
SUITES = {
    "backend": (ROOT / ".venv", BACKEND, halves(BACKEND, BACKEND_PART_ONE)),
    "add-on": (ROOT / ".venv-bpy", ADDON, halves(ADDON, ADDON_PART_ONE)),
}


def main(argv: list[str]) -> int:
    serial = "--serial" in argv
    pytest_args = [arg for arg in argv if arg != "--serial"]
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONDONTWRITEBYTECODE="1")
    failed, skipped, running = [], [], []
    started = time.monotonic()
    whole = serial or any(arg.startswith("-m") for arg in pytest_args)   # -m, -mEXPR; not --maxfail
    for name, (venv, folder, parts) in SUITES.items():
        python = venv / "bin" / "python"
        if not python.exists():
            reason = f"{python.relative_to(ROOT)} missing; run `python3 install.py --dev`"
            print(f"\n=== {name} tests: SKIPPED ({reason})", flush=True)
            (failed if name == "backend" else skipped).append(f"{name} ({reason})")
            continue
        for index, selection in enumerate([[str(folder)]] if whole else parts, start=1):
            label = name if whole else f"{name} part {index}/{len(parts)}"
            shown = " ".join(str(Path(arg).relative_to(ROOT)) if arg.startswith(str(ROOT)) else arg
                             for arg in selection)
            title = f"{label} tests ({python.relative_to(ROOT)} -m pytest {shown})"
            command = [str(python), "-m", "pytest", *selection, *pytest_args]
            if serial:
                print(f"\n=== {title}", flush=True)
                if subprocess.run(command, cwd=ROOT, env=env).returncode != 0:
                    failed.append(label)
                continue
            log = tempfile.TemporaryFile("w+", encoding="utf-8", errors="replace")
            running.append((label, title, log, subprocess.Popen(command, cwd=ROOT, env=env, stdout=log,
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
