"""Layer 4: under a real `blender -b` (Debian's Blender 3.4 here): install, headless failures, quit.

Each test runs Blender with its own user config/scripts folders, so the machine's Blender
preferences are never touched.
"""
from __future__ import annotations

import os
import re
import subprocess
import textwrap
from pathlib import Path

import pytest

from conftest import BLENDER, ROOT, SERVE_PYTHON, needs_backend, needs_blender, pid_gone, wait_until

pytestmark = [needs_blender, pytest.mark.blender]
HEADLESS = ROOT / "blender_addon" / "headless.py"


@pytest.fixture
def blender_env(tmp_path):
    env = dict(os.environ, BLENDER_USER_CONFIG=str(tmp_path / "config"), BLENDER_USER_SCRIPTS=str(tmp_path / "scripts"))
    (tmp_path / "config").mkdir()
    (tmp_path / "scripts").mkdir()
    return env


def blender(args, env, timeout=120, factory=True):
    command = [BLENDER, "-b"] + (["--factory-startup"] if factory else []) + ["--python-exit-code", "1"] + args
    return subprocess.run([str(c) for c in command], env=env, capture_output=True, text=True, timeout=timeout)


def blender_script(tmp_path, code: str, env, factory=True, timeout=120):
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(code))
    return blender(["-P", script], env, timeout=timeout, factory=factory)


def headless(args, env, blend=None, timeout=180, factory=True):
    pre = [blend] if blend else []
    return blender(pre + ["-P", HEADLESS, "--"] + args, env, timeout=timeout, factory=factory)


def _out_args(tmp_path, synthetic_bundle):
    return ["--out", tmp_path / "out", "--bundle", synthetic_bundle]


@pytest.mark.parametrize("mode", ["link", "copy"])
def test_install_into_blender_enables_the_addon_and_headless_uses_it(tmp_path, blender_env, synthetic_bundle, mode):
    """Installed, the add-on is enabled with the backend path saved. Then headless: a link install
    is this very folder, so headless uses it and its saved preferences; a copy is another SDS
    Head, so headless disables it for the run and uses the repository's code."""
    installer = ROOT / "blender_addon" / "install_into_blender.py"
    result = blender(["-P", installer, "--", "--addon-dir", ROOT / "blender_addon", "--backend-python",
                      "/opt/sds/.venv/bin/python", "--mode", mode], blender_env, factory=False)
    assert result.returncode == 0, result.stdout + result.stderr
    installed = tmp_path / "scripts" / "addons" / "sds_head"
    if mode == "link":
        assert installed.is_symlink() and installed.resolve() == ROOT / "blender_addon"
        expected_protocol = ROOT / "sds_backend" / "protocol.py"
    else:
        expected_protocol = installed / "backend" / "sds_backend" / "protocol.py"
        assert expected_protocol.read_bytes() == (ROOT / "sds_backend" / "protocol.py").read_bytes()
    # a fresh Blender with the saved preferences: enabled, path remembered, the right protocol file loaded
    check = blender_script(tmp_path, """
        import bpy, sys
        addon = bpy.context.preferences.addons["sds_head"]
        from sds_head import bridge
        print("PYTHON", addon.preferences.backend_python)
        print("PROTOCOL", bridge.protocol.__file__)
        print("PANEL", hasattr(bpy.types, "SDSHEAD_PT_main"))
    """, blender_env, factory=False)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "PYTHON /opt/sds/.venv/bin/python" in check.stdout
    assert f"PROTOCOL {expected_protocol}" in check.stdout
    assert "PANEL True" in check.stdout
    # the copy case stops at the prompt check (the empty-prompt exit code): no backend starts
    prompt = "a head" if mode == "link" else " "
    result = headless(["--prompt", prompt] + _out_args(tmp_path, synthetic_bundle), blender_env, factory=False)
    assert result.returncode == 3, result.stdout + result.stderr
    if mode == "link":
        assert "disabling" not in result.stdout
        assert "Backend Python not found: /opt/sds/.venv/bin/python" in result.stderr   # the saved preference
    else:
        assert "disabling the installed add-on sds_head" in result.stdout
        assert "error: Prompt is empty" in result.stderr


def test_install_py_installs_into_blender_keeping_user_preferences(tmp_path, blender_env, monkeypatch):
    """install.py's install_addon(): the add-on is enabled, the backend path saved, other prefs kept."""
    import importlib.util

    for key in ("BLENDER_USER_CONFIG", "BLENDER_USER_SCRIPTS"):
        monkeypatch.setenv(key, blender_env[key])
    before = blender_script(tmp_path, """
        import bpy
        bpy.context.preferences.view.ui_scale = 1.25
        bpy.ops.wm.save_userpref()
    """, blender_env, factory=False)
    assert before.returncode == 0, before.stderr
    spec = importlib.util.spec_from_file_location("sds_install", ROOT / "install.py")
    install = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(install)
    install.install_addon(BLENDER, Path("/opt/sds/.venv/bin/python"))
    check = blender_script(tmp_path, """
        import bpy
        print("PYTHON", bpy.context.preferences.addons["sds_head"].preferences.backend_python)
        print("SCALE", bpy.context.preferences.view.ui_scale)
    """, blender_env, factory=False)
    assert "PYTHON /opt/sds/.venv/bin/python" in check.stdout, check.stdout + check.stderr
    assert "SCALE 1.25" in check.stdout


def test_headless_mesh_without_shape_keys_exits_3(tmp_path, blender_env, synthetic_bundle):
    blend = tmp_path / "cube.blend"
    made = blender_script(tmp_path, f"""
        import bpy
        bpy.ops.wm.save_as_mainfile(filepath={str(blend)!r})
    """, blender_env)
    assert made.returncode == 0, made.stderr
    result = headless(["--prompt", "a head"] + _out_args(tmp_path, synthetic_bundle), blender_env, blend=blend)
    assert result.returncode == 3
    assert "error: Active mesh 'Cube' has no shape keys" in result.stderr


@pytest.mark.parametrize("mode, message", [("crash", "exit code 3")])   # more in test_04_headless
def test_headless_backend_failures_exit_4(tmp_path, blender_env, synthetic_bundle, fake_backend, mode, message):
    python = fake_backend(mode)
    result = headless(["--prompt", "a head", "--backend-python", python] + _out_args(tmp_path, synthetic_bundle),
                      dict(blender_env, SDS_FAKE_MODE=mode))
    assert result.returncode == 4, result.stdout + result.stderr
    assert message in result.stderr
    assert not (tmp_path / "out" / "weights.json").exists()


def test_headless_sigkilled_backend_exits_4(tmp_path, blender_env, synthetic_bundle, fake_backend):
    python = fake_backend("slow")
    command = [BLENDER, "-b", "--factory-startup", "--python-exit-code", "1", "-P", str(HEADLESS), "--",
               "--prompt", "a head", "--backend-python", python, "--out", str(tmp_path / "out"),
               "--bundle", str(synthetic_bundle)]
    proc = subprocess.Popen(command, env=dict(blender_env, SDS_FAKE_MODE="slow"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        backend_pid = None
        for line in proc.stdout:
            found = re.search(r"backend pid (\d+)", line)
            if found:
                backend_pid = int(found.group(1))
            if backend_pid and re.search(r"shape \d+/", line):
                break
        assert backend_pid, "headless never reported the backend pid"
        os.kill(backend_pid, 9)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 4, err
    assert "killed by signal SIGKILL" in err


@pytest.mark.parametrize("mode", ["slow", "stubborn", pytest.param("real", marks=needs_backend)])
def test_quitting_blender_mid_fit_ends_the_backend(tmp_path, blender_env, synthetic_bundle, fake_backend, mode,
                                                   request):
    """The script starts a fit and returns; Blender quits (-b) while the backend runs: the bridge's atexit
    hook ends it (the stubborn fake ignores stdin and SIGTERM, so only the hook's SIGKILL ends it)."""
    if mode == "real":
        python, model, steps = str(SERVE_PYTHON), str(request.getfixturevalue("tiny_sd_dir")), 100000
    else:
        python, model, steps = fake_backend(mode), "", 200
    result = blender_script(tmp_path, f"""
        import sys, time
        sys.path.insert(0, {str(ROOT)!r})
        import bpy, blender_addon
        blender_addon.register()
        from blender_addon import bridge, controller, scene
        obj = scene.build_head(scene.load_bundle({str(synthetic_bundle)!r}))
        ctl = controller.CONTROLLER
        inputs = controller.FitInputs(prompt="x", model={model!r}, config=dict(shape_steps={steps}, render_size=64, event_every=1))
        ctl.start_fit(obj, inputs, bridge.BackendSettings(python={python!r}, device="cpu"))
        deadline = time.monotonic() + 120
        while ctl.status.updates_applied < 2 and ctl.busy and time.monotonic() < deadline:
            ctl.tick(wait=0.2)
        print("STATE", ctl.status.state, ctl.status.last_error, flush=True)
        print("BACKEND_PID", ctl.backend.pid, flush=True)
    """, dict(blender_env, SDS_FAKE_MODE=mode), timeout=180)
    assert result.returncode == 0, result.stderr
    assert "STATE running" in result.stdout, result.stdout[-2000:]
    pid = int(re.search(r"BACKEND_PID (\d+)", result.stdout).group(1))
    assert wait_until(lambda: pid_gone(pid), 5), "backend outlived Blender"


def test_headless_ctrl_c_stops_the_fit_and_writes_the_outputs_marked_stopped(tmp_path, blender_env, synthetic_bundle,
                                                                              fake_backend):
    """SIGINT under a real `blender -b`: the fit stops after its iteration, the outputs are written and
    marked stopped, and Blender exits 130 without a traceback."""
    import json
    import signal

    python = fake_backend("slow")
    out = tmp_path / "out"
    command = [BLENDER, "-b", "--factory-startup", "--python-exit-code", "1", "-P", str(HEADLESS), "--",
               "--prompt", "a head", "--backend-python", python, "--out", str(out), "--bundle", str(synthetic_bundle)]
    proc = subprocess.Popen([str(c) for c in command], env=dict(blender_env, SDS_FAKE_MODE="slow"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stdout:
            if re.search(r"shape \d+/", line):
                break
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stdout + stderr
    assert "SIGINT: stopping after the current iteration" in stdout and "Traceback" not in stderr, stderr
    record = json.loads((out / "fit.json").read_text())
    assert record["stopped"] is True and record["state"] == "stopped"
    assert (out / "weights.json").is_file()
    assert not [p for p in out.rglob("*") if ".tmp" in p.name or "staging" in p.name]


def test_headless_under_blender_refuses_another_runs_outputs_and_a_fifo_bundle(tmp_path, blender_env):
    out = tmp_path / "out"
    out.mkdir()
    (out / "head.glb").write_bytes(b"an earlier head")
    result = headless(["--prompt", "a head", "--out", out], blender_env)
    assert result.returncode == 5 and "already holds the outputs of another run (head.glb)" in result.stderr
    assert (out / "head.glb").read_bytes() == b"an earlier head"
    fifo = tmp_path / "head.npz"
    os.mkfifo(fifo)
    result = headless(["--prompt", "a head", "--out", tmp_path / "new", "--bundle", fifo], blender_env)
    assert result.returncode == 3 and "is a FIFO (named pipe), not a regular file" in result.stderr, result.stderr
    assert not (tmp_path / "new").exists()

