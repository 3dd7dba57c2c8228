"""A fit request, checked: what the command line and the stdio server turn their input into before
anything heavy loads (stdlib and numpy only, so a bad input fails before torch is imported).

`make_request` is the one place a request's fields meet: prompt texts, model sources, bundle file,
starting weights (by position from the protocol, by name from a weights.json) and settings.
Every failure is an InputError (a ValueError; bundle.BundleError for the bundle) whose message
names the field.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from .. import DEFAULT_BUNDLE, bundle
from ..files import InputError, check_path_text
from ..fit_config import FitConfig
from ..inputs import Rig, check_model_source, check_prompt, default_tiny_vae_id, make_rig, model_identity, weights_by_name
from ..protocol import OUTPUT_NAMES

# protocol output name -> file in the output folder
OUTPUT_FILES = {"weights": "weights.json", "texture": "texture.png", "gif": "evolution.gif", "glb": "head.glb",
                "fit": "fit.json", "checkpoint": "checkpoint.safetensors"}
LEGACY_CHECKPOINT = "checkpoint.pt"      # release 0.1's pickled checkpoint: recognised, never loaded
# every file a fit may leave in its folder: a folder holding one holds another fit's outputs
FIT_FILES = (*OUTPUT_FILES.values(), LEGACY_CHECKPOINT)


@dataclass(frozen=True)
class FitRequest:
    prompt: str
    negative_prompt: str
    model: str | None                        # hub id or folder; None = $SDS_HEAD_MODEL or SD 1.5
    vae_model: str | None                    # the AutoencoderTiny of config.vae "tiny"; None = its default
    bundle: bundle.Bundle
    bundle_path: str                         # where the bundle came from (recorded in fit.json)
    rig: Rig                                 # start, bounds and prior of each component
    config: FitConfig
    outputs: tuple[str, ...] = OUTPUT_NAMES  # which outputs to write (protocol.OUTPUT_NAMES)
    export_expressions: bool = False         # add the bundle's expression targets to head.glb

    @property
    def tiny_vae(self) -> str | None:
        """The tiny VAE's identity when config.vae is "tiny", else None (the model's own VAE)."""
        return model_identity(self.vae_model or default_tiny_vae_id()) if self.config.vae == "tiny" else None


def make_request(prompt: Any, negative_prompt: Any = "", model: Any = None, bundle_path: Any = None,
                 initial_weights: Sequence[Any] | None = None, weights_json: Mapping[str, Any] | None = None,
                 keys: Sequence[str] | None = None, bounds: Mapping[str, Sequence[float]] | None = None,
                 config: FitConfig | dict | None = None, outputs: Sequence[str] | None = None,
                 export_expressions: bool = False, vae_model: Any = None) -> FitRequest:
    """Check every field and load the bundle; `initial_weights` (one per component) and
    `weights_json` ({name: weight}) are two ways to give the starting weights (at most one);
    `keys` and `bounds` make the rig (inputs.make_rig); `vae_model` is the tiny VAE of
    config.vae "tiny" (None: $SDS_HEAD_TINY_VAE or TAESD)."""
    prompt, negative_prompt = check_prompt(prompt, negative_prompt)
    prompt, negative_prompt = prompt.strip(), negative_prompt.strip()
    model = check_model_source(model)
    if not isinstance(config, FitConfig):
        config = FitConfig.from_dict(config or {})
    vae_model = check_model_source(vae_model, "vae_model")
    if vae_model is not None and config.vae != "tiny":
        raise InputError(f"vae_model: {vae_model!r} is a tiny VAE, and config.vae is {config.vae!r}; "
                         "set vae to 'tiny' (--vae tiny) to encode with it")
    path = Path(check_path_text(bundle_path, "bundle")).expanduser() if bundle_path else DEFAULT_BUNDLE
    head = bundle.load(path)
    if initial_weights is not None and weights_json is not None:
        raise InputError("initial_weights: give the starting weights once, by position or by name")
    if weights_json is not None:
        initial_weights = weights_by_name(weights_json, head.names, "--initial-weights")
    rig = make_rig(head.names, initial_weights, keys, bounds, config.weight_clamp)
    if "texture" in config.stages and not head.uv.any():
        raise InputError("stages: the texture stage needs UV coordinates, and this mesh has none")
    unknown = [name for name in outputs or () if name not in OUTPUT_NAMES]
    if unknown:
        raise InputError(f"outputs: unknown output(s) {', '.join(unknown)}; expected some of {', '.join(OUTPUT_NAMES)}")
    return FitRequest(prompt=prompt, negative_prompt=negative_prompt, model=model, vae_model=vae_model, bundle=head,
                      bundle_path=str(path), rig=rig, config=config,
                      outputs=OUTPUT_NAMES if outputs is None else tuple(outputs),
                      export_expressions=bool(export_expressions))
