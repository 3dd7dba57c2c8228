"""A `python -m sds_backend serve` subprocess driven line by line (test_server, test_hostile_inputs)."""
from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path

from sds_backend import protocol


class ServerProcess:
    """A `serve` subprocess with a reader thread collecting its protocol lines."""

    def __init__(self, tmp_path: Path):
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen([sys.executable, "-m", "sds_backend", "serve", "--device", "cpu"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=open(tmp_path / "stderr.log", "wb"),
                                     env=env)
        self.lines: "queue.Queue[dict]" = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        try:
            for raw in self.proc.stdout:
                # every stdout line must be a valid backend protocol message
                self.lines.put(protocol.decode(raw, allowed_types=protocol.BACKEND_TYPES))
        except ValueError:
            if not self.proc.stdout.closed:   # a test closing the pipe ends the reader; nothing else may
                raise

    def send_raw(self, data: bytes):
        self.proc.stdin.write(data)
        self.proc.stdin.flush()

    def send(self, message_type: str, **fields):
        self.send_raw((json.dumps({"v": protocol.PROTOCOL_VERSION, "type": message_type, **fields}) + "\n").encode())

    def next(self, timeout: float = 60.0) -> dict:
        return self.lines.get(timeout=timeout)

    def drain(self, newest: dict) -> dict:
        """The newest message received so far (`newest` when none is waiting)."""
        while True:
            try:
                newest = self.lines.get_nowait()
            except queue.Empty:
                return newest

    def reply(self, timeout: float = 60.0) -> dict:
        """The next message that is not a heartbeat sent while a model loads."""
        deadline = time.monotonic() + timeout
        while True:
            message = self.next(max(0.1, deadline - time.monotonic()))
            if not (message["type"] == "progress" and message["stage"] == "loading"):
                return message

    def until(self, message_type: str, timeout: float = 120.0) -> tuple[dict, list[dict]]:
        """Messages up to and including the first of `message_type`."""
        seen = []
        deadline = time.monotonic() + timeout
        while True:
            message = self.next(max(0.1, deadline - time.monotonic()))
            seen.append(message)
            if message["type"] == message_type:
                return message, seen

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
