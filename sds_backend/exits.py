"""How a command ends: its exit code, Ctrl-C and SIGTERM, and bugs (stdlib only).

Both the backend's `fit` command and headless Blender (blender_addon/headless.py) end through
this module, so they share one table of exit codes (README) and one behaviour on a signal:
the first SIGINT or SIGTERM asks the fit to stop after its current iteration, and the command then
writes a complete result marked stopped and exits 130 (SIGINT) or 143 (SIGTERM); a second one
aborts at once (KeyboardInterrupt), and the command removes what it had staged, still exiting
130/143. A user error never shows a traceback; a bug writes its traceback to a log file and
says where.
"""
from __future__ import annotations

import os
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path

OK, BUG, USAGE, BAD_INPUT, BACKEND, OUTPUT = 0, 1, 2, 3, 4, 5
SIGNALLED = {signal.SIGINT: 130, signal.SIGTERM: 143}
MEANING = {OK: "done (or stopped by Ctrl-C/SIGTERM: see 130, 143)", BUG: "a bug (the traceback is in a log file)",
           USAGE: "bad arguments", BAD_INPUT: "bad input (prompt, settings, head, model folder, checkpoint)",
           BACKEND: "the backend failed (the model cannot load, a crash, a hang)", OUTPUT: "an output cannot be written",
           130: "stopped by Ctrl-C (SIGINT)", 143: "stopped by SIGTERM"}


class StopSignals:
    """While active, SIGINT/SIGTERM ask for a stop (`requested`) and a second one aborts.

    `notice(text)` is called with a line for the user on each signal. Handlers are installed only
    in the main thread (Python's rule); the previous handlers come back on exit.
    """

    def __init__(self, notice=None):
        self.signal: int | None = None
        self.notice = notice or (lambda text: print(text, file=sys.stderr, flush=True))
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signal is not None

    @property
    def exit_code(self) -> int:
        return SIGNALLED.get(self.signal, 130)

    def _handle(self, number, frame) -> None:
        name = signal.Signals(number).name
        if self.signal is not None:
            self.notice(f"{name} again: aborting now")
            raise KeyboardInterrupt
        self.signal = number
        self.notice(f"{name}: stopping after the current iteration, then writing the result "
                    f"({'Ctrl-C' if number == signal.SIGINT else 'SIGTERM'} again aborts)")

    def __enter__(self) -> "StopSignals":
        for number in SIGNALLED:
            try:
                self._previous[number] = signal.signal(number, self._handle)
            except (ValueError, OSError):     # not the main thread, or not allowed here
                pass
        return self

    def __exit__(self, *exc) -> bool:
        for number, previous in self._previous.items():
            # None: the previous handler was installed from C (Blender's); the default is the nearest
            signal.signal(number, signal.SIG_DFL if previous is None else previous)
        return False


def log_bug(command: str, exc: BaseException) -> Path:
    """Write the traceback of an unexpected exception to a log file; returns its path."""
    folder = Path(tempfile.gettempdir()) / "sds-head-logs"
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    try:
        folder.mkdir(exist_ok=True)
        path = folder / f"{command}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
        path.write_text(f"{command} failed unexpectedly\n{text}", encoding="utf-8", errors="replace")
    except OSError:
        print(text, file=sys.stderr)
        return Path("<stderr>")
    return path
