"""Wire protocol between the Blender add-on and the backend (stdlib only).

This one module defines the protocol for both sides: the backend's server imports it, and
the add-on's bridge imports the very same file. One JSON object per line, UTF-8, each with
"v" (protocol version) and "type". stdout of the backend carries protocol lines only.

Client -> backend
    fit       id, prompt, [negative_prompt], [model], [vae_model], [bundle], [initial_weights], [keys],
              [bounds], [config], [job_dir], [outputs]
                                        keys: the components to fit (default all; the others keep their
                                        initial weights); bounds: name -> [low, high] of a component (a
                                        rig's slider range: the prior is centred on its initial weight
                                        and scaled to its range; default +-config.weight_clamp, prior
                                        centred on 0); vae_model: the AutoencoderTiny of config.vae
                                        "tiny" (default TAESD); outputs: subset of OUTPUT_NAMES (default: all);
                                        job_dir: a folder for the outputs that holds none yet (another
                                        fit's outputs there are an output_error, never replaced); by
                                        default a folder of the backend's own under the temp folder
    stop      [id]                      cooperative: the fit ends within one iteration; a stop for no
                                        running fit (or another one) is ignored
    shutdown                            the backend exits after the current message
Backend -> client
    hello     version, protocol, device, model, torch, diffusers, pid
    progress  id, iteration, total, stage, loss, t, weights, seconds   (stage "loading": heartbeat
                                        with iteration 0 every few seconds while the model loads)
    texture   id, iteration, path        PNG written atomically into the job folder
    done      id, weights, outputs, stopped, iterations, seconds    (stopped=True: user cancel)
    error     id, kind, message, recoverable, [traceback]

Every fit ends with exactly one `done` or one `error` carrying its id. Bulk data (textures,
meshes) travels as files in the job folder, never inline.
"""
from __future__ import annotations

import json
import math
from typing import Any, Callable

PROTOCOL_VERSION = 2
MAX_LINE_BYTES = 1 << 20  # a weights list for any sane model is far below this

# files a fit can write into its job folder; a `fit` may ask for a subset (default: all)
OUTPUT_NAMES = ("weights", "texture", "gif", "glb", "fit", "checkpoint")

# error kinds a client can switch on
ERROR_KINDS = (
    "bad_message",      # not JSON, not an object, wrong version, unknown type, wrong field types
    "bad_request",      # well-formed but unusable: empty prompt, NaN weights, wrong weight count
    "model_error",      # the diffusion model cannot be loaded
    "bundle_error",     # the morphable-model bundle cannot be loaded or is malformed
    "output_error",     # the job folder cannot be written (read-only, full, not a folder)
    "busy",             # a fit is already running
    "internal",         # a bug or a failure during the fit
    "backend_died",     # client side: the process exited or stopped answering
)


class ProtocolError(ValueError):
    """A message that breaks the protocol. `kind` is one of ERROR_KINDS."""

    def __init__(self, kind: str, message: str):
        assert kind in ERROR_KINDS, kind
        super().__init__(message)
        self.kind = kind


def _is_str(v: Any) -> bool:
    return isinstance(v, str)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def _is_number_list(v: Any) -> bool:
    return isinstance(v, list) and all(_is_number(x) for x in v)


def _is_opt_str(v: Any) -> bool:
    return v is None or isinstance(v, str)


def _is_opt_number_list(v: Any) -> bool:
    return v is None or _is_number_list(v)


def _is_opt_output_list(v: Any) -> bool:
    return v is None or (isinstance(v, list) and all(isinstance(x, str) and x in OUTPUT_NAMES for x in v))


def _is_dict(v: Any) -> bool:
    return isinstance(v, dict)


def _is_bool(v: Any) -> bool:
    return isinstance(v, bool)


def _is_str_dict(v: Any) -> bool:
    return isinstance(v, dict) and all(isinstance(k, str) and isinstance(x, str) for k, x in v.items())


def _is_opt_number(v: Any) -> bool:
    return v is None or _is_number(v)


def _is_opt_str_list(v: Any) -> bool:
    return v is None or (isinstance(v, list) and all(isinstance(x, str) for x in v))


def _is_opt_bounds(v: Any) -> bool:
    return v is None or (isinstance(v, dict) and all(
        isinstance(k, str) and isinstance(x, list) and len(x) == 2 and all(_is_number(n) for n in x)
        for k, x in v.items()))


Field = tuple[Callable[[Any], bool], bool, str]  # (check, required, what it should be)

# field name -> (check, required, description used in error messages)
SCHEMAS: dict[str, dict[str, Field]] = {
    "fit": {
        "id": (_is_str, True, "a string job id"),
        "prompt": (_is_str, True, "a string"),
        "negative_prompt": (_is_opt_str, False, "a string or null"),
        "model": (_is_opt_str, False, "a hub id or folder path, or null for the default"),
        "vae_model": (_is_opt_str, False, "a hub id or folder path of a tiny VAE, or null for the default"),
        "bundle": (_is_opt_str, False, "a path to a .npz or .glb bundle, or null for the default head"),
        "initial_weights": (_is_opt_number_list, False, "a list of finite numbers or null"),
        "keys": (_is_opt_str_list, False, "a list of component names to fit (the others stay at their "
                                          "initial weights), or null for all"),
        "bounds": (_is_opt_bounds, False, "an object of component name -> [low, high], or null"),
        "config": (_is_dict, False, "an object of FitConfig fields"),
        "job_dir": (_is_opt_str, False, "a folder path or null"),
        "outputs": (_is_opt_output_list, False,
                    "a list of output names (" + ", ".join(OUTPUT_NAMES) + "; [] for none) or null for all"),
    },
    "stop": {"id": (_is_opt_str, False, "a job id or null")},
    "shutdown": {},
    "hello": {
        "version": (_is_str, True, "a string"),
        "protocol": (_is_int, True, "an integer"),
        "device": (_is_str, True, "a string"),
        "model": (_is_str, True, "a string"),
        "torch": (_is_str, True, "a string"),
        "diffusers": (_is_str, True, "a string"),
        "pid": (_is_int, True, "an integer"),
    },
    "progress": {
        "id": (_is_str, True, "a string"),
        "iteration": (_is_int, True, "an integer"),
        "total": (_is_int, True, "an integer"),
        "stage": (_is_str, True, "'shape', 'texture', or 'loading' (iteration 0, while the model loads)"),
        "loss": (_is_opt_number, True, "a finite number or null"),
        "t": (_is_opt_number, True, "a finite number or null"),
        "weights": (_is_number_list, True, "a list of finite numbers"),
        "seconds": (_is_number, True, "a number"),
    },
    "texture": {
        "id": (_is_str, True, "a string"),
        "iteration": (_is_int, True, "an integer"),
        "path": (_is_str, True, "a file path"),
    },
    "done": {
        "id": (_is_str, True, "a string"),
        "weights": (_is_number_list, True, "a list of finite numbers"),
        "outputs": (_is_str_dict, True, "an object of name -> path"),
        "stopped": (_is_bool, True, "a boolean"),
        "iterations": (_is_int, True, "an integer"),
        "seconds": (_is_number, True, "a number"),
    },
    "error": {
        "id": (_is_opt_str, True, "a job id or null"),
        "kind": (lambda v: v in ERROR_KINDS, True, "one of " + ", ".join(ERROR_KINDS)),
        "message": (_is_str, True, "a string"),
        "recoverable": (_is_bool, True, "a boolean"),
        "traceback": (_is_opt_str, False, "a string or null"),
    },
}
CLIENT_TYPES = ("fit", "stop", "shutdown")
BACKEND_TYPES = ("hello", "progress", "texture", "done", "error")


def _reject_constant(name: str) -> Any:
    raise ProtocolError("bad_message", f"non-finite number {name} is not allowed")


def check_message(message: Any, allowed_types: tuple[str, ...] | None = None) -> dict:
    """Validate a decoded message; return it unchanged or raise ProtocolError."""
    if not isinstance(message, dict):
        raise ProtocolError("bad_message", f"a message must be a JSON object, got {type(message).__name__}")
    version = message.get("v")
    if type(version) is not int or version != PROTOCOL_VERSION:
        raise ProtocolError("bad_message", f"field 'v' must be the integer {PROTOCOL_VERSION}, got {version!r}")
    kind = message.get("type")
    accepted = allowed_types or tuple(SCHEMAS)
    if not isinstance(kind, str) or kind not in SCHEMAS:
        raise ProtocolError("bad_message", f"unknown message type {kind!r}; expected one of {', '.join(accepted)}")
    if kind not in accepted:
        raise ProtocolError("bad_message", f"message type {kind!r} is not accepted here; expected one of {', '.join(accepted)}")
    schema = SCHEMAS[kind]
    for name, (check, required, description) in schema.items():
        if name not in message:
            if required:
                raise ProtocolError("bad_message", f"'{kind}' message is missing field '{name}' ({description})")
            continue
        if not check(message[name]):
            shown = repr(message[name])
            shown = shown if len(shown) <= 80 else shown[:77] + "..."
            raise ProtocolError("bad_message", f"'{kind}' field '{name}' must be {description}, got {shown}")
    unknown = sorted(set(message) - set(schema) - {"v", "type"})
    if unknown:
        raise ProtocolError("bad_message", f"'{kind}' message has unknown field(s): {', '.join(unknown)}")
    return message


def decode(line: str | bytes, allowed_types: tuple[str, ...] | None = None) -> dict:
    """Parse and validate one protocol line. Raises ProtocolError with kind 'bad_message'."""
    if isinstance(line, bytes):
        if len(line) > MAX_LINE_BYTES:
            raise ProtocolError("bad_message", f"line of {len(line)} bytes exceeds the {MAX_LINE_BYTES}-byte limit")
        try:
            line = line.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ProtocolError("bad_message", f"line is not UTF-8: {exc}") from None
    if len(line) > MAX_LINE_BYTES:
        raise ProtocolError("bad_message", f"line of {len(line)} characters exceeds the {MAX_LINE_BYTES}-byte limit")
    try:
        message = json.loads(line, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        raise ProtocolError("bad_message", f"line is not valid JSON: {exc.msg} at column {exc.colno}") from None
    except (ValueError, RecursionError) as exc:   # e.g. a 5000-digit integer, brackets nested 100000 deep
        raise ProtocolError("bad_message", f"line cannot be decoded: {type(exc).__name__}: {str(exc)[:200]}") from None
    return check_message(message, allowed_types)


def encode(message_type: str, **fields: Any) -> str:
    """One validated protocol line (without the trailing newline)."""
    message = {"v": PROTOCOL_VERSION, "type": message_type, **fields}
    check_message(message)
    return json.dumps(message, separators=(",", ":"), allow_nan=False)

