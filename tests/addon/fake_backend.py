"""A misbehaving stand-in for `python -m sds_backend serve`, for the bridge's FAILURE tests only.

Run as the "backend Python" through a wrapper script, so it receives `-u -m sds_backend serve
--device ...` and ignores them. SDS_FAKE_MODE picks the misbehaviour:

    garbage    hello, two progress events, then a line that is not JSON
    crash      hello, two progress events, a traceback on stderr, exit code 3
    hang       hello, one progress event, then silence (never ends by itself)
    loading    hello, one "loading" heartbeat (weights not the fit's own), then silence
    nohello    says nothing at all
    badproto   hello with protocol version 99
    slow       hello, then progress every 50 ms forever; honours stop/shutdown (a child sleeps too)
    stubborn   hello, progress forever, ignores stdin and SIGTERM (a child sleeps too): needs SIGKILL
    spam_stdout  prints 'Loading pipeline components...' (a library chatting on stdout) before hello

Success paths are never tested against this script: they use the real backend.
"""
from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from sds_backend import protocol  # noqa: E402  (stdlib only)

MODE = os.environ.get("SDS_FAKE_MODE", "slow")
out_lock = threading.Lock()


def send(kind: str, **fields) -> None:
    with out_lock:
        sys.stdout.write(protocol.encode(kind, **fields) + "\n")
        sys.stdout.flush()


def hello(version: int = protocol.PROTOCOL_VERSION) -> None:
    message = {"v": protocol.PROTOCOL_VERSION, "type": "hello", "version": "fake", "protocol": version, "device": "cpu", "model": "fake",
               "torch": "none", "diffusers": "none", "pid": os.getpid()}
    with out_lock:
        sys.stdout.write(json.dumps(message) + "\n")
        sys.stdout.flush()


def read_fit() -> dict:
    for line in sys.stdin:
        message = json.loads(line)
        if message["type"] == "fit":
            return message
        if message["type"] == "shutdown":
            sys.exit(0)
    sys.exit(0)


def progress(fit: dict, i: int, total: int = 1000) -> None:
    weights = [w + 0.01 * i for w in (fit.get("initial_weights") or [])]
    send("progress", id=fit["id"], iteration=i, total=total, stage="shape", loss=1.0 / i, t=0.5,
         weights=weights, seconds=0.05 * i)


def main() -> None:
    print(f"fake backend ({MODE}) starting", file=sys.stderr, flush=True)
    if MODE == "nohello":
        time.sleep(3600)
    if MODE == "spam_stdout":
        print("Loading pipeline components...", flush=True)
    hello(99 if MODE == "badproto" else protocol.PROTOCOL_VERSION)
    fit = read_fit()
    if MODE == "garbage":
        progress(fit, 1)
        progress(fit, 2)
        with out_lock:
            sys.stdout.write("this is not a protocol line\n")
            sys.stdout.flush()
        time.sleep(3600)
    if MODE == "crash":
        progress(fit, 1)
        progress(fit, 2)
        print("Traceback (most recent call last):\n  File \"fit.py\", line 1\nRuntimeError: CUDA out of memory "
              "(fake)", file=sys.stderr, flush=True)
        sys.exit(3)
    if MODE == "hang":
        progress(fit, 1)
        time.sleep(3600)
    if MODE == "loading":
        send("progress", id=fit["id"], iteration=0, total=1000, stage="loading", loss=None, t=None,
             weights=[w + 1.0 for w in fit.get("initial_weights") or []], seconds=5.0)
        time.sleep(3600)
    if MODE == "stubborn":
        import signal

        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        child = subprocess.Popen([sys.executable, "-c", "import signal, time; "
                                  "signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(3600)"])
        print(f"child pid {child.pid}", file=sys.stderr, flush=True)
        i = 0
        while True:
            i += 1
            progress(fit, i)
            time.sleep(0.05)
    # slow: each fit runs until stopped, then the backend waits for the next fit (like the real one);
    # a child process sleeps in the same process group
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"])
    print(f"child pid {child.pid}", file=sys.stderr, flush=True)
    messages: "queue.Queue[dict | None]" = queue.Queue()

    def listen() -> None:
        for line in sys.stdin:
            messages.put(json.loads(line))
        messages.put(None)

    threading.Thread(target=listen, daemon=True).start()
    while fit is not None:
        i, stopped = 0, False
        while not stopped:
            i += 1
            progress(fit, i)
            try:
                message = messages.get(timeout=0.05)
            except queue.Empty:
                continue
            if message is None or message["type"] == "shutdown":
                child.kill()
                return
            stopped = message["type"] == "stop"
        send("done", id=fit["id"], weights=[], outputs={}, stopped=True, iterations=i, seconds=0.05 * i)
        fit = None
        while fit is None:
            message = messages.get()
            if message is None or message["type"] == "shutdown":
                child.kill()
                return
            if message["type"] == "fit":
                fit = message


if __name__ == "__main__":
    main()
