"""One fit job from request to files on disk, shared by the CLI and the stdio server.

`Backend` keeps what is expensive to load (diffusion models, bundles) across jobs, so a
long-running server pays for a model once. `Backend.run` validates the request before any
model work, runs the Fitter and writes the outputs.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from . import __version__, export
from .protocol import OUTPUT_NAMES
from .fit import FitConfig, FitEvent, Fitter, FitResult, check_prompt, load_checkpoint
from .guidance import DiffusionModel, GuidanceConfig, StableDiffusionGuidance, default_model_id, resolve_dtype, load_model
from .morphable import MorphableModel

log = logging.getLogger("sds_backend")
DEFAULT_BUNDLE = Path(__file__).resolve().parent.parent / "assets" / "default_head.npz"


def resolve_device(name: str) -> torch.device:
    """'auto' -> CUDA when torch sees a GPU, else CPU; 'cuda' without one is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"device: expected auto, cpu or cuda[:N], got {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: cuda was asked for, but torch sees no CUDA GPU here (use --device cpu or auto)")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device: expected auto, cpu or cuda[:N], got {name!r}")
    return device


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return "cpu"


@dataclass(frozen=True)
class FitRequest:
    prompt: str
    out_dir: Path
    negative_prompt: str = ""
    model: str | None = None                 # hub id or folder; None = $SDS_HEAD_MODEL or SD 1.5
    bundle: str | None = None                # .npz path; None = the default head
    initial_weights: list[float] | None = None
    config: FitConfig = field(default_factory=FitConfig)
    resume: bool = False                     # continue from out_dir/checkpoint.pt when it exists
    export_expressions: bool = False         # add the bundle's expression targets to head.glb
    outputs: tuple[str, ...] = OUTPUT_NAMES  # which files to write (protocol.OUTPUT_NAMES)


@dataclass
class JobResult:
    result: FitResult
    outputs: dict[str, str]                  # name -> path


class Backend:
    """Loaded models and bundles for one device, reused across jobs."""

    def __init__(self, device: torch.device, models: dict[str, DiffusionModel] | None = None):
        self.device = device
        self._models: dict[str, DiffusionModel] = dict(models or {})
        self._bundles: dict[tuple[str, float], MorphableModel] = {}

    def diffusion_model(self, model: str | None) -> DiffusionModel:
        """Load (once) the diffusion model; raises guidance.ModelLoadError with advice."""
        model = model or default_model_id()
        if model not in self._models:
            # one model at a time: drop the previous one first so two never share the accelerator
            self._models.clear()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            log.info("loading diffusion model %s on %s", model, self.device)
            dtype = resolve_dtype("auto", self.device)
            self._models[model] = load_model(model, dtype, self.device)
        return self._models[model]

    def bundle(self, path: str | None) -> MorphableModel:
        """Load (once per file version) a morphable bundle; raises morphable.BundleError."""
        path = Path(path).expanduser() if path else DEFAULT_BUNDLE
        key = (str(path.resolve()), path.stat().st_mtime if path.exists() else 0.0)
        if key not in self._bundles:
            self._bundles = {key: MorphableModel.load(path)}
        return self._bundles[key]

    def prepare(self, request: FitRequest) -> "PreparedJob":
        """Check the request and load what it needs; every caller mistake surfaces here.

        Raises ValueError (bad request), morphable.BundleError or guidance.ModelLoadError.
        """
        check_prompt(request.prompt, request.negative_prompt)
        model = self.bundle(request.bundle)
        if request.initial_weights is not None and len(request.initial_weights) != model.num_components:
            raise ValueError(f"initial_weights: expected {model.num_components} values (one per component of "
                             f"the bundle), got {len(request.initial_weights)}")
        if "texture" in request.config.stages and not model.uv.any():
            raise ValueError("stages: the texture stage needs UV coordinates, and this mesh has none")
        out_dir = Path(request.out_dir).expanduser()
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ValueError(f"out_dir: cannot create {out_dir}: {exc.strerror}") from None
        diffusion = self.diffusion_model(request.model)
        unet_parameters = sum(p.numel() for p in diffusion.unet.parameters())
        if self.device.type == "cpu" and unet_parameters > 100_000_000:
            log.warning("running a %.0fM-parameter UNet on the CPU: expect tens of seconds per iteration "
                        "(a CUDA GPU is the intended target)", unet_parameters / 1e6)
        guidance = StableDiffusionGuidance(diffusion, GuidanceConfig(model=diffusion.model_id,
                                                                     compile=request.config.compile))
        fitter = Fitter(model, guidance, request.config, self.device)
        checkpoint = out_dir / "checkpoint.pt"
        state = None
        if request.resume and checkpoint.exists():
            state = load_checkpoint(checkpoint, fitter, request.prompt, request.negative_prompt)
            log.info("resuming from %s at stage %d, step %d", checkpoint, state.stage_index, state.step)
        return PreparedJob(request, out_dir, model, fitter, checkpoint, state)

    def run(self, request: FitRequest, on_event: Callable[[FitEvent], None] | None = None,
            should_stop: Callable[[], bool] | None = None) -> JobResult:
        return self.prepare(request).run(on_event, should_stop)


@dataclass
class PreparedJob:
    """A checked request with its model loaded: running it can only fail for internal reasons."""

    request: FitRequest
    out_dir: Path
    model: MorphableModel
    fitter: Fitter
    checkpoint: Path
    state: object | None

    def run(self, on_event: Callable[[FitEvent], None] | None = None,
            should_stop: Callable[[], bool] | None = None) -> JobResult:
        request = self.request
        keep_checkpoint = "checkpoint" in request.outputs
        result = self.fitter.run(request.prompt, request.negative_prompt, request.initial_weights, on_event,
                                 should_stop, state=self.state, checkpoint=self.checkpoint if keep_checkpoint else None)
        outputs = write_outputs(self.out_dir, self.model, result, request, self.fitter.guidance.model.model_id)
        if keep_checkpoint:
            outputs["checkpoint"] = str(self.checkpoint)
        return JobResult(result, outputs)


def write_outputs(out_dir: Path, model: MorphableModel, result: FitResult, request: FitRequest,
                  model_id: str) -> dict[str, str]:
    """The requested files among weights.json, texture.png (texture stage only), evolution.gif,
    head.glb and fit.json; returns name -> path of those written."""
    wanted = set(request.outputs)
    written: dict[str, Path] = {}
    if "weights" in wanted:
        written["weights"] = out_dir / "weights.json"
        export.write_weights_json(written["weights"], model.names, result.weights)
    if "texture" in wanted and result.texture is not None:
        written["texture"] = out_dir / "texture.png"
        export.write_texture_png(written["texture"], result.texture)
    if "gif" in wanted:
        written["gif"] = out_dir / "evolution.gif"
        frames = export.resample_snapshots(result.snapshots, request.config.gif_frames)
        if not frames:   # stopped before the first snapshot: the current state, repeated
            frames = [None] * request.config.gif_frames
        export.write_evolution_gif(written["gif"], model, [
            (s.weights, s.texture) if s is not None else (result.weights, None) for s in frames])
    if "glb" in wanted:
        written["glb"] = out_dir / "head.glb"
        export.write_glb(written["glb"], model, result.weights, result.texture, request.export_expressions)
    if "fit" in wanted:
        written["fit"] = out_dir / "fit.json"
        export.write_json(written["fit"], {
            "prompt": request.prompt, "negative_prompt": request.negative_prompt, "model": model_id,
            "bundle": str(request.bundle or DEFAULT_BUNDLE), "config": request.config.to_dict(),
            "iterations": result.iterations, "stopped": result.stopped, "seconds": round(result.seconds, 3),
            "final_loss": next((x for x in reversed(result.losses) if math.isfinite(x)), None),
            "skipped_steps": result.skipped_steps, "sds_head_version": __version__,
            "torch": torch.__version__,
            "weights": {n: float(w) for n, w in zip(model.names, np.asarray(result.weights))},
        })
    return {name: str(path) for name, path in written.items()}
