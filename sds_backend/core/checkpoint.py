"""A fit's resumable state, and checkpoints of it that hold only data (tensors + JSON, safetensors).

Nothing in a checkpoint can run code: a safetensors file is a JSON header and raw tensor bytes,
and loading parses only those (no pickle). Before any of it is used, every field is checked
against what the resuming fit expects (names, shapes, dtypes, finite values, the same prompt,
model, bundle and settings): a truncated, foreign or tampered file gets a message naming what is
wrong. A `checkpoint.pt` from an earlier release (a pickle) is refused without being opened.

`check_resumable` reads only the JSON header (no torch import, milliseconds): the command line
refuses a checkpoint of another fit before it loads a model; `load` then checks the tensors.

Layout: metadata "sds_head" is JSON {version, identity (config, prompt, negative_prompt, model,
bundle, components), stage_index, step, skipped_steps, snapshot_iterations, optimizer groups};
tensors: weights [K], texture.<i> (the texture levels), generator (CPU generator state),
losses float64 [N], optimizer.<param>.<name>, snapshot.<n>.weights [K], snapshot.<n>.texture.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..files import InputError, atomic_write, check_input_file, parse_json

if TYPE_CHECKING:
    import torch

VERSION = 2
MAX_BYTES = 1 << 30
_KEY = "sds_head"
_OPTIMIZER_KEYS = ("step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq")


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
    weights: torch.Tensor                       # [K]
    texture_levels: list[torch.Tensor] | None   # texture parameters once the texture stage started
    optimizer_state: dict | None                # of the current stage
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

    def describe_mismatch(self, other: dict) -> str | None:
        if other.get("components") != self.components or other.get("bundle") != self.bundle:
            return "it was made for another morphable model; resume with the same bundle"
        if other.get("model") != self.model:
            return f"it was made with model {other.get('model')!r}, not {self.model!r}; resume with the same model"
        if (other.get("prompt"), other.get("negative_prompt")) != (self.prompt, self.negative_prompt):
            return f"it was made for prompt {other.get('prompt')!r}, not {self.prompt!r}"
        saved = other.get("config") if isinstance(other.get("config"), dict) else {}
        changed = sorted(k for k, v in self.config.items() if saved.get(k) != v)
        if changed:
            return f"it was made with a different config ({', '.join(changed)}); resume with the same settings"
        if other.get("rig") != self.rig:
            return "it was made with other keys to fit or other bounds; resume with the same ones"
        return None


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
    groups = None
    if state.optimizer_state is not None:
        groups = state.optimizer_state["param_groups"]
        for param, values in state.optimizer_state["state"].items():
            for name, value in values.items():
                tensors[f"optimizer.{param}.{name}"] = torch.as_tensor(value).cpu()
    for index, snapshot in enumerate(state.snapshots):
        tensors[f"snapshot.{index}.weights"] = torch.from_numpy(np.ascontiguousarray(snapshot.weights, np.float32))
        if snapshot.texture is not None:
            tensors[f"snapshot.{index}.texture"] = torch.from_numpy(np.ascontiguousarray(snapshot.texture, np.uint8))
    header = {
        "version": VERSION, "identity": {
            "config": identity.config, "prompt": identity.prompt, "negative_prompt": identity.negative_prompt,
            "model": identity.model, "bundle": identity.bundle, "components": identity.components,
            "rig": identity.rig},
        "stage_index": state.stage_index, "step": state.step, "skipped_steps": state.skipped_steps,
        "texture_levels": len(state.texture_levels or []),
        "snapshot_iterations": [s.iteration for s in state.snapshots], "optimizer_groups": groups,
    }
    data = to_bytes({k: v.contiguous() for k, v in tensors.items()},
                    metadata={_KEY: json.dumps(header, allow_nan=False)})
    return atomic_write(Path(path), data)


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from; the message names the file and the reason."""


def _read(path: Path) -> tuple[bytes, dict]:
    """The file's bytes and its SDS Head header, checked for version and kind."""
    if path.suffix == ".pt":
        raise CheckpointError(f"checkpoint {path}: a pickled checkpoint of an earlier release; it is not opened "
                              "(loading a pickle can run code). Start the fit again without --resume")
    try:
        check_input_file(path, "checkpoint", MAX_BYTES)
        data = path.read_bytes()
        header = _metadata(data)
    except (InputError, OSError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {path}: not a readable SDS Head checkpoint ({exc})") from None
    if not isinstance(header, dict) or header.get("version") != VERSION:
        found = header.get("version") if isinstance(header, dict) else None
        raise CheckpointError(f"checkpoint {path}: not an SDS Head checkpoint of version {VERSION} "
                              f"(found version {found!r})")
    return data, header


def check_resumable(path: str | Path, identity: Identity) -> None:
    """CheckpointError unless `path` is a checkpoint made for `identity` (reads the header only)."""
    path = Path(path)
    _, header = _read(path)
    saved = header.get("identity")
    mismatch = identity.describe_mismatch(saved) if isinstance(saved, dict) else "it has no identity record"
    if mismatch:
        raise CheckpointError(f"checkpoint {path}: {mismatch}")


def load(path: str | Path, identity: Identity, stages: tuple[str, ...], steps: dict[str, int],
         expected_texture: tuple[tuple[int, ...], ...], device: "torch.device") -> FitState:
    """The state saved in `path`, checked against the fit that resumes it.

    stages/steps: the resuming fit's stages and steps per stage; expected_texture: the shapes of
    its texture levels.
    """
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load as from_bytes

    path = Path(path)
    check_resumable(path, identity)
    data, header = _read(path)

    def fail(reason: str) -> CheckpointError:
        return CheckpointError(f"checkpoint {path}: {reason}")

    try:
        tensors = from_bytes(data)
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise fail(f"its tensors cannot be read ({type(exc).__name__}: {str(exc)[:200]})") from None

    def integer(name: str, low: int, high: int) -> int:
        value = header.get(name)
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise fail(f"'{name}' must be an integer in [{low}, {high}], got {value!r}")
        return value

    def tensor(name: str, dtype: torch.dtype, shape: tuple[int, ...] | None = None) -> torch.Tensor:
        value = tensors.get(name)
        if value is None:
            raise fail(f"tensor '{name}' is missing")
        if value.dtype != dtype or (shape is not None and tuple(value.shape) != tuple(shape)):
            raise fail(f"tensor '{name}' must be {dtype} {list(shape) if shape else ''}, got {value.dtype} "
                       f"{list(value.shape)}")
        if value.is_floating_point() and not bool(torch.isfinite(value).all()) and name != "losses":
            raise fail(f"tensor '{name}' contains NaN or inf")
        return value

    stage_index = integer("stage_index", 0, len(stages))
    current = stages[stage_index] if stage_index < len(stages) else None
    step = integer("step", 0, steps[current] if current else 0)
    skipped = integer("skipped_steps", 0, 10 ** 9)
    level_count = integer("texture_levels", 0, 64)
    weights = tensor("weights", torch.float32, (identity.components,))
    generator = tensor("generator", torch.uint8, tuple(torch.Generator().get_state().shape))
    losses = tensor("losses", torch.float64)
    if losses.ndim != 1:
        raise fail("tensor 'losses' must be 1-D")
    texture_levels = None
    if level_count:
        texture_levels = [tensor(f"texture.{i}", torch.float32) for i in range(level_count)]
        if tuple(tuple(t.shape) for t in texture_levels) != tuple(expected_texture):
            raise fail("its texture levels do not match this fit's texture size and parametrisation")
        texture_levels = [t.to(device) for t in texture_levels]
    param_shapes = [tuple(weights.shape)] if current == "shape" else [tuple(s) for s in expected_texture]
    optimizer_state = _optimizer_state(header.get("optimizer_groups"), tensors, param_shapes, fail)
    iterations = header.get("snapshot_iterations")
    if not isinstance(iterations, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in iterations):
        raise fail("'snapshot_iterations' must be a list of integers")
    snapshots = []
    for index, iteration in enumerate(iterations):
        snap_weights = tensor(f"snapshot.{index}.weights", torch.float32, (identity.components,))
        texture = tensors.get(f"snapshot.{index}.texture")
        if texture is not None and (texture.dtype != torch.uint8 or texture.ndim != 3 or texture.shape[2] != 3):
            raise fail(f"tensor 'snapshot.{index}.texture' must be uint8 [h, w, 3]")
        snapshots.append(Snapshot(iteration, snap_weights.numpy(), None if texture is None else texture.numpy()))
    return FitState(stage_index=stage_index, step=step, weights=weights.to(device), texture_levels=texture_levels,
                    optimizer_state=optimizer_state, generator_state=generator, losses=losses.tolist(),
                    snapshots=snapshots, skipped_steps=skipped)


def _metadata(data: bytes) -> Any:
    """The JSON of our metadata entry in a safetensors header (parsed with the strict JSON reader)."""
    import struct

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


def _optimizer_state(groups: Any, tensors: dict[str, "torch.Tensor"], param_shapes: list[tuple[int, ...]],
                     fail) -> dict | None:
    """The optimizer's state_dict from its JSON param groups and its optimizer.<param>.<name> tensors,
    checked against the shapes of the parameters it will be loaded for."""
    import torch

    if groups is None:
        return None
    if not isinstance(groups, list) or not all(isinstance(g, dict) and isinstance(g.get("params"), list)
                                               for g in groups):
        raise fail("'optimizer_groups' must be a list of parameter groups")
    params = [p for g in groups for p in g["params"]]
    if params != list(range(len(param_shapes))):
        raise fail(f"its optimizer holds parameters {params!r}; this stage has {len(param_shapes)}")
    for group in groups:
        if isinstance(group.get("betas"), list):
            group["betas"] = tuple(group["betas"])
    state: dict[int, dict[str, "torch.Tensor"]] = {}
    for name, value in tensors.items():
        if not name.startswith("optimizer."):
            continue
        _, param, key = (name.split(".", 2) + ["", ""])[:3]
        if not param.isdigit() or int(param) >= len(param_shapes) or key not in _OPTIMIZER_KEYS:
            raise fail(f"tensor '{name}' is not optimizer state of this fit")
        expected = () if key == "step" else param_shapes[int(param)]
        if tuple(value.shape) != expected or not value.is_floating_point() or not bool(torch.isfinite(value).all()):
            raise fail(f"tensor '{name}' must be finite floats of shape {list(expected)}, got {list(value.shape)}")
        state.setdefault(int(param), {})[key] = value
    return {"state": state, "param_groups": groups}
