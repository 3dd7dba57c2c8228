"""`python -m sds_backend serve`: the JSON-lines protocol on stdin/stdout (see protocol.py).

Threads: a reader thread parses stdin, answers malformed lines at once, turns `stop` into a
flag the running fit polls every iteration, and queues `fit`/`shutdown` for the main thread,
which runs one fit at a time. stdout carries protocol lines only (one lock, one writer);
logging goes to stderr. A `fit` that arrives while another runs gets a `busy` error.
"""
from __future__ import annotations

import argparse
import logging
import os
import queue
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import BinaryIO, TextIO

from .. import __version__, protocol

log = logging.getLogger("sds_backend")
KEEP_TEXTURES = 3   # live texture PNGs kept per job: the client may still be reading the previous one


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", help="auto (CUDA, else MPS, else CPU), cuda[:N], mps or cpu")
    parser.add_argument("--log-level", default="INFO", help="stderr log level")


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(message)s")
    if "OMP_NUM_THREADS" not in os.environ:
        # leave a core to the client (Blender's UI): CPU ops that spin on every core against a
        # busy main thread run many times slower, not just a little
        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or 2) - 1))
    # stdout is the protocol channel. Everything else that writes there — a stray print, a C
    # library or CUDA printf writing to file descriptor 1 — is sent to stderr instead: the
    # protocol keeps a private duplicate of the original descriptor.
    sys.stdout.flush()
    protocol_fd = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    protocol_out = os.fdopen(protocol_fd, "w", encoding="utf-8", buffering=1)
    return Server(args.device, sys.stdin.buffer, protocol_out).serve()


class Server:
    def __init__(self, device_name: str, stdin: BinaryIO, stdout: TextIO):
        self.device_name = device_name
        self.stdin = stdin
        self.stdout = stdout
        self._write_lock = threading.Lock()
        self._requests: "queue.Queue[dict | None]" = queue.Queue()
        self._stop = threading.Event()
        self._busy_id: str | None = None
        self._busy_lock = threading.Lock()
        self._client_gone = False

    # ------------------------------------------------------------------------------ output
    def send(self, message_type: str, **fields) -> None:
        """Write one protocol line. A client that closed our stdout is gone: the running fit stops,
        the server ends once it has, and nothing more is written."""
        line = protocol.encode(message_type, **fields)
        with self._write_lock:
            if self._client_gone:
                return
            try:
                self.stdout.write(line + "\n")
                self.stdout.flush()
            except (OSError, ValueError):
                self._client_gone = True
                log.warning("the client closed the protocol channel; stopping the fit and shutting down")
                self._stop.set()
                self._requests.put(None)

    def send_error(self, kind: str, message: str, job_id: str | None = None, recoverable: bool = True) -> None:
        self.send("error", id=job_id, kind=kind, message=message, recoverable=recoverable)

    # ------------------------------------------------------------------------------ main
    def serve(self) -> int:
        from importlib.metadata import version

        import torch

        from ..inputs import default_model_id
        from .device import describe_device, resolve_device
        from .job import Backend

        try:
            device = resolve_device(self.device_name)
        except ValueError as exc:
            self.send_error("bad_request", str(exc), recoverable=False)
            return 2
        self.backend = Backend(device)
        self.send("hello", version=__version__, protocol=protocol.PROTOCOL_VERSION, device=describe_device(device),
                  model=default_model_id(), torch=torch.__version__, diffusers=version("diffusers"), pid=os.getpid())
        threading.Thread(target=self._read_loop, name="stdin-reader", daemon=True).start()
        while True:
            request = self._requests.get()
            if request is None or request["type"] == "shutdown":
                log.info("shutting down")
                return 0
            final_type, fields = self._run_fit(request)
            # Clearing the job and announcing its end happen together, so a `fit` sent right after
            # `done` is accepted and a `stop` racing the end is never taken for the next job.
            with self._busy_lock:
                self._busy_id = None
                try:
                    self.send(final_type, **fields)
                except (ValueError, TypeError) as exc:      # e.g. weights that went non-finite
                    self.send_error("internal", f"cannot report the end of fit {fields.get('id')!r}: {exc}",
                                    fields.get("id"))

    def _read_loop(self) -> None:
        """Parse stdin; answer bad lines; flag stops; queue fits and shutdown. EOF means shutdown."""
        try:
            while self._read_one():
                pass
        finally:  # whatever ends the reader, the main loop must not wait for requests forever
            self._stop.set()
            self._requests.put(None)

    def _read_one(self) -> bool:
        """Handle one line; False when input ended or shutdown arrived."""
        try:
            line = self.stdin.readline(protocol.MAX_LINE_BYTES + 1)
        except (OSError, ValueError):
            return False
        if not line:
            return False
        if len(line) > protocol.MAX_LINE_BYTES and not line.endswith(b"\n"):
            self._discard_rest_of_line()
            self.send_error("bad_message", f"line exceeds the {protocol.MAX_LINE_BYTES}-byte limit; ignored")
            return True
        if not line.strip():
            return True
        try:
            message = protocol.decode(line.rstrip(b"\r\n"), allowed_types=protocol.CLIENT_TYPES)
        except protocol.ProtocolError as exc:
            self.send_error(exc.kind, str(exc))
            return True
        except Exception as exc:  # a decoder bug must not kill the reader (the server would hang)
            self.send_error("bad_message", f"line cannot be decoded: {type(exc).__name__}: {exc}")
            return True
        kind = message["type"]
        if kind == "shutdown":
            self._stop.set()
            self._requests.put(message)
            return False
        with self._busy_lock:
            running = self._busy_id
            if kind == "stop":
                # idempotent: a stop for no fit, or for one that already ended, changes nothing
                if running is not None and message.get("id") in (None, running):
                    self._stop.set()
                return True
            if running is None and self._requests.empty():
                self._busy_id = message["id"]
                self._stop.clear()
                self._requests.put(message)
                return True
        self.send_error("busy", "a fit is already running; send stop first or wait for its done", job_id=message["id"])
        return True

    def _discard_rest_of_line(self) -> None:
        while True:
            chunk = self.stdin.readline(protocol.MAX_LINE_BYTES)
            if not chunk or chunk.endswith(b"\n"):
                return

    # ------------------------------------------------------------------------------ fit
    def _run_fit(self, message: dict) -> tuple[str, dict]:
        """Run one fit, streaming its events; return the final message (done or error) to send."""
        from ..bundle import BundleError
        from ..core.export import write_texture_png
        from ..core.fit import ProgressEvent
        from ..core.guidance import ModelLoadError
        from ..files import InputError, OutputError, OutputSet, check_path_text
        from ..inputs import ModelSourceError
        from .job import write_outputs
        from .request import FIT_FILES, OUTPUT_FILES, make_request

        job_id = message["id"]
        textures: list[Path] = []
        outputs: OutputSet | None = None

        def on_event(event) -> None:
            if isinstance(event, ProgressEvent):
                self.send("progress", id=job_id, iteration=event.iteration, total=event.total, stage=event.stage,
                          loss=_finite_or_none(event.loss), t=_finite_or_none(event.t),
                          weights=[float(w) for w in event.weights], seconds=round(event.seconds, 3))
                return
            path = outputs.folder / f"texture_{event.iteration:06d}.png"
            write_texture_png(path, event.texture)
            textures.append(path)
            while len(textures) > KEEP_TEXTURES:
                textures.pop(0).unlink(missing_ok=True)
            self.send("texture", id=job_id, iteration=event.iteration, path=str(path))

        def error(kind: str, text: str, trace: str | None = None) -> tuple[str, dict]:
            if outputs is not None:
                outputs.discard()
            fields = {"id": job_id, "kind": kind, "message": text, "recoverable": True}
            if trace:
                fields["traceback"] = trace
            return "error", fields

        try:
            request = make_request(message["prompt"], message.get("negative_prompt") or "", message.get("model"),
                                   message.get("bundle"), initial_weights=message.get("initial_weights"),
                                   keys=message.get("keys"), bounds=message.get("bounds"),
                                   config=message.get("config") or {}, outputs=message.get("outputs"),
                                   vae_model=message.get("vae_model"))
            # a client's folder keeps what it holds; the backend's own folder of a job id is replaced
            job_dir = message.get("job_dir")
            own_folder = not job_dir
            if own_folder:
                job_dir = str(Path(tempfile.gettempdir()) / "sds-head-jobs" / _safe(job_id))
            outputs = OutputSet(check_path_text(job_dir, "job_dir"), FIT_FILES, replace=own_folder,
                                what="job_dir", hint="remove them first").prepare()
            weights = list(request.rig.start)
            with _Heartbeat(lambda seconds: self.send(
                    "progress", id=job_id, iteration=0, total=request.config.total_steps, stage="loading",
                    loss=None, t=None, weights=weights, seconds=round(seconds, 3))):
                checkpoint = outputs.direct_path(OUTPUT_FILES["checkpoint"]) if "checkpoint" in request.outputs else None
                prepared = self.backend.prepare(request, checkpoint)
        except (ModelLoadError, ModelSourceError) as exc:
            return error("model_error", str(exc))
        except BundleError as exc:
            return error("bundle_error", str(exc))
        except OutputError as exc:
            return error("output_error", str(exc))
        except (InputError, ValueError, TypeError) as exc:
            return error("bad_request", str(exc))
        except Exception as exc:
            log.exception("fit %s could not start", job_id)
            return error("internal", f"{type(exc).__name__}: {exc}", traceback.format_exc())
        try:
            result = prepared.run(on_event=on_event, should_stop=self._stop.is_set)
            write_outputs(outputs, request, result, prepared.fitter.guidance.model.model_id)
            committed = outputs.commit()
            written = {name: committed[file] for name, file in OUTPUT_FILES.items() if file in committed}
        except OutputError as exc:
            return error("output_error", str(exc))
        except Exception as exc:  # past validation, any failure is ours: report it, keep serving
            log.exception("fit %s failed", job_id)
            return error("internal", f"{type(exc).__name__}: {exc}", traceback.format_exc())
        return "done", {"id": job_id, "weights": [float(w) for w in result.weights], "outputs": written,
                        "stopped": result.stopped, "iterations": result.iterations, "seconds": round(result.seconds, 3)}


class _Heartbeat:
    """Calls beat(seconds) every `every` seconds until the block ends (slow model loads)."""

    def __init__(self, beat, every: float = 5.0):
        self.beat, self.every = beat, every
        self._done = threading.Event()

    def __enter__(self):
        started = time.monotonic()

        def loop():
            while not self._done.wait(self.every):
                self.beat(time.monotonic() - started)

        self._thread = threading.Thread(target=loop, name="heartbeat", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._done.set()
        self._thread.join()
        return False


def _safe(job_id: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in job_id)[:80] or "job"


def _finite_or_none(value: float) -> float | None:
    return value if value == value and abs(value) != float("inf") else None
