"""Layer 2: bridge.py (no bpy) against a misbehaving fake backend: every failure is caught and named.

The fake backend (fake_backend.py) is used ONLY for these failure modes; the success path of the
bridge is tested against the real backend in test_04_fit.py.
"""
from __future__ import annotations

import os
import re
import time

import pytest

from conftest import pid_gone, processes_in_group, wait_until

from blender_addon import bridge


def _backend(python: str, **settings) -> bridge.Backend:
    backend = bridge.Backend(bridge.BackendSettings(python=python, device="cpu", **settings))
    backend.start()
    return backend


def _request(n: int = 3) -> bridge.FitRequest:
    return bridge.FitRequest(prompt="a test head", initial_weights=[0.0] * n, config={"shape_steps": 10})


def _run_until_finished(backend: bridge.Backend, timeout: float = 10.0) -> bridge.JobUpdate:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        update = backend.wait(0.1)
        if update is not None and update.finished:
            return update
    raise AssertionError(f"job did not finish within {timeout} s")


def test_garbage_line_fails_the_job_and_ends_the_process(fake_backend):
    backend = _backend(fake_backend("garbage"))
    backend.submit(_request())
    update = _run_until_finished(backend)
    assert update.failure.kind == "bad_message"
    assert "Backend answered garbage" in str(update.failure)
    assert "this is not a protocol line" in str(update.failure)
    assert "fake backend (garbage) starting" in update.failure.stderr_tail
    assert not backend.alive and pid_gone(backend.pid)
    assert not backend.busy


def test_stdout_chatter_before_hello_is_reported_as_garbage(fake_backend):
    backend = _backend(fake_backend("spam_stdout"))
    backend.submit(_request())
    update = _run_until_finished(backend)
    assert update.failure.kind == "bad_message"
    assert "Loading pipeline components" in str(update.failure)


def test_crash_reports_exit_code_and_stderr_tail(fake_backend):
    backend = _backend(fake_backend("crash"))
    backend.submit(_request())
    update = _run_until_finished(backend)
    assert update.failure.kind == "backend_died"
    assert "ended during the fit (exit code 3)" in update.failure.message
    assert "CUDA out of memory (fake)" in update.failure.stderr_tail
    assert "CUDA out of memory (fake)" in str(update.failure)


def test_hung_backend_times_out(fake_backend):
    backend = _backend(fake_backend("hang"), reply_timeout=1.0)
    backend.submit(_request())
    started = time.monotonic()
    update = _run_until_finished(backend)
    assert "no message for 1 s" in update.failure.message
    assert 1.0 <= time.monotonic() - started < 5.0
    assert wait_until(lambda: pid_gone(backend.pid), 5)


def test_silent_backend_fails_its_hello_timeout(fake_backend):
    backend = _backend(fake_backend("nohello"), hello_timeout=1.0)
    backend.submit(_request())
    update = _run_until_finished(backend)
    assert "no 'hello' within 1 s" in update.failure.message
    assert wait_until(lambda: pid_gone(backend.pid), 5)


def test_protocol_version_mismatch_is_named(fake_backend):
    backend = _backend(fake_backend("badproto"))
    backend.submit(_request())
    update = _run_until_finished(backend)
    assert "protocol 99" in update.failure.message


def test_poll_keeps_only_the_newest_progress(fake_backend):
    backend = _backend(fake_backend("slow"))
    backend.submit(_request())
    time.sleep(0.8)  # ~15 progress events queue up
    update = backend.poll()
    assert update.progress is not None and update.superseded >= 5
    newest = update.progress["iteration"]
    assert update.progress["weights"] == pytest.approx([0.01 * newest] * 3)
    assert newest == update.messages  # nothing was lost, only folded
    backend.close()


def test_stop_ends_the_job_with_done_stopped(fake_backend):
    backend = _backend(fake_backend("slow"))
    backend.submit(_request())
    while (u := backend.wait(0.2)) is None or u.progress is None:
        pass
    backend.stop_job()
    update = _run_until_finished(backend, timeout=5)
    assert update.done is not None and update.done["stopped"] is True
    assert backend.alive  # a stopped job leaves the backend ready for the next fit
    backend.close()
    assert pid_gone(backend.pid)


def test_close_kills_a_stubborn_backend_and_its_children(fake_backend):
    backend = _backend(fake_backend("stubborn"))
    backend.submit(_request())
    assert wait_until(lambda: "child pid" in backend.stderr_tail(), 10)
    child = int(re.search(r"child pid (\d+)", backend.stderr_tail()).group(1))
    pid = backend.pid
    assert processes_in_group(pid)  # its own process group
    started = time.monotonic()
    backend.close(timeout=0.5)
    assert time.monotonic() - started < 5
    assert wait_until(lambda: pid_gone(pid) and pid_gone(child), 5), "backend or its child survived close()"
    assert wait_until(lambda: processes_in_group(pid) == [], 2)


def test_missing_python_is_a_config_error():
    with pytest.raises(bridge.ConfigError, match="Backend Python not found: /nonexistent/python"):
        _backend("/nonexistent/python")
    with pytest.raises(bridge.ConfigError, match="device must be one of"):
        bridge.check_settings(bridge.BackendSettings(python="/bin/sh", device="tpu"))


def test_close_all_ends_every_live_backend(fake_backend):
    backends = [_backend(fake_backend("slow")) for _ in range(2)]
    for b in backends:
        b.submit(_request())
    bridge.close_all()
    assert all(wait_until(lambda: pid_gone(b.pid), 5) for b in backends)
    assert os.environ.get("SDS_FAKE_MODE") == "slow"


def test_cancelled_doctor_leaves_no_process(fake_backend):
    """Check Backend runs the doctor, which loads the model for minutes on a first download: disabling
    the add-on (or quitting) ends it and whatever it started."""
    doctor = bridge.DoctorRun(fake_backend("nohello"), None, "cpu")   # sleeps like a long model load
    doctor.start()
    assert wait_until(lambda: doctor._proc is not None and processes_in_group(doctor._proc.pid), 10)
    pid = doctor._proc.pid
    bridge.close_all()                  # what unregister and Blender's exit run
    doctor.join()
    assert wait_until(lambda: processes_in_group(pid) == [], 5), processes_in_group(pid)
    assert doctor.ok is False and "cancelled" in doctor.text
