"""A fit's resumable state, and checkpoints of it that hold only data (tensors + JSON, safetensors).

Nothing in a checkpoint can run code: a safetensors file is a JSON header and raw tensor bytes,
and reading parses only those (no pickle). Before any of it is used, every field is checked
against what the resuming fit expects: the same prompt, model, bundle, settings and rig, and
tensors of the right names, shapes and dtypes with values a fit can continue from (finite, the
weights inside their bounds, optimiser statistics an optimiser can divide by). A truncated,
foreign or tampered file gets a message naming what is wrong. A `checkpoint.pt` of an earlier
release (a pickle) is refused without being opened.

`read` checks a file with numpy only; `load` reads it so, checks the random generator's state
with torch, and makes tensors. Both take milliseconds: the command line loads a checkpoint to
resume before it loads a model.

The optimiser's settings are not saved: a resumed stage makes its optimiser as a new one does and
takes only its per-parameter statistics (step, exp_avg, exp_avg_sq) from the file.

Layout: metadata "sds_head" is JSON {version, identity (config, prompt, negative_prompt, model,
bundle, components, rig, tiny_vae), stage_index, step, skipped_steps, texture_levels, snapshot_iterations};
tensors: weights [K], texture.<i> (the texture levels), generator (CPU generator state), losses
float64 [N], optimizer.<param>.<step|exp_avg|exp_avg_sq>, snapshot.<n>.weights [K],
snapshot.<n>.texture.
"""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..files import InputError, atomic_write, check_input_file, parse_json
from ..fit_config import FitConfig, texture_level_sides
from ..inputs import Rig

if TYPE_CHECKING:
    import torch

VERSION = 2
MAX_BYTES = 1 << 30
_KEY = "sds_head"
_OPTIMIZER_KEYS = ("step", "exp_avg", "exp_avg_sq")
GENERATOR_STATE_BYTES = 5056         # torch's CPU generator (mt19937) state


@dataclass
class Snapshot:
    """State recorded for the evolution GIF."""

    iteration: int
    weights: np.ndarray             # float32 [K]
    texture: np.ndarray | None      # uint8 [h, w, 3] (downsampled) or None before the texture stage


@dataclass
class FitState:
    """Everything needed to continue a fit."""

    stage_index: int
    step: int                                   # iterations done in the current stage
    weights: torch.Tensor                       # [K]: the fit's coordinates u (see inputs.Rig)
    texture_levels: list[torch.Tensor] | None   # texture parameters once the texture stage started
    optimizer_state: dict | None                # the current stage's per-parameter statistics
    generator_state: torch.Tensor
    losses: list[float]
    snapshots: list[Snapshot]
    skipped_steps: int = 0                      # steps dropped for a non-finite gradient


@dataclass(frozen=True)
class Identity:
    """What a checkpoint was made for; a resume must match it exactly."""

    config: dict[str, Any]
    prompt: str
    negative_prompt: str
    model: str
    bundle: str                    # Bundle.digest()
    components: int
    rig: dict[str, list[float]]    # inputs.Rig.identity(): which keys move, within which bounds
    tiny_vae: str | None = None    # the tiny VAE SDS encodes with; None: the model's own VAE

    def describe_mismatch(self, other: dict) -> str | None:
        if other.get("components") != self.components or other.get("bundle") != self.bundle:
            return "it was made for another morphable model; resume with the same bundle"
        if other.get("model") != self.model:
            return f"it was made with model {other.get('model')!r}, not {self.model!r}; resume with the same model"
        if other.get("tiny_vae") != self.tiny_vae:
            def encoder(name) -> str:
                return f"the tiny VAE {name!r}" if name else "the model's own VAE"
            return (f"it was made encoding with {encoder(other.get('tiny_vae'))}, not {encoder(self.tiny_vae)}; "
                    "resume with the same --vae and --vae-model")
        if (other.get("prompt"), other.get("negative_prompt")) != (self.prompt, self.negative_prompt):
            return f"it was made for prompt {other.get('prompt')!r}, not {self.prompt!r}"
        saved = other.get("config") if isinstance(other.get("config"), dict) else {}
        changed = sorted(k for k, v in self.config.items() if saved.get(k) != v)
        if changed:
            return f"it was made with a different config ({', '.join(changed)}); resume with the same settings"
        if other.get("rig") != self.rig:
            return "it was made with other keys to fit or other bounds; resume with the same ones"
        return None


@dataclass(frozen=True)
class Expected:
    """What the resuming fit can continue from: its stages, the steps of each, the shapes of its
    texture levels, and the bounds of its coordinates u."""

    stages: tuple[str, ...]
    steps: dict[str, int]
    texture_shapes: tuple[tuple[int, ...], ...]
    u_low: tuple[float, ...]
    u_high: tuple[float, ...]

    @classmethod
    def of(cls, config: FitConfig, rig: Rig) -> "Expected":
        """What a checkpoint of a fit with this config and rig must hold."""
        low, high = rig.coordinate_bounds()
        return cls(stages=config.stages, steps={stage: config.steps_of(stage) for stage in config.stages},
                   texture_shapes=tuple((1, side, side, 3) for side in texture_level_sides(config)),
                   u_low=low, u_high=high)


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from; the message names the file and the reason."""


def save(path: str | Path, identity: Identity, state: FitState) -> Path:
    """Write atomically: a crash or a full disk never leaves a broken checkpoint behind."""
    import torch
    from safetensors.torch import save as to_bytes

    tensors: dict[str, torch.Tensor] = {
        "weights": state.weights.detach().float().cpu(),
        "generator": state.generator_state.cpu(),
        "losses": torch.tensor(state.losses, dtype=torch.float64),
    }
    for index, level in enumerate(state.texture_levels or []):
        tensors[f"texture.{index}"] = level.detach().float().cpu()
    for param, values in (state.optimizer_state or {}).items():
        for name in _OPTIMIZER_KEYS:
            tensors[f"optimizer.{param}.{name}"] = torch.as_tensor(values[name]).float().cpu()
    for index, snapshot in enumerate(state.snapshots):
        tensors[f"snapshot.{index}.weights"] = torch.from_numpy(np.ascontiguousarray(snapshot.weights, np.float32))
        if snapshot.texture is not None:
            tensors[f"snapshot.{index}.texture"] = torch.from_numpy(np.ascontiguousarray(snapshot.texture, np.uint8))
    header = {
        "version": VERSION, "identity": {
            "config": identity.config, "prompt": identity.prompt, "negative_prompt": identity.negative_prompt,
            "model": identity.model, "bundle": identity.bundle, "components": identity.components,
            "rig": identity.rig, "tiny_vae": identity.tiny_vae},
        "stage_index": state.stage_index, "step": state.step, "skipped_steps": state.skipped_steps,
        "texture_levels": len(state.texture_levels or []),
        "snapshot_iterations": [s.iteration for s in state.snapshots],
    }
    data = to_bytes({k: v.contiguous() for k, v in tensors.items()},
                    metadata={_KEY: json.dumps(header, allow_nan=False)})
    return atomic_write(Path(path), data)


@dataclass
class CheckpointData:
    """A checked checkpoint as numpy arrays (see `read`)."""

    stage_index: int
    step: int
    skipped_steps: int
    weights: np.ndarray
    generator: np.ndarray
    losses: np.ndarray
    texture_levels: list[np.ndarray] | None
    optimizer: dict[int, dict[str, np.ndarray]] | None
    snapshots: list[Snapshot]


def _metadata(data: bytes) -> Any:
    """The JSON of our metadata entry in a safetensors header (parsed with the strict JSON reader)."""
    if len(data) < 8:
        raise ValueError("the file is too short for a safetensors header")
    (length,) = struct.unpack_from("<Q", data, 0)
    if length > len(data) - 8:
        raise ValueError("its header runs past the end of the file")
    try:
        header = parse_json(data[8:8 + length], "the safetensors header")
        return parse_json(header["__metadata__"][_KEY], "the checkpoint's metadata")
    except (KeyError, TypeError, InputError) as exc:
        raise ValueError(f"no SDS Head metadata ({exc})") from None


def read(path: str | Path, identity: Identity, expected: Expected) -> CheckpointData:
    """The checkpoint at `path`, every field checked against the resuming fit (numpy only)."""
    path = Path(path)

    def fail(reason: str) -> CheckpointError:
        return CheckpointError(f"checkpoint {path}: {reason}")

    if path.suffix == ".pt":
        raise fail("a pickled checkpoint of an earlier release; it is not opened (loading a pickle can run "
                   "code). Start the fit again without --resume")
    try:
        check_input_file(path, "checkpoint", MAX_BYTES)
        data = path.read_bytes()
        header = _metadata(data)
    except (InputError, OSError, ValueError) as exc:
        raise fail(f"not a readable SDS Head checkpoint ({exc})") from None
    if not isinstance(header, dict) or header.get("version") != VERSION:
        found = header.get("version") if isinstance(header, dict) else None
        raise fail(f"not an SDS Head checkpoint of version {VERSION} (found version {found!r})")
    saved = header.get("identity")
    mismatch = identity.describe_mismatch(saved) if isinstance(saved, dict) else "it has no identity record"
    if mismatch:
        raise fail(mismatch)
    from safetensors import SafetensorError
    from safetensors.numpy import load as from_bytes

    try:
        tensors = from_bytes(data)
    except (SafetensorError, ValueError, RuntimeError, TypeError) as exc:
        raise fail(f"its tensors cannot be read ({type(exc).__name__}: {str(exc)[:200]})") from None

    def integer(name: str, low: int, high: int) -> int:
        value = header.get(name)
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise fail(f"'{name}' must be an integer in [{low}, {high}], got {value!r}")
        return value

    def tensor(name: str, dtype, shape: tuple[int, ...] | None = None, finite: bool = True) -> np.ndarray:
        value = tensors.get(name)
        if value is None:
            raise fail(f"tensor '{name}' is missing")
        if value.dtype != dtype or (shape is not None and tuple(value.shape) != tuple(shape)):
            raise fail(f"tensor '{name}' must be {np.dtype(dtype)} {list(shape) if shape is not None else ''}, got "
                       f"{value.dtype} {list(value.shape)}")
        if finite and value.dtype.kind == "f" and not np.isfinite(value).all():
            raise fail(f"tensor '{name}' contains NaN or inf")
        return value

    stages = expected.stages
    stage_index = integer("stage_index", 0, len(stages))
    current = stages[stage_index] if stage_index < len(stages) else None
    step = integer("step", 0, expected.steps[current] if current else 0)
    skipped = integer("skipped_steps", 0, 10 ** 9)
    weights = tensor("weights", np.float32, (identity.components,))
    low, high = np.asarray(expected.u_low, np.float32), np.asarray(expected.u_high, np.float32)
    if ((weights < low) | (weights > high)).any():
        raise fail("its weights lie outside the bounds of this fit's components")
    generator = tensor("generator", np.uint8, (GENERATOR_STATE_BYTES,))
    losses = tensor("losses", np.float64, finite=False)
    if losses.ndim != 1:
        raise fail("tensor 'losses' must be 1-D")
    level_count = integer("texture_levels", 0, 64)
    texture_levels = None
    if level_count:
        texture_levels = [tensor(f"texture.{i}", np.float32) for i in range(level_count)]
        if tuple(tuple(t.shape) for t in texture_levels) != tuple(expected.texture_shapes):
            raise fail("its texture levels do not match this fit's texture size and parametrisation")
    if current == "shape":
        param_shapes = [tuple(weights.shape)]
    else:
        param_shapes = [tuple(shape) for shape in expected.texture_shapes]
    optimizer = _optimizer_state(tensors, param_shapes, fail)
    iterations = header.get("snapshot_iterations")
    if not isinstance(iterations, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in iterations):
        raise fail("'snapshot_iterations' must be a list of integers")
    snapshots = []
    for index, iteration in enumerate(iterations):
        snapshot_weights = tensor(f"snapshot.{index}.weights", np.float32, (identity.components,))
        texture = tensors.get(f"snapshot.{index}.texture")
        if texture is not None and (texture.dtype != np.uint8 or texture.ndim != 3 or texture.shape[2] != 3):
            raise fail(f"tensor 'snapshot.{index}.texture' must be uint8 [h, w, 3]")
        snapshots.append(Snapshot(iteration, snapshot_weights, texture))
    return CheckpointData(stage_index, step, skipped, weights, generator, losses, texture_levels, optimizer, snapshots)


def _optimizer_state(tensors: dict[str, np.ndarray], param_shapes: list[tuple[int, ...]],
                     fail) -> dict[int, dict[str, np.ndarray]] | None:
    """The per-parameter statistics optimizer.<param>.<name>, checked against the parameters they are
    for: all three of each, finite, step a whole count >= 1, exp_avg_sq >= 0."""
    state: dict[int, dict[str, np.ndarray]] = {}
    for name, value in tensors.items():
        if not name.startswith("optimizer."):
            continue
        _, param, key = (name.split(".", 2) + ["", ""])[:3]
        if not param.isdigit() or int(param) >= len(param_shapes) or key not in _OPTIMIZER_KEYS:
            raise fail(f"tensor '{name}' is not optimizer state of this fit")
        expected = () if key == "step" else param_shapes[int(param)]
        if tuple(value.shape) != expected or value.dtype != np.float32 or not np.isfinite(value).all():
            raise fail(f"tensor '{name}' must be finite float32 of shape {list(expected)}, got {value.dtype} "
                       f"{list(value.shape)}")
        if key == "step" and not (value >= 1 and float(value).is_integer()):
            raise fail(f"tensor '{name}' must count steps (a whole number >= 1), got {float(value)}")
        if key == "exp_avg_sq" and (value < 0).any():
            raise fail(f"tensor '{name}' must not be negative")
        state.setdefault(int(param), {})[key] = value
    if not state:
        return None
    incomplete = [param for param in range(len(param_shapes)) if set(state.get(param, {})) != set(_OPTIMIZER_KEYS)]
    if incomplete:
        raise fail(f"its optimizer state lacks {', '.join(_OPTIMIZER_KEYS)} for parameter(s) {incomplete}")
    return state


def load(path: str | Path, identity: Identity, expected: Expected, device: "torch.device") -> FitState:
    """The state saved at `path` (checked by `read`), as tensors on `device`."""
    import torch

    data = read(path, identity, expected)
    generator = torch.from_numpy(data.generator.copy())
    try:
        torch.Generator().set_state(generator)
    except RuntimeError as exc:
        raise CheckpointError(f"checkpoint {path}: its random generator state is not valid ({exc})") from None
    optimizer = None if data.optimizer is None else {
        param: {name: torch.from_numpy(value.copy()).to(device) if name != "step" else torch.tensor(float(value))
                for name, value in values.items()} for param, values in data.optimizer.items()}
    return FitState(
        stage_index=data.stage_index, step=data.step, weights=torch.from_numpy(data.weights.copy()).to(device),
        texture_levels=None if data.texture_levels is None else [torch.from_numpy(t.copy()).to(device)
                                                                for t in data.texture_levels],
        optimizer_state=optimizer, generator_state=generator, losses=data.losses.tolist(),
        snapshots=data.snapshots, skipped_steps=data.skipped_steps)
