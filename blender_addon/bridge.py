"""Client for the backend process (`<backend python> -m sds_backend serve`). No bpy here.

One `Backend` owns one subprocess, two reader threads and a queue:

    main thread                          reader threads
      submit(FitRequest) --stdin-->        stdout: decode + validate each line -> queue
      poll() / wait()    <--queue---       stderr: keep the last lines (shown on failures)

`poll()` never blocks: it drains the queue and folds everything that arrived since the last
call into one `JobUpdate` holding only the newest progress and texture, so the caller applies
one update per tick however far behind it is. `wait(timeout)` is the same with a blocking
first read, for `blender -b` where timers do not run.

A job ends with exactly one of: `done` (stopped=True for a user stop) or a `BackendFailure`
(the backend's own `error` message, or one made here when the process dies, says nothing for
too long, or writes a line that is not a protocol message). On a failure that the backend
cannot recover from, the process is ended and a later fit starts a new one.

`close()` asks the backend to stop and shut down, then terminates and finally kills its whole
process group; an atexit hook closes every live backend when Blender (or Python) quits, and on
Linux the child also gets SIGTERM if Blender dies without running it.
"""
from __future__ import annotations

import atexit
import collections
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import uuid
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable

from . import paths

protocol = paths.shared("protocol")

DEVICES = ("auto", "cuda", "mps", "cpu")
STDERR_LINES_KEPT = 200
STDERR_LINES_SHOWN = 12
EXIT_GRACE = 1.0  # seconds between the process's exit and its stdout's EOF before we stop waiting for it


class ConfigError(ValueError):
    """A setting the user must fix before a backend can start (path, device, ...)."""


class BackendFailure(RuntimeError):
    """A job or backend that failed. `kind` is one of protocol.ERROR_KINDS."""

    def __init__(self, kind: str, message: str, stderr_tail: str = "", traceback: str | None = None,
                 recoverable: bool = False):
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.stderr_tail = stderr_tail
        self.traceback = traceback
        self.recoverable = recoverable

    def __str__(self) -> str:
        if not self.stderr_tail:
            return self.message
        return f"{self.message}\nLast lines of the backend's stderr:\n{self.stderr_tail}"


@dataclass(frozen=True)
class BackendSettings:
    """How to start a backend."""

    python: str
    device: str = "auto"
    hello_timeout: float = 120.0   # seconds from start to the `hello` line
    reply_timeout: float = 300.0   # a running job that sends nothing for this long is hung
    stop_timeout: float = 30.0     # a stopped job must end within this many seconds
    env: dict[str, str] | None = None
    cwd: str | None = None
    echo_stderr: bool = False      # copy the backend's stderr to ours (headless --verbose)


def check_settings(settings: BackendSettings) -> None:
    """Raise ConfigError naming the setting that cannot work; nothing is started."""
    if settings.device not in DEVICES:
        raise ConfigError(f"device must be one of {', '.join(DEVICES)}, got {settings.device!r}")
    python = settings.python.strip()
    if not python:
        raise ConfigError("no backend yet: click Install Backend in Preferences > Add-ons > SDS Head, or set "
                          "Backend Python there to an environment of your own (install.py creates .venv/bin/python)")
    path = os.path.expanduser(python)
    if not os.path.isfile(path):
        raise ConfigError(f"Backend Python not found: {path} (set it in Preferences > Add-ons > SDS Head; "
                          "install.py creates .venv/bin/python)")
    if not os.access(path, os.X_OK):
        raise ConfigError(f"Backend Python is not executable: {path}")
    for name, value in (("hello_timeout", settings.hello_timeout), ("reply_timeout", settings.reply_timeout),
                        ("stop_timeout", settings.stop_timeout)):
        if not value > 0:
            raise ConfigError(f"{name} must be > 0 seconds, got {value!r}")


@dataclass
class FitRequest:
    """The `fit` message's fields, checked by protocol.encode before anything is sent."""

    prompt: str
    negative_prompt: str = ""
    model: str | None = None
    vae_model: str | None = None                      # the tiny VAE of config vae "tiny"
    bundle: str | None = None
    initial_weights: list[float] | None = None
    keys: list[str] | None = None                     # the components to move; the others keep their values
    bounds: dict[str, list[float]] | None = None      # component -> [low, high] (a rig's slider range)
    config: dict[str, Any] = field(default_factory=dict)
    job_dir: str | None = None
    # the add-on exports from the scene itself: the backend only writes what it needs to apply
    outputs: list[str] = field(default_factory=lambda: ["weights", "texture"])


@dataclass
class JobUpdate:
    """What arrived for one job since the previous poll; only the newest progress/texture is kept."""

    job_id: str
    progress: dict | None = None
    texture: dict | None = None
    texture_data: Any = None   # what the texture_loader made of the newest texture, on the reader thread
    done: dict | None = None
    failure: BackendFailure | None = None
    messages: int = 0       # protocol messages folded into this update
    superseded: int = 0     # progress/texture messages dropped because a newer one came in the same poll

    @property
    def finished(self) -> bool:
        return self.done is not None or self.failure is not None

    @property
    def empty(self) -> bool:
        return self.messages == 0 and not self.finished


_live: "weakref.WeakSet[Backend]" = weakref.WeakSet()
_live_doctors: "weakref.WeakSet[DoctorRun]" = weakref.WeakSet()


def close_all(timeout: float = 3.0) -> None:
    """End every backend and doctor run this process started (add-on unregister, Blender quit)."""
    for doctor in list(_live_doctors):
        doctor.cancel()
    for backend in list(_live):
        backend.close(timeout=timeout)


atexit.register(close_all)


def _linux_parent_death_signal():
    """preexec_fn: SIGTERM the child when the thread that started it dies (Linux only)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        prctl = ctypes.CDLL("libc.so.6", use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    PR_SET_PDEATHSIG = 1

    def set_signal() -> None:  # runs in the child between fork and exec: C call only
        prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)

    return set_signal


def _own_group() -> dict[str, Any]:
    """Popen options for a child that can be ended with its own children (its own process group)
    and that ends when Blender does, even when Blender dies without cleaning up (Linux)."""
    if os.name == "nt":
        return {"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP}  # type: ignore[attr-defined]
    return {"start_new_session": True, "preexec_fn": _linux_parent_death_signal()}


def _kill_group(proc: subprocess.Popen, sig: int) -> None:
    if os.name == "nt":
        if proc.poll() is None:
            proc.kill() if sig == getattr(signal, "SIGKILL", None) else proc.terminate()
        return
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _describe_exit(returncode: int | None) -> str:
    if returncode is None:
        return "still running"
    if returncode < 0:
        try:
            return f"killed by signal {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit code {returncode}"


class Backend:
    """One backend subprocess. All methods run on the caller's (main) thread."""

    def __init__(self, settings: BackendSettings, texture_loader: Callable[[str], Any] | None = None):
        """texture_loader(path) runs on the reader thread for each texture event; whatever it returns
        (e.g. decoded pixels, or None to leave decoding to the main thread) arrives as
        JobUpdate.texture_data, so the main thread only copies pixels."""
        self.settings = settings
        self.texture_loader = texture_loader
        self.hello: dict | None = None
        self.job_id: str | None = None
        self.failure: BackendFailure | None = None   # why the process ended, when it ended badly
        self._proc: subprocess.Popen | None = None
        self._queue: "queue.Queue[tuple[str, Any]]" = queue.Queue()
        self._stderr: collections.deque[str] = collections.deque(maxlen=STDERR_LINES_KEPT)
        self._stderr_lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._started_at = 0.0
        self._last_message_at = 0.0
        self._stop_sent_at: float | None = None
        self._exited_at: float | None = None
        self._closed = False

    # ------------------------------------------------------------------ state
    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    @property
    def alive(self) -> bool:
        return self._proc is not None and not self._closed and self._proc.poll() is None

    @property
    def busy(self) -> bool:
        return self.job_id is not None

    @property
    def stopping(self) -> bool:
        return self.job_id is not None and self._stop_sent_at is not None

    def describe(self) -> str:
        if self._proc is None:
            return "not started"
        if not self.alive:
            return f"ended ({_describe_exit(self._proc.poll())})"
        if self.hello is None:
            return f"starting (pid {self.pid})"
        return f"pid {self.pid}, {self.hello['device']}"

    def stderr_tail(self, lines: int = STDERR_LINES_SHOWN) -> str:
        with self._stderr_lock:
            return "\n".join(list(self._stderr)[-lines:])

    # ------------------------------------------------------------------ start
    def start(self) -> None:
        """Spawn the process and its reader threads; returns at once (hello is checked by poll)."""
        assert self._proc is None, "a Backend starts once; make a new one to restart"
        check_settings(self.settings)
        command = [os.path.expanduser(self.settings.python.strip()), "-u", "-m", "sds_backend", "serve",
                   "--device", self.settings.device]
        env = dict(os.environ)
        env.pop("PYTHONHOME", None)        # Blender's own Python must not leak into the backend's
        env.update(PYTHONUNBUFFERED="1", PYTHONIOENCODING="utf-8")
        env.update(self.settings.env or {})
        cwd = self.settings.cwd or (str(paths.repo_root()) if paths.repo_root() else None)
        try:
            self._proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                          stderr=subprocess.PIPE, cwd=cwd, env=env, **_own_group())
        except OSError as exc:
            raise ConfigError(f"Backend Python cannot be started ({command[0]}): {exc.strerror or exc}") from None
        self._started_at = self._last_message_at = time.monotonic()
        _live.add(self)
        for target, stream, name in ((self._read_stdout, self._proc.stdout, "stdout"),
                                     (self._read_stderr, self._proc.stderr, "stderr")):
            thread = threading.Thread(target=target, args=(stream,), name=f"sds-head-backend-{name}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def _read_stdout(self, stream) -> None:
        limit = protocol.MAX_LINE_BYTES
        try:
            while True:
                raw = stream.readline(limit + 2)
                if not raw:
                    break
                if len(raw) > limit and not raw.endswith(b"\n"):
                    self._queue.put(("garbage", (f"line longer than {limit} bytes", raw[:120])))
                    break
                line = raw.rstrip(b"\r\n")
                if not line.strip():
                    continue
                try:
                    message = protocol.decode(line, protocol.BACKEND_TYPES)
                except protocol.ProtocolError as exc:
                    self._queue.put(("garbage", (str(exc), line[:120])))
                    continue
                decoded = None
                if message["type"] == "texture" and self.texture_loader is not None:
                    try:
                        decoded = self.texture_loader(message["path"])
                    except Exception:  # the main thread decodes it again and reports what is wrong
                        decoded = None
                self._queue.put(("message", (message, decoded)))
        except (OSError, ValueError):
            pass
        finally:
            self._queue.put(("eof", None))

    def _read_stderr(self, stream) -> None:
        try:
            while True:
                raw = stream.readline(8192)
                if not raw:
                    break
                # progress bars redraw with \r: keep the last state of the line
                text = raw.decode("utf-8", errors="replace").rstrip("\r\n").rsplit("\r", 1)[-1]
                with self._stderr_lock:
                    self._stderr.append(text)
                if self.settings.echo_stderr:
                    print(f"[backend] {text}", file=sys.stderr, flush=True)
        except (OSError, ValueError):
            pass

    # ------------------------------------------------------------------ send
    def _send(self, message_type: str, **fields: Any) -> None:
        line = protocol.encode(message_type, **fields) + "\n"
        proc = self._proc
        if proc is None or proc.stdin is None or not self.alive:
            code = None if proc is None else proc.poll()
            time.sleep(0.1)  # let the stderr reader catch the last words
            raise BackendFailure("backend_died", f"the backend process is not running ({_describe_exit(code)})",
                                 stderr_tail=self.stderr_tail())
        try:
            proc.stdin.write(line.encode("utf-8"))
            proc.stdin.flush()
        except (BrokenPipeError, OSError, ValueError) as exc:
            raise BackendFailure("backend_died", f"cannot write to the backend process ({exc})") from None

    def submit(self, request: FitRequest) -> str:
        """Send a `fit`; returns its job id. Starts the process on first use."""
        if self.job_id is not None:
            raise BackendFailure("busy", "a fit is already running; stop it first", recoverable=True)
        if self._proc is None:
            self.start()
        job_id = uuid.uuid4().hex[:12]
        self._send("fit", id=job_id, prompt=request.prompt, negative_prompt=request.negative_prompt,
                   model=request.model, vae_model=request.vae_model, bundle=request.bundle,
                   initial_weights=request.initial_weights,
                   keys=request.keys, bounds=request.bounds, config=dict(request.config), job_dir=request.job_dir,
                   outputs=list(request.outputs))
        self.job_id = job_id
        self._stop_sent_at = None
        self._last_message_at = time.monotonic()
        return job_id

    def stop_job(self) -> None:
        """Ask the running fit to end after its current iteration (answered by done.stopped=True)."""
        if self.job_id is None or self._stop_sent_at is not None:
            return
        self._stop_sent_at = time.monotonic()
        try:
            self._send("stop", id=self.job_id)
        except BackendFailure:
            pass  # the next poll reports the dead process

    # ------------------------------------------------------------------ receive
    def poll(self) -> JobUpdate | None:
        """Fold everything queued so far into one update for the running job (None when idle)."""
        return self._fold(self._drain(None))

    def wait(self, timeout: float) -> JobUpdate | None:
        """Like poll, but block up to `timeout` seconds for the first queued item."""
        return self._fold(self._drain(timeout))

    def _drain(self, timeout: float | None) -> list[tuple[str, Any]]:
        items = []
        try:
            if timeout:
                items.append(self._queue.get(timeout=timeout))
            while True:
                items.append(self._queue.get_nowait())
        except queue.Empty:
            pass
        return items

    def _fold(self, items: list[tuple[str, Any]]) -> JobUpdate | None:
        job_id = self.job_id
        update = JobUpdate(job_id=job_id or "")
        for kind, payload in items:
            if update.failure is not None:
                break
            self._last_message_at = time.monotonic()
            if kind == "message":
                self._take(*payload, update)
            elif kind == "garbage":
                reason, raw = payload
                shown = raw.decode("utf-8", errors="replace")
                update.failure = BackendFailure(
                    "bad_message", f"Backend answered garbage (not a protocol message: {reason}): {shown!r}")
            elif kind == "eof":
                died = self._died_failure()
                if update.done is None and job_id is not None:
                    update.failure = died
                else:  # the job had ended: only the idle backend is gone
                    self._fail(died)
        if update.failure is None:
            update.failure = self._check_timeouts()
        if update.failure is not None:
            self._fail(update.failure)
        if job_id is None:
            return None
        if update.finished:
            self.job_id = None
            self._stop_sent_at = None
        return update

    def _take(self, message: dict, decoded: Any, update: JobUpdate) -> None:
        kind = message["type"]
        if kind == "hello":
            if message["protocol"] != protocol.PROTOCOL_VERSION:
                update.failure = BackendFailure(
                    "bad_message", f"Backend speaks protocol {message['protocol']} but this add-on speaks "
                    f"{protocol.PROTOCOL_VERSION}: update the add-on and the backend together")
            self.hello = message
            return
        if kind == "error":
            if message["id"] is not None and message["id"] != self.job_id:
                return  # about an older job
            update.messages += 1
            update.failure = BackendFailure(message["kind"], message["message"], traceback=message.get("traceback"),
                                            recoverable=message["recoverable"])
            return
        if message["id"] != self.job_id:
            return  # late events of a job that already ended
        update.messages += 1
        if kind == "progress":
            update.superseded += update.progress is not None
            update.progress = message
        elif kind == "texture":
            update.superseded += update.texture is not None
            update.texture = message
            update.texture_data = decoded
        elif kind == "done":
            update.done = message

    def _check_timeouts(self) -> BackendFailure | None:
        if self._proc is None or self._closed:
            return None
        now = time.monotonic()
        if self._proc.poll() is not None:
            # normally the stdout EOF reports this; a child that inherited stdout keeps the pipe open
            self._exited_at = self._exited_at or now
            if now - self._exited_at > EXIT_GRACE:
                return self._died_failure()
        if self.hello is None and now - self._started_at > self.settings.hello_timeout:
            return BackendFailure("backend_died", f"Backend did not start: no 'hello' within "
                                  f"{self.settings.hello_timeout:g} s")
        if self.job_id is None:
            return None
        if self._stop_sent_at is not None and now - self._stop_sent_at > self.settings.stop_timeout:
            return BackendFailure("backend_died", f"Backend did not stop within {self.settings.stop_timeout:g} s "
                                  "of the stop request; it was terminated")
        if now - self._last_message_at > self.settings.reply_timeout:
            return BackendFailure("backend_died", f"Backend hung: no message for {self.settings.reply_timeout:g} s "
                                  "during the fit; it was terminated")
        return None

    def _died_failure(self) -> BackendFailure:
        proc = self._proc
        assert proc is not None
        try:
            returncode = proc.wait(timeout=2.0)
        except subprocess.TimeoutExpired:
            returncode = None
        when = "during the fit" if self.job_id is not None else "while idle"
        if self.hello is None:
            when = "before it was ready"
        return BackendFailure("backend_died", f"Backend process ended {when} ({_describe_exit(returncode)})")

    def _fail(self, failure: BackendFailure) -> None:
        if failure.recoverable and self.alive:
            return
        self.close(timeout=1.0, polite=failure.kind not in ("bad_message", "backend_died"))
        failure.stderr_tail = self.stderr_tail()
        self.failure = failure

    # ------------------------------------------------------------------ end
    def close(self, timeout: float = 5.0, polite: bool = True) -> None:
        """End the process: stop + shutdown, then SIGTERM, then SIGKILL its process group. Idempotent."""
        proc = self._proc
        if proc is None or self._closed:
            return
        self._closed = True
        if proc.poll() is None and polite:
            try:
                if self.job_id is not None:
                    self._send_raw(protocol.encode("stop", id=self.job_id))
                self._send_raw(protocol.encode("shutdown"))
            except OSError:
                pass
        try:
            if proc.stdin:
                proc.stdin.close()
        except OSError:
            pass
        try:
            proc.wait(timeout=timeout if polite else 0.2)
        except subprocess.TimeoutExpired:
            self._signal_group(signal.SIGTERM)
            try:
                proc.wait(timeout=1.0)
            except subprocess.TimeoutExpired:
                self._signal_group(signal.SIGKILL)
                proc.wait()
        self._signal_group(signal.SIGKILL)  # any child the backend left behind
        for thread in self._threads:
            thread.join(timeout=2.0)
        for stream in (proc.stdout, proc.stderr):
            try:
                if stream:
                    stream.close()
            except OSError:
                pass
        _live.discard(self)

    def _send_raw(self, line: str) -> None:
        proc = self._proc
        assert proc is not None and proc.stdin is not None
        try:
            proc.stdin.write((line + "\n").encode("utf-8"))
            proc.stdin.flush()
        except (BrokenPipeError, ValueError) as exc:
            raise OSError(str(exc)) from None

    def _signal_group(self, sig: int) -> None:
        if self._proc is not None:
            _kill_group(self._proc, sig)


# ---------------------------------------------------------------------- doctor
def format_doctor(report: dict) -> str:
    """`doctor --json` output as the few lines the preferences show."""
    device, model, head = report.get("device", {}), report.get("model", {}), report.get("head", {})
    versions = report.get("versions", {})
    lines = ["Backend OK" if report.get("ok") else "Backend has a problem",
             f"Device: {device.get('type', '?')} ({device.get('name', '?')})",
             "Versions: " + ", ".join(f"{k} {v or 'missing'}" for k, v in versions.items())]
    if model.get("ok"):
        lines.append(f"Model: {model.get('id')} loads in {model.get('seconds')} s ({model.get('dtype')} on "
                     f"{model.get('device')})")
    else:
        lines.append(f"Model: {model.get('id')} FAILED: {model.get('error')}")
    if head.get("ok"):
        lines.append(f"Head: {head.get('vertices')} vertices, {head.get('components')} components")
    else:
        lines.append(f"Head: FAILED: {head.get('error')}")
    return "\n".join(lines)


class DoctorRun:
    """`<python> -m sds_backend doctor --json` in a thread, so the UI never waits on it."""

    def __init__(self, python: str, model: str | None, device: str, timeout: float = 600.0):
        self.python = os.path.expanduser(python.strip())
        self.model = model or None
        self.device = device
        self.timeout = timeout
        self.ok: bool | None = None
        self.text = ""
        self.report: dict | None = None
        self._thread: threading.Thread | None = None
        self._proc: subprocess.Popen | None = None
        self._cancelled = False

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def command(self) -> list[str]:
        command = [self.python, "-m", "sds_backend", "doctor", "--json", "--device", self.device]
        if self.model:
            command += ["--model", self.model]
        return command

    def start(self) -> None:
        check_settings(BackendSettings(python=self.python, device=self.device))
        _live_doctors.add(self)
        self._thread = threading.Thread(target=self.run, name="sds-head-doctor", daemon=True)
        self._thread.start()

    def join(self) -> None:
        if self._thread is not None:
            self._thread.join()

    def cancel(self) -> None:
        """End the doctor process (and what it started) now; its answer becomes 'cancelled'."""
        self._cancelled = True
        if self._proc is not None and self._proc.poll() is None:
            _kill_group(self._proc, signal.SIGKILL)

    def run(self) -> None:
        try:
            self._run()
        finally:
            _live_doctors.discard(self)

    def _run(self) -> None:
        env = dict(os.environ)
        env.pop("PYTHONHOME", None)
        root = paths.repo_root()
        try:
            # the doctor loads the model (minutes for a first download): like a backend, it must not
            # outlive Blender or the add-on
            self._proc = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                          stderr=subprocess.PIPE, text=True, env=env, cwd=str(root) if root else None,
                                          **_own_group())
        except OSError as exc:
            self.ok, self.text = False, f"cannot run {self.python}: {exc.strerror or exc}"
            return
        if self._cancelled:                  # cancel() came while the process was being started
            _kill_group(self._proc, signal.SIGKILL)
        try:
            stdout, stderr = self._proc.communicate(timeout=self.timeout)
        except subprocess.TimeoutExpired:
            _kill_group(self._proc, signal.SIGKILL)
            self._proc.communicate()
            self.ok, self.text = False, f"doctor did not answer within {self.timeout:g} s"
            return
        if self._cancelled:
            self.ok, self.text = False, "doctor cancelled (the add-on was disabled or Blender quit)"
            return
        try:
            self.report = json.loads(stdout.strip().splitlines()[-1])
            assert isinstance(self.report, dict)
        except (IndexError, json.JSONDecodeError, AssertionError):
            tail = "\n".join((stdout + "\n" + stderr).strip().splitlines()[-STDERR_LINES_SHOWN:])
            self.ok = False
            self.text = f"doctor failed (exit code {self._proc.returncode}):\n{tail}"
            return
        self.ok = bool(self.report.get("ok")) and self._proc.returncode == 0
        self.text = format_doctor(self.report)
