"""The UI path for real: Blender 3.4 in a window (Xvfb), where bpy.app.timers fire. The panel's
Fit operator starts the real backend, the timer applies updates live, Stop ends the fit; the
same script makes docs/panel.png."""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess

import pytest

from conftest import BLENDER, HERE, SERVE_PYTHON, needs_backend, needs_blender

pytestmark = [needs_blender, needs_backend, pytest.mark.blender, pytest.mark.slow,
              pytest.mark.skipif(shutil.which("xvfb-run") is None, reason="xvfb-run is not installed")]


def test_fit_runs_from_the_panel_with_ui_timers(tmp_path, tiny_sd_dir):
    shot = tmp_path / "panel.png"
    env = dict(os.environ, BLENDER_USER_CONFIG=str(tmp_path / "config"), BLENDER_USER_SCRIPTS=str(tmp_path / "scripts"))
    # --tabs 0: the panel shows in the sidebar's first tab, so no simulated events are needed
    command = ["xvfb-run", "-a", "-s", "-screen 0 1280x720x24", BLENDER, "--factory-startup",
               "-P", str(HERE / "screenshot_panel.py"), "--", "--out", str(shot), "--model", str(tiny_sd_dir),
               "--python", str(SERVE_PYTHON), "--steps", "8", "--at", "0.3", "--tabs", "0"]
    # xvfb-run starts Blender as its child: on a timeout the whole group must go, or a Blender (and
    # its backend) left behind would slow every later test
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        pytest.fail("Blender under Xvfb did not finish within 300 s:\n" + (stdout + stderr)[-3000:])
    log = stdout + stderr
    assert process.returncode == 0, log[-3000:]
    assert "Traceback" not in log, log[-3000:]                     # e.g. in the panel's draw()
    assert "[screenshot] fit: {'FINISHED'}" in log
    assert shot.is_file() and shot.stat().st_size > 50_000          # a real window, not a blank image
    final = re.search(r"\[screenshot\] final state: (\w+) updates (\d+) textures (\d+)", log)
    assert final and final.group(1) in ("stopped", "done"), log[-3000:]
    assert int(final.group(2)) >= 1 and int(final.group(3)) >= 1, log[-3000:]   # the head changed live
