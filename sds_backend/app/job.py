"""One fit job from a checked request to files on disk, shared by the CLI and the stdio server.

`Backend` keeps what is expensive to load (the diffusion model) across jobs, so a long-running
server pays for a model once. `Backend.prepare` loads what a request needs; `PreparedJob.run` fits
and `write_outputs` writes the requested files into an `OutputSet`'s staging folder, which the
caller commits (so a folder never holds half of a fit's outputs).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .. import __version__
from ..core import export
from ..core.fit import FitEvent, Fitter, FitResult
from ..core.guidance import (DiffusionModel, GuidanceConfig, ModelLoadError, StableDiffusionGuidance, default_model_id,
                             load_model, resolve_dtype)
from ..files import OutputSet
from .request import OUTPUT_FILES, FitRequest

log = logging.getLogger("sds_backend")


@dataclass
class JobResult:
    result: FitResult
    outputs: dict[str, str]                  # name -> path


class Backend:
    """The loaded diffusion model for one device, reused across jobs."""

    def __init__(self, device: torch.device, models: dict[tuple, DiffusionModel] | None = None):
        self.device = device
        self._models: dict[tuple, DiffusionModel] = dict(models or {})

    def diffusion_model(self, model: str | None, tiny_vae: str | None = None, dtype: str = "auto") -> DiffusionModel:
        """Load (once) the diffusion model in `dtype`, with the tiny VAE `tiny_vae` instead of its
        own one; raises guidance.ModelLoadError with advice."""
        try:
            weights_dtype = resolve_dtype(dtype, self.device)
        except ValueError as exc:
            raise ModelLoadError(f"{exc}: float16 needs a GPU (CUDA or MPS)") from None
        key = (model or default_model_id(), tiny_vae, weights_dtype)
        if key not in self._models:
            # one model at a time: drop the previous one first so two never share the accelerator
            self._models.clear()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            log.info("loading diffusion model %s%s on %s", key[0], f" with tiny VAE {tiny_vae}" if tiny_vae else "",
                     self.device)
            self._models[key] = load_model(key[0], weights_dtype, self.device, tiny_vae=tiny_vae)
        return self._models[key]

    def prepare(self, request: FitRequest, checkpoint_path: Path | None = None, resume: bool = False) -> "PreparedJob":
        """Load the model the request needs and, with `resume`, the state saved at checkpoint_path.

        Raises guidance.ModelLoadError, or checkpoint.CheckpointError for a checkpoint that cannot be
        resumed from.
        """
        diffusion = self.diffusion_model(request.model, request.tiny_vae, request.config.dtype)
        unet_parameters = sum(p.numel() for p in diffusion.unet.parameters())
        if self.device.type == "cpu" and unet_parameters > 100_000_000:
            log.warning("running a %.0fM-parameter UNet on the CPU: expect tens of seconds per iteration "
                        "(a CUDA GPU is the intended target)", unet_parameters / 1e6)
        guidance = StableDiffusionGuidance(diffusion, GuidanceConfig(model=diffusion.model_id, tiny_vae=diffusion.tiny_vae,
                                                                     compile=request.config.compile))
        fitter = Fitter(request.bundle, guidance, request.config, self.device, rig=request.rig)
        state = None
        if resume and checkpoint_path is not None and checkpoint_path.exists():
            state = fitter.load_checkpoint(checkpoint_path, request.prompt, request.negative_prompt)
            log.info("resuming from %s at stage %d, step %d", checkpoint_path, state.stage_index, state.step)
        return PreparedJob(request, fitter, checkpoint_path, state)


@dataclass
class PreparedJob:
    """A checked request with its model loaded: running it can only fail for internal reasons."""

    request: FitRequest
    fitter: Fitter
    checkpoint_path: Path | None
    state: object | None

    def run(self, on_event: Callable[[FitEvent], None] | None = None,
            should_stop: Callable[[], bool] | None = None) -> FitResult:
        request = self.request
        path = self.checkpoint_path if "checkpoint" in request.outputs else None
        return self.fitter.run(request.prompt, request.negative_prompt, None, on_event, should_stop, state=self.state,
                               checkpoint_path=path)


def write_outputs(outputs: OutputSet, request: FitRequest, result: FitResult, model_id: str) -> None:
    """The requested files among weights.json, texture.png (texture stage only), evolution.gif,
    head.glb and fit.json, written into the output set's staging folder."""
    wanted = set(request.outputs)
    model = request.bundle

    def path(name: str) -> Path:
        return outputs.path(OUTPUT_FILES[name])

    if "weights" in wanted:
        export.write_weights_json(path("weights"), model.names, result.weights)
    if "texture" in wanted and result.texture is not None:
        export.write_texture_png(path("texture"), result.texture)
    if "gif" in wanted:
        frames = export.resample_snapshots(result.snapshots, request.config.gif_frames)
        if not frames:   # stopped before the first snapshot: the current state, repeated
            frames = [None] * request.config.gif_frames
        export.write_evolution_gif(path("gif"), model, [
            (s.weights, s.texture) if s is not None else (result.weights, None) for s in frames])
    if "glb" in wanted:
        export.write_glb(path("glb"), model, result.weights, result.texture, request.export_expressions)
    if "fit" in wanted:
        export.write_json(path("fit"), {
            "prompt": request.prompt, "negative_prompt": request.negative_prompt, "model": model_id,
            "tiny_vae": request.tiny_vae,
            "bundle": request.bundle_path, "config": request.config.to_dict(),
            "iterations": result.iterations, "stopped": result.stopped, "seconds": round(result.seconds, 3),
            "final_loss": next((x for x in reversed(result.losses) if math.isfinite(x)), None),
            "skipped_steps": result.skipped_steps, "sds_head_version": __version__,
            "torch": torch.__version__,
            "weights": {n: float(w) for n, w in zip(model.names, np.asarray(result.weights))},
        })
