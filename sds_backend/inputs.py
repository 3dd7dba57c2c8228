"""Checks of a fit's inputs that every edge runs before any heavy work, and the rig they make (stdlib only).

The command line, the stdio server and the Blender add-on (panel and headless) all send their
prompts, model names and starting weights through these functions, so each mistake gets the
same specific message wherever it is made, before a model loads. Numbers of the fit's settings
are checked by `fit_config`, files by `files`, bundles by `bundle`.
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from .files import InputError, check_path_text

DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
MODEL_ENV = "SDS_HEAD_MODEL"
DEFAULT_TINY_VAE = "madebyollin/taesd"      # TAESD: SD 1.x and 2.x share its latent space
TINY_VAE_ENV = "SDS_HEAD_TINY_VAE"
MAX_PROMPT_CHARS = 2000
MAX_WEIGHT = 1000.0          # |initial weight|; the fit then clamps to its weight_clamp
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
MODEL_FOLDER_HINT = ("give a local diffusers Stable Diffusion folder (model_index.json, unet/, vae/, ...) or a hub "
                     "id such as 'stable-diffusion-v1-5/stable-diffusion-v1-5'")
TINY_VAE_FOLDER_HINT = ("give a local diffusers AutoencoderTiny folder (config.json and its weights) or a hub id "
                        f"such as '{DEFAULT_TINY_VAE}'")
# what a folder of each kind of model source must hold, and what to do instead
_SOURCES = {"model": ("model_index.json", "a diffusers pipeline folder", MODEL_FOLDER_HINT),
            "vae_model": ("config.json", "a diffusers model folder", TINY_VAE_FOLDER_HINT)}


class ModelSourceError(InputError):
    """A model name that can be seen to be wrong before loading: not valid text, no such folder, not a
    pipeline folder."""


def check_text(value: Any, what: str, max_chars: int) -> str:
    """A text that can be encoded as UTF-8 (no lone surrogates), at most `max_chars` long."""
    if not isinstance(value, str):
        raise InputError(f"{what}: expected a text, got {type(value).__name__}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InputError(f"{what}: contains {value[exc.start:exc.end]!r} at position {exc.start}, which is not "
                         "valid text (a lone UTF-16 surrogate, or bytes that were not UTF-8)") from None
    if len(value) > max_chars:
        raise InputError(f"{what}: expected at most {max_chars} characters, got {len(value)}")
    return value


def check_prompt(prompt: Any, negative_prompt: Any = "") -> tuple[str, str]:
    """The prompt (non-empty) and negative prompt, each valid text of at most MAX_PROMPT_CHARS."""
    if isinstance(prompt, str) and not prompt.strip():
        raise InputError("Prompt is empty: describe the head to fit, e.g. 'an old sailor with a big nose'")
    return (check_text(prompt, "prompt", MAX_PROMPT_CHARS),
            check_text(negative_prompt, "negative_prompt", MAX_PROMPT_CHARS))


def looks_like_path(model: str) -> bool:
    """A local folder rather than a hub id ('owner/name')."""
    return (os.path.isabs(os.path.expanduser(model)) or model.startswith((".", "~"))
            or os.path.isdir(model) or "\\" in model or not HUB_ID.fullmatch(model))


def check_model_source(model: Any, what: str = "model") -> str | None:
    """None (the default), a hub id, or a folder that exists and holds what a model of its kind
    needs: `what` is "model" (a Stable Diffusion pipeline) or "vae_model" (an AutoencoderTiny)."""
    marker, kind, hint = _SOURCES[what]
    if model is None or (isinstance(model, str) and not model.strip()):
        return None
    try:
        model = check_text(model, what, 4096).strip()
        if not looks_like_path(model):
            return model
        check_path_text(model, what)
    except InputError as exc:
        raise ModelSourceError(str(exc)) from None
    folder = os.path.expanduser(model)
    if not os.path.isdir(folder):
        state = "not a folder" if os.path.exists(folder) else "not found"
        raise ModelSourceError(f"{what}: folder {folder} {state}; {hint}")
    if not os.path.isfile(os.path.join(folder, marker)):
        raise ModelSourceError(f"{what}: folder {folder} has no {marker}, so it is not {kind}; {hint}")
    return model


def default_model_id() -> str:
    """$SDS_HEAD_MODEL if set, else the SD 1.5 mirror."""
    return os.environ.get(MODEL_ENV) or DEFAULT_MODEL


def default_tiny_vae_id() -> str:
    """$SDS_HEAD_TINY_VAE if set, else TAESD."""
    return os.environ.get(TINY_VAE_ENV) or DEFAULT_TINY_VAE


def model_identity(model: str | None) -> str:
    """The name a loaded model goes by (checkpoints record it): the hub id, or the folder's path."""
    model = model or default_model_id()
    return str(os.path.expanduser(model)) if looks_like_path(model) else model


def check_weight(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or abs(value) > MAX_WEIGHT:
        raise InputError(f"{what}: expected a number in [-{MAX_WEIGHT:g}, {MAX_WEIGHT:g}], got {value!r}")
    return float(value)


def weights_by_name(mapping: Any, names: Sequence[str], what: str = "initial weights") -> list[float]:
    """Weights from a {component name: weight} object (a weights.json), in the bundle's order.

    Components it does not name start at 0; a name the bundle does not have is an error (a
    weights.json of another head would otherwise apply by accident).
    """
    if not isinstance(mapping, Mapping):
        raise InputError(f"{what}: expected an object of component name -> weight, got {type(mapping).__name__}")
    unknown = [str(key) for key in mapping if key not in names]
    if unknown:
        shown = ", ".join(repr(name) for name in unknown[:5]) + (" ..." if len(unknown) > 5 else "")
        raise InputError(f"{what}: {len(unknown)} name(s) the head does not have: {shown}")
    return [check_weight(mapping[name], f"{what}[{name!r}]") if name in mapping else 0.0 for name in names]


# ------------------------------------------------------------------------------------------- rigs
@dataclass(frozen=True)
class Rig:
    """How each component of a fit may move, one entry per component in the bundle's order.

    The fit optimises u, with weight = centre + scale * u, and puts its L2 prior on u:
      start      the weight the fit starts from
      centre     the prior's centre: 0 (the model's mean) for a component without bounds, its
                 start for one with bounds (a rig's key: the value the artist dialled in)
      scale      the prior's and the optimiser's unit: 1 (one standard deviation) without bounds,
                 (high - low) / 6 with bounds (the range then spans six units, like +-3 sigma), and
                 0 for a component that is not fitted: it stays at its start, bit for bit
      low, high  the weight's bounds: +-weight_clamp without bounds, else the given range
    """

    start: tuple[float, ...]
    centre: tuple[float, ...]
    scale: tuple[float, ...]
    low: tuple[float, ...]
    high: tuple[float, ...]

    def identity(self) -> dict[str, list[float]]:
        """What a checkpoint must match to resume (the start no longer matters then)."""
        return {"centre": list(self.centre), "scale": list(self.scale), "low": list(self.low), "high": list(self.high)}

    def coordinate_bounds(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """The bounds of the fit's coordinates u: (low - centre) / scale and (high - centre) / scale,
        (0, 0) for a key that is not fitted."""
        low = tuple((lo - c) / s if s > 0 else 0.0 for lo, c, s in zip(self.low, self.centre, self.scale))
        high = tuple((hi - c) / s if s > 0 else 0.0 for hi, c, s in zip(self.high, self.centre, self.scale))
        return low, high


def _unknown(names: Sequence[str], known: Sequence[str], what: str) -> None:
    missing = [str(name) for name in names if name not in known]
    if missing:
        shown = ", ".join(repr(name) for name in missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise InputError(f"{what}: {len(missing)} name(s) the head does not have: {shown}")


def make_rig(names: Sequence[str], start: Sequence[float] | None = None, keys: Sequence[str] | None = None,
             bounds: Mapping[str, Sequence[float]] | None = None, weight_clamp: float = 3.0) -> Rig:
    """The rig of a fit: `keys` are the components to fit (None: all), `bounds` name -> [low, high]
    ranges (a rig's sliders). A start outside its bounds is an error; without bounds it is clamped
    to +-weight_clamp, as the fit has always done."""
    count = len(names)
    if start is not None and len(start) != count:
        raise InputError(f"initial_weights: expected {count} values (one per component of the bundle), got {len(start)}")
    start = [0.0] * count if start is None else [
        check_weight(w, f"initial_weights[{i}] ({name})") for i, (w, name) in enumerate(zip(start, names))]
    fitted = set(names)
    if keys is not None:
        _unknown(keys, names, "keys")
        fitted = set(keys)
        if not fitted:
            raise InputError("keys: no component left to fit (give at least one name, or null for all)")
    bounds = dict(bounds or {})
    _unknown(list(bounds), names, "bounds")
    rows = []
    for k, name in enumerate(names):
        if name in bounds:
            pair = bounds[name]
            if not isinstance(pair, (list, tuple)) or len(pair) != 2:
                raise InputError(f"bounds[{name!r}]: expected [low, high], got {pair!r}")
            low, high = (check_weight(v, f"bounds[{name!r}]") for v in pair)
            if not low < high:
                raise InputError(f"bounds[{name!r}]: expected low < high, got [{low:g}, {high:g}]")
            if not low <= start[k] <= high:
                raise InputError(f"initial_weights[{k}] ({name}) = {start[k]:g} lies outside its bounds "
                                 f"[{low:g}, {high:g}]")
            row = (start[k], start[k], (high - low) / 6, low, high)
        else:
            value = min(max(start[k], -weight_clamp), weight_clamp)
            row = (value, 0.0, 1.0, -weight_clamp, weight_clamp)
        if name not in fitted:
            row = (start[k], start[k], 0.0, start[k], start[k])      # kept as it starts
        rows.append(row)
    return Rig(*(tuple(column) for column in zip(*rows))) if rows else Rig((), (), (), (), ())
