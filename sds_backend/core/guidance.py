"""Score Distillation Sampling (SDS) guidance from a pretrained Stable Diffusion model.

DreamFusion's SDS gradient for a differentiable render x = g(θ) with latents z = E(x):

    ∇_θ L_SDS = E_{t,ε} [ w(t) (ε̂_φ(z_t; y, t) − ε) ∂z/∂x ∂x/∂θ ],    z_t = √ᾱ_t z + √(1 − ᾱ_t) ε

with the UNet Jacobian ∂ε̂/∂z_t omitted and ε̂ the classifier-free-guided noise prediction.

Classifier-free guidance convention (public codebases disagree, so it is written down once):
the UNet runs on one batch of 2B items ordered [unconditional (negative prompt) × B ; conditional
(prompt, with its view suffix) × B], and

    ε̂ = ε_uncond + s · (ε_cond − ε_uncond),      s = guidance_scale (100 for SDS).

Models: any diffusers Stable Diffusion 1.x/2.x checkpoint, from a local folder or a hub id. The
default is `stable-diffusion-v1-5/stable-diffusion-v1-5` (or $SDS_HEAD_MODEL);
`stabilityai/stable-diffusion-2-1-base` (what FaceG2E, TADA and threestudio use for SDS) works too,
as do v-prediction checkpoints (their output is converted to ε).

Encoders: the checkpoint's own VAE (AutoencoderKL, what the published SDS methods use), or a
tiny one (`tiny_vae`: an AutoencoderTiny such as TAESD, `madebyollin/taesd`, trained to give the
same latents as SD 1.x/2.x's VAE at a tenth of the cost of its forward and backward).

Devices: on CUDA the UNet and VAE run in float16 (channels_last, optionally torch.compile'd); on
CPU everything is float32. Inputs are cast to the weights' dtype at the model boundary and outputs
back to the caller's dtype. The text encoder always stays on the CPU in float32: it runs once per
new prompt, and keeping it off the accelerator frees its memory while a new prompt still works.
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Literal, Sequence, get_args

import torch
import torch.nn.functional as F

from ..files import InputError
from ..fit_config import Weighting
from ..inputs import (DEFAULT_MODEL, DEFAULT_TINY_VAE, MODEL_ENV, TINY_VAE_ENV, check_model_source, default_model_id,
                      model_identity)

Dtype = Literal["auto", "float32", "float16"]
# noise_predictor(z_t [2B, 4, h, w], t int64 [2B], text_embeddings [2B, L, D]) -> ε [2B, 4, h, w]
NoisePredictor = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
Angles = float | Sequence[float] | torch.Tensor


class ModelLoadError(ValueError):
    """A diffusion model that cannot be loaded; the message lists what was tried and what to do."""


# ---------------------------------------------------------------------------------- configuration
@dataclass(frozen=True)
class TimestepSchedule:
    """t ~ U[t_min, t_max(progress)] as fractions of the train steps; t_max anneals linearly."""

    t_min: float = 0.02
    """Lowest timestep, fraction of the train steps (0.02 -> 20 of 1000)."""
    t_max: float = 0.98
    """Highest timestep at the start of the run (progress 0)."""
    t_max_end: float | None = None
    """Highest timestep at the end of the run (progress 1); None keeps t_max fixed."""

    def __post_init__(self) -> None:
        check_timestep_schedule(self)

    def bounds(self, progress: float, num_train_timesteps: int) -> tuple[int, int]:
        """Inclusive integer range [lo, hi] of train steps at `progress` ∈ [0, 1]."""
        t_max = self.t_max if self.t_max_end is None else self.t_max + progress * (self.t_max_end - self.t_max)
        last = num_train_timesteps - 1
        lo = min(round(self.t_min * num_train_timesteps), last)
        return lo, max(lo, min(round(t_max * num_train_timesteps), last))

    def sample(self, batch: int, progress: float, num_train_timesteps: int, generator: torch.Generator) -> torch.Tensor:
        """int64 [batch] train steps, uniform over `bounds`, on the generator's device."""
        lo, hi = self.bounds(progress, num_train_timesteps)
        return torch.randint(lo, hi + 1, (batch,), generator=generator, device=generator.device)


@dataclass(frozen=True)
class GuidanceConfig:
    """Settings of StableDiffusionGuidance. A fit sets guidance_scale, weighting and resolution from its
    FitConfig (Fitter) and compile from FitConfig.compile (app/job.py); the others keep their defaults."""

    model: str = field(default_factory=default_model_id)
    """Hub id or local folder of a diffusers SD checkpoint (default $SDS_HEAD_MODEL or SD 1.5)."""
    guidance_scale: float = 100.0
    """Classifier-free guidance scale s in ε̂ = ε_uncond + s (ε_cond − ε_uncond)."""
    timesteps: TimestepSchedule = field(default_factory=TimestepSchedule)
    """Range of t and its annealing over the run."""
    weighting: Weighting = "1-alpha"
    """w(t): "1-alpha" = 1 − ᾱ_t, "sqrt_alpha_1m_alpha" = √ᾱ_t (1 − ᾱ_t), "uniform" = 1."""
    resolution: int | None = None
    """Side in pixels the render is resized to before encoding; None = the model's native size."""
    dtype: Dtype = "auto"
    """UNet/VAE weights dtype; "auto" = float16 on CUDA, float32 on CPU."""
    vae_float32: bool = False
    """Keep the VAE in float32 when the weights are float16 (avoids fp16 overflow in the encoder)."""
    tiny_vae: str | None = None
    """Hub id or folder of an AutoencoderTiny (e.g. TAESD) to encode with instead of the model's own VAE."""
    channels_last: bool = True
    """Use channels_last memory format for the UNet and VAE on CUDA (ignored on CPU)."""
    compile: bool = False
    """Wrap the UNet in torch.compile (slow first call, faster afterwards)."""
    view_prompts: bool = True
    """Append ", front view" / ", side view" / ", back view" / ", overhead view" from the camera."""
    allow_download: bool = True
    """May a hub id be downloaded when it is in no local folder or cache."""

    def __post_init__(self) -> None:
        check_config(self)


def check_timestep_schedule(schedule: TimestepSchedule) -> None:
    """Raise ValueError naming the field, what was expected and what arrived."""
    for name in ("t_min", "t_max", "t_max_end"):
        value = getattr(schedule, name)
        if value is None and name == "t_max_end":
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
            raise ValueError(f"timesteps.{name}: expected a number in [0, 1], got {value!r}")
    if schedule.t_min > schedule.t_max:
        raise ValueError(f"timesteps: expected t_min <= t_max, got t_min={schedule.t_min} > t_max={schedule.t_max}")
    if schedule.t_max_end is not None and schedule.t_min > schedule.t_max_end:
        raise ValueError(f"timesteps: expected t_min <= t_max_end, got t_min={schedule.t_min} > t_max_end={schedule.t_max_end}")


def check_config(config: GuidanceConfig) -> None:
    """Raise ValueError/TypeError naming the field, what was expected and what arrived."""
    if not isinstance(config.model, str) or not config.model.strip():
        raise ValueError(f"model: expected a hub id or a folder, got {config.model!r}")
    if config.tiny_vae is not None and (not isinstance(config.tiny_vae, str) or not config.tiny_vae.strip()):
        raise ValueError(f"tiny_vae: expected None or a hub id or a folder, got {config.tiny_vae!r}")
    scale = config.guidance_scale
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0.0 <= scale < float("inf"):
        raise ValueError(f"guidance_scale: expected a finite number >= 0, got {scale!r}")
    if not isinstance(config.timesteps, TimestepSchedule):
        raise TypeError(f"timesteps: expected a TimestepSchedule, got {type(config.timesteps).__name__}")
    if config.weighting not in get_args(Weighting):
        raise ValueError(f"weighting: expected one of {get_args(Weighting)}, got {config.weighting!r}")
    res = config.resolution
    if res is not None and (isinstance(res, bool) or not isinstance(res, int) or res < 8 or res % 8):
        raise ValueError(f"resolution: expected None or a positive multiple of 8, got {res!r}")
    if config.dtype not in get_args(Dtype):
        raise ValueError(f"dtype: expected one of {get_args(Dtype)}, got {config.dtype!r}")
    for name in ("vae_float32", "channels_last", "compile", "view_prompts", "allow_download"):
        if not isinstance(getattr(config, name), bool):
            raise TypeError(f"{name}: expected a bool, got {getattr(config, name)!r}")


def resolve_dtype(dtype: Dtype, device: torch.device) -> torch.dtype:
    """Weights dtype for `dtype` on `device`; float16 on a CPU is refused."""
    if dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if dtype == "float16" and device.type == "cpu":
        raise ValueError("dtype: expected 'float32' or 'auto' on a CPU device, got 'float16'")
    return getattr(torch, dtype)


# ------------------------------------------------------------------------------------ view prompts
FRONT, SIDE, BACK, OVERHEAD = ", front view", ", side view", ", back view", ", overhead view"


def view_suffix(azimuth: float, elevation: float) -> str:
    """Prompt suffix for a camera at `azimuth`, `elevation` degrees (threestudio's thresholds).

    Azimuth 0 = camera in front of the face; elevation > 0 = camera above, looking down.
    overhead: elevation > 60 (takes precedence); front: |azimuth| <= 45; back: |azimuth| >= 135
    (azimuth wrapped to (−180, 180]); side: the rest.
    """
    if elevation > 60.0:
        return OVERHEAD
    yaw = abs((azimuth + 180.0) % 360.0 - 180.0)  # in [0, 180]
    if yaw <= 45.0:
        return FRONT
    if yaw >= 135.0:
        return BACK
    return SIDE


# ---------------------------------------------------------------------------------------- loading
@dataclass(frozen=True)
class DiffusionModel:
    """The frozen, eval-mode parts of an SD checkpoint that SDS uses (no safety checker etc.)."""

    model_id: str
    tokenizer: Any                  # CLIPTokenizer
    text_encoder: torch.nn.Module   # CPU, float32
    unet: torch.nn.Module           # device, weights dtype
    vae: torch.nn.Module            # device, weights dtype (float32 with vae_float32); AutoencoderKL or -Tiny
    alphas_cumprod: torch.Tensor    # float32 [num_train_timesteps], CPU: ᾱ_t of the training schedule
    prediction_type: str            # "epsilon" or "v_prediction"
    tiny_vae: str | None = None     # the AutoencoderTiny `vae` is (its hub id or folder); None: the model's own

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def native_resolution(self) -> int:
        """Image side the UNet was trained at (SD 1.5 and 2.1-base: 512).

        From the UNet's latent size, not the VAE's `sample_size`: SD 2.1-base ships a VAE config
        that says 768 while its UNet was trained on 64² latents = 512² images.
        """
        return int(self.unet.config.sample_size) * self.vae_scale_factor


_HOW_TO_PASS_A_FOLDER = (
    "Pass a local folder with a diffusers Stable Diffusion checkpoint (model_index.json, unet/, vae/, "
    f"text_encoder/, tokenizer/, scheduler/) as --model DIR, the {MODEL_ENV} environment variable or "
    "the \"model\" field of a fit request (the add-on's Model preference). On a machine with network, "
    f"`hf download {DEFAULT_MODEL} --local-dir DIR` makes such a folder."
)
_HOW_TO_PASS_A_TINY_VAE = (
    "Pass a local folder with a diffusers AutoencoderTiny (config.json and its weights) as --vae-model DIR, "
    f"the {TINY_VAE_ENV} environment variable or the \"vae_model\" field of a fit request (the add-on's "
    f"Tiny VAE preference). On a machine with network, `hf download {DEFAULT_TINY_VAE} --local-dir DIR` "
    "makes such a folder."
)


def load_model(
    model: str, dtype: torch.dtype, device: torch.device | str, *,
    vae_dtype: torch.dtype | None = None, allow_download: bool = True, tiny_vae: str | None = None,
) -> DiffusionModel:
    """Load an SD checkpoint: a local folder, else the HF cache, else (if allowed) the Hub.

    Returns frozen eval-mode modules: UNet on `device` in `dtype`, VAE in `vae_dtype` (default
    `dtype`), text encoder on the CPU in float32. With `tiny_vae` (a hub id or folder of an
    AutoencoderTiny, found the same way) that encoder replaces the checkpoint's VAE, which is then
    not loaded at all. Raises ModelLoadError (one message, no network stack trace) when every
    source fails. A download first asks the Hub about the repo once with a short timeout, so an
    unreachable Hub fails in seconds instead of retrying.
    """
    _check_source(model, "model", "Stable Diffusion model", _HOW_TO_PASS_A_FOLDER)
    if tiny_vae is not None:
        _check_source(tiny_vae, "vae_model", "tiny VAE", _HOW_TO_PASS_A_TINY_VAE)
    # seconds to import: only once there is a plausible source
    _quiet_image_processor_notice()
    from diffusers import AutoencoderTiny, StableDiffusionPipeline

    vae = None
    if tiny_vae is not None:
        vae = _from_source(tiny_vae, "tiny VAE", _HOW_TO_PASS_A_TINY_VAE, allow_download,
                           lambda source, local: AutoencoderTiny.from_pretrained(
                               source, dtype=vae_dtype or dtype, local_files_only=local))

    def pipeline(source: str | Path, local: bool):
        components = {"vae": None} if vae is not None else {}      # the checkpoint's VAE is not loaded
        return StableDiffusionPipeline.from_pretrained(
            source, dtype=dtype, local_files_only=local, safety_checker=None, feature_extractor=None,
            image_encoder=None, requires_safety_checker=False, **components)

    pipe = _from_source(model, "Stable Diffusion model", _HOW_TO_PASS_A_FOLDER, allow_download, pipeline)
    if vae is not None:
        pipe.vae = vae
    return _freeze(pipe, model_identity(model), dtype, torch.device(device), vae_dtype or dtype,
                   tiny_vae=model_identity(tiny_vae) if tiny_vae is not None else None)


def _check_source(source: str, what: str, kind: str, hint: str) -> None:
    try:
        check_model_source(source, what)
    except InputError as exc:
        raise ModelLoadError(f"cannot load {kind} {source!r}: {exc}\n{hint}") from None


def _from_source(source: str, kind: str, hint: str, allow_download: bool, load: Callable[[str | Path, bool], Any]):
    """`load(where, local_files_only)` from a local folder, else the HF cache, else (if allowed) the
    Hub; one ModelLoadError listing what was tried when every source fails."""
    from huggingface_hub import HfApi
    from huggingface_hub.constants import HF_HUB_CACHE, is_offline_mode

    folder = Path(source).expanduser()
    if folder.is_dir():
        try:
            return load(folder, True)
        except Exception as exc:  # diffusers raises OSError, ValueError, KeyError ... for a bad folder
            raise ModelLoadError(f"cannot load {kind} from folder {folder}: {_one_line(exc)}\n{hint}") from None
    tried = [f"local folder ./{source}: not found"]
    try:
        return load(source, True)
    except FileNotFoundError:  # huggingface_hub's LocalEntryNotFoundError
        tried.append(f"Hugging Face cache {HF_HUB_CACHE}: not there")
    except Exception as exc:
        tried.append(f"Hugging Face cache {HF_HUB_CACHE}: {_one_line(exc)}")
    if not allow_download:
        tried.append("download: not allowed (allow_download is off)")
    elif is_offline_mode():
        tried.append("download: disabled by HF_HUB_OFFLINE")
    else:
        try:
            HfApi().model_info(source, timeout=10)
            return load(source, False)
        except Exception as exc:
            tried.append(f"download from the Hugging Face Hub: {_one_line(exc)}")
    lines = "\n".join(f"  - {line}" for line in tried)
    raise ModelLoadError(f"cannot load {kind} {source!r}; tried:\n{lines}\n{hint}")


class _DropImageProcessorNotice(logging.Filter):
    """Importing SD's pipeline makes transformers announce that its image processors fall back to
    PIL without torchvision. SDS uses no image processor (no safety checker, no feature
    extractor), so on every fit that notice would only be noise on stderr."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "requires torchvision (not installed)" not in record.getMessage()


def _quiet_image_processor_notice() -> None:
    source = logging.getLogger("transformers.utils.import_utils")
    if not any(isinstance(f, _DropImageProcessorNotice) for f in source.filters):
        source.addFilter(_DropImageProcessorNotice())


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    first = text[0] if text else ""
    return f"{type(exc).__name__}: {first[:300]}"


def _freeze(pipe: Any, model_id: str, dtype: torch.dtype, device: torch.device, vae_dtype: torch.dtype,
            tiny_vae: str | None = None) -> DiffusionModel:
    """Keep what SDS needs from a pipeline, frozen and in eval mode; drop the rest. `tiny_vae`
    names the AutoencoderTiny in pipe.vae (None: pipe.vae is the checkpoint's own)."""
    from diffusers import DDPMScheduler

    def frozen(module: torch.nn.Module, to_device: torch.device, to_dtype: torch.dtype) -> torch.nn.Module:
        if next(module.parameters()).dtype != to_dtype:  # from_pretrained already cast to `dtype`
            module.to(dtype=to_dtype)
        return module.to(to_device).eval().requires_grad_(False)

    # ᾱ_t of the *training* schedule, whatever sampler the checkpoint ships with
    train_schedule = DDPMScheduler.from_config(pipe.scheduler.config)
    prediction_type = train_schedule.config.prediction_type
    if prediction_type not in ("epsilon", "v_prediction"):
        raise ModelLoadError(f"{model_id}: prediction_type {prediction_type!r} is not supported (epsilon or v_prediction)")
    return DiffusionModel(
        model_id=model_id,
        tokenizer=pipe.tokenizer,
        text_encoder=frozen(pipe.text_encoder, torch.device("cpu"), torch.float32),
        unet=frozen(pipe.unet, device, dtype),
        vae=frozen(pipe.vae, device, vae_dtype),
        alphas_cumprod=train_schedule.alphas_cumprod.to(torch.float32),
        prediction_type=prediction_type,
        tiny_vae=tiny_vae,
    )


# ------------------------------------------------------------------------------------------ output
@dataclass(frozen=True)
class SDSOutput:
    """One SDS evaluation. Tensors stay on the device: reading them is the caller's host sync."""

    loss: torch.Tensor       # scalar, differentiable; backward() sends w(t)(ε̂ − ε)/B into the latents
    t: torch.Tensor          # int64 [B], train steps used
    weight: torch.Tensor     # [B], w(t)
    grad_norm: torch.Tensor  # [B], ‖w(t)(ε̂ − ε)‖ per item after nan_to_num
    nonfinite: torch.Tensor  # int64 scalar, entries of the gradient that were NaN/inf (set to 0)

    def summary(self) -> dict[str, Any]:
        """Plain Python values for logging (synchronises with the device)."""
        return {
            "loss": float(self.loss.detach()), "t": self.t.tolist(), "weight": self.weight.tolist(),
            "grad_norm": self.grad_norm.tolist(), "nonfinite": int(self.nonfinite),
        }


def sds_weight(weighting: Weighting, alpha_bar: torch.Tensor) -> torch.Tensor:
    """w(t) from ᾱ_t (any shape, same shape out)."""
    if weighting == "1-alpha":
        return 1.0 - alpha_bar                       # DreamFusion
    if weighting == "sqrt_alpha_1m_alpha":
        return alpha_bar.sqrt() * (1.0 - alpha_bar)  # TADA; milder at large t
    if weighting == "uniform":
        return torch.ones_like(alpha_bar)
    raise ValueError(f"weighting: expected one of {get_args(Weighting)}, got {weighting!r}")


# ---------------------------------------------------------------------------------------- guidance
class StableDiffusionGuidance:
    """SDS loss for renders (`sds`) or latent images (`sds_latents`), plus `encode`/`decode`.

    Usage: `guidance.set_prompt("a bust of ...")`, then per step
    `out = guidance.sds(rgb, azimuth, elevation, progress, generator=g); out.loss.backward()`.
    """

    def __init__(self, model: DiffusionModel, config: GuidanceConfig, noise_predictor: NoisePredictor | None = None):
        self.model = model
        self.config = config
        self.device = next(model.unet.parameters()).device
        self.weights_dtype = next(model.unet.parameters()).dtype
        self.vae_dtype = next(model.vae.parameters()).dtype
        self.resolution = config.resolution or model.native_resolution
        self.num_train_timesteps = int(model.alphas_cumprod.shape[0])
        if self.device.type == "cuda" and config.channels_last:
            model.unet.to(memory_format=torch.channels_last)
            model.vae.to(memory_format=torch.channels_last)
        self._unet = torch.compile(model.unet) if config.compile else model.unet
        self.noise_predictor: NoisePredictor = noise_predictor or self._unet_epsilon
        self._embeddings: dict[str, torch.Tensor] = {}  # text -> [L, D] on device, weights dtype
        self.prompt: str | None = None
        self.negative_prompt = ""

    @classmethod
    def from_config(cls, config: GuidanceConfig | None = None, device: torch.device | str | None = None) -> "StableDiffusionGuidance":
        """Load `config.model` on `device` (default: CUDA if available, else CPU)."""
        config = config or GuidanceConfig()
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = resolve_dtype(config.dtype, device)
        vae_dtype = torch.float32 if config.vae_float32 else dtype
        model = load_model(config.model, dtype, device, vae_dtype=vae_dtype, allow_download=config.allow_download,
                           tiny_vae=config.tiny_vae)
        return cls(model, config)

    @classmethod
    def from_pipeline(
        cls, pipe: Any, config: GuidanceConfig | None = None, device: torch.device | str = "cpu",
        noise_predictor: NoisePredictor | None = None,
    ) -> "StableDiffusionGuidance":
        """Wrap an already built StableDiffusionPipeline (tests, notebooks); its modules are frozen in
        place. A pipe.vae that is an AutoencoderTiny goes by config.tiny_vae."""
        config = config or GuidanceConfig()
        device = torch.device(device)
        dtype = resolve_dtype(config.dtype, device)
        vae_dtype = torch.float32 if config.vae_float32 else dtype
        model_id = str(getattr(pipe, "name_or_path", None) or config.model)
        tiny = _is_tiny(pipe.vae)
        if tiny != (config.tiny_vae is not None):
            raise ValueError(f"tiny_vae: {config.tiny_vae!r} does not describe the pipeline's {type(pipe.vae).__name__}")
        return cls(_freeze(pipe, model_id, dtype, device, vae_dtype, tiny_vae=config.tiny_vae), config,
                   noise_predictor)

    def with_settings(self, **changes: Any) -> "StableDiffusionGuidance":
        """The same loaded model, compiled UNet and prompt cache with some SDS settings changed.

        Only settings that do not touch the loaded modules may change: guidance_scale,
        timesteps, weighting, view_prompts, resolution. Cheap: nothing is loaded or encoded again.
        """
        allowed = {"guidance_scale", "timesteps", "weighting", "view_prompts", "resolution"}
        unknown = sorted(set(changes) - allowed)
        if unknown:
            raise ValueError(f"with_settings: cannot change {unknown} on a loaded model; allowed: {sorted(allowed)}")
        clone = copy.copy(self)
        clone.config = replace(self.config, **changes)
        clone.resolution = clone.config.resolution or self.model.native_resolution
        return clone

    # ------------------------------------------------------------------------------ prompts
    def set_prompt(self, prompt: str, negative_prompt: str = "") -> None:
        """Make `prompt` (and its view variants) current; encodes only texts not seen before."""
        if not isinstance(prompt, str) or not isinstance(negative_prompt, str):
            raise TypeError(f"prompt, negative_prompt: expected str, got {type(prompt).__name__}, {type(negative_prompt).__name__}")
        suffixes = (FRONT, SIDE, BACK, OVERHEAD) if self.config.view_prompts else ("",)
        texts = [negative_prompt] + [prompt + suffix for suffix in suffixes]
        new = [text for text in dict.fromkeys(texts) if text not in self._embeddings]
        if new:
            self._embeddings.update(zip(new, self._encode_texts(new)))
        self.prompt, self.negative_prompt = prompt, negative_prompt

    @torch.no_grad()
    def _encode_texts(self, texts: list[str]) -> torch.Tensor:
        """CLIP last hidden states [N, L, D] on the device in the weights dtype (encoder runs on CPU)."""
        tokenizer = self.model.tokenizer
        ids = tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True, return_tensors="pt").input_ids
        hidden = self.model.text_encoder(ids)[0]
        return hidden.to(self.device, self.weights_dtype)

    def text_embeddings(self, azimuth: Angles, elevation: Angles, batch: int) -> torch.Tensor:
        """[2B, L, D]: negative prompt × B, then the prompt with each item's view suffix."""
        if self.prompt is None:
            raise ValueError("prompt: call set_prompt(prompt) before sds()")
        if self.config.view_prompts:
            azimuths, elevations = _per_item(azimuth, batch, "azimuth"), _per_item(elevation, batch, "elevation")
            cond = [self._embeddings[self.prompt + view_suffix(a, e)] for a, e in zip(azimuths, elevations)]
        else:
            cond = [self._embeddings[self.prompt]] * batch
        return torch.stack([self._embeddings[self.negative_prompt]] * batch + cond)

    # ------------------------------------------------------------------------------ VAE
    def encode(self, rgb: torch.Tensor) -> torch.Tensor:
        """rgb float [B, 3, H, W] in [0, 1] -> latents [B, 4, R/8, R/8] (R = resolution), with grad.

        The render is resized to R×R bilinearly (antialias off: its backward is a plain
        bilinear scatter). The caller's dtype comes back.
        """
        _check_image(rgb, "rgb", channels=3)
        if rgb.shape[-2:] != (self.resolution, self.resolution):
            rgb = F.interpolate(rgb, (self.resolution, self.resolution), mode="bilinear", align_corners=False, antialias=False)
        x = (2.0 * rgb - 1.0).to(self.device, self.vae_dtype)
        encoded = self.model.vae.encode(x)
        # AutoencoderKL: the posterior mean, not a sample: SDS's only randomness is then (t, ε), the
        # gradient is deterministic given them, and the (tiny) posterior noise adds nothing but
        # variance. AutoencoderTiny (TAESD) is deterministic and was trained to output SD's latents
        # already scaled (its scaling_factor is 1). Either way, times scaling_factor gives the unit-
        # variance latents the UNet was trained on, as diffusers' own image-to-image pipelines do.
        latents = encoded.latents if _is_tiny(self.model.vae) else encoded.latent_dist.mean
        return (latents * self.model.vae.config.scaling_factor).to(rgb.dtype)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """latents [B, 4, h, w] -> rgb [B, 3, 8h, 8w] in [0, 1] (clamped), caller's dtype.

        Differentiable (wrap in torch.no_grad() for previews); clamping zeroes the gradient of
        pixels outside [0, 1].
        """
        _check_image(latents, "latents", channels=self.model.vae.config.latent_channels)
        z = (latents / self.model.vae.config.scaling_factor).to(self.device, self.vae_dtype)
        x = self.model.vae.decode(z).sample
        return ((x + 1.0) / 2.0).clamp(0.0, 1.0).to(latents.dtype)

    # ------------------------------------------------------------------------------ SDS
    def sds(
        self, rgb: torch.Tensor, azimuth: Angles, elevation: Angles, progress: float = 0.0, *,
        generator: torch.Generator | None = None, t: torch.Tensor | int | None = None, noise: torch.Tensor | None = None,
    ) -> SDSOutput:
        """SDS on a render: `sds_latents(encode(rgb), ...)`; the gradient flows back to `rgb`.

        rgb: float [B, 3, H, W] in [0, 1], differentiable. azimuth/elevation: degrees, a number
        or one per item (CPU values avoid a device sync). progress ∈ [0, 1] drives the t schedule.
        generator: the only source of randomness (t and ε); optional only if `t` and `noise`
        are both given. t: int or int64 [B] train steps. noise: ε, shaped like the latents.
        """
        return self.sds_latents(self.encode(rgb), azimuth, elevation, progress, generator=generator, t=t, noise=noise)

    def sds_latents(
        self, latents: torch.Tensor, azimuth: Angles, elevation: Angles, progress: float = 0.0, *,
        generator: torch.Generator | None = None, t: torch.Tensor | int | None = None, noise: torch.Tensor | None = None,
    ) -> SDSOutput:
        """SDS directly on latents [B, 4, h, w] (scaled like `encode`'s output), e.g. a rendered
        latent texture. Arguments as in `sds`. The gradient reaching `latents` is w(t)(ε̂ − ε)/B.
        """
        t, noise = self._check_sds_inputs(latents, progress, generator, t, noise)
        batch = latents.shape[0]
        # 1. t ~ U{t_lo(progress), ..., t_hi(progress)} train steps
        if t is None:
            t = self.config.timesteps.sample(batch, progress, self.num_train_timesteps, generator)
        t = t.to(latents.device)
        # 2. ε ~ N(0, I)
        if noise is None:
            noise = torch.randn(latents.shape, generator=generator, device=generator.device, dtype=torch.float32)
        noise = noise.to(latents.device, latents.dtype)
        alpha_bar = self.model.alphas_cumprod.to(latents.device, latents.dtype)[t].view(batch, 1, 1, 1)
        embeddings = self.text_embeddings(azimuth, elevation, batch)
        with torch.no_grad():  # the UNet Jacobian is omitted: nothing below needs a graph
            # 3. forward diffusion: z_t = √ᾱ_t z + √(1 − ᾱ_t) ε
            z_t = alpha_bar.sqrt() * latents.detach() + (1.0 - alpha_bar).sqrt() * noise
            # 4. classifier-free guidance on the batch [uncond × B ; cond × B]:
            #    ε̂ = ε_uncond + s (ε_cond − ε_uncond)
            eps = self.noise_predictor(torch.cat([z_t, z_t]), torch.cat([t, t]), embeddings)
            eps_uncond, eps_cond = eps.to(latents.dtype).chunk(2)
            eps_hat = eps_uncond + self.config.guidance_scale * (eps_cond - eps_uncond)
            # 5. SDS gradient g = w(t) (ε̂ − ε); a NaN/inf entry (fp16 overflow) carries no
            #    direction, so it becomes 0 instead of poisoning the optimiser state
            weight = sds_weight(self.config.weighting, alpha_bar)
            grad = weight * (eps_hat - noise)
            nonfinite = (~torch.isfinite(grad)).sum()
            grad = torch.nan_to_num(grad, nan=0.0, posinf=0.0, neginf=0.0)
        # 6. surrogate loss with a stop-gradient target  z* = sg(z − g):
        #    L = ½ ‖z − z*‖² / B   ⇒   ∂L/∂z = (z − z*) / B = (z − z + g) / B = g / B,
        #    i.e. backward() delivers exactly w(t)(ε̂ − ε), averaged over the batch, into z.
        target = (latents - grad).detach()
        loss = 0.5 * (latents - target).pow(2).sum() / batch
        return SDSOutput(loss=loss, t=t, weight=weight.view(batch), grad_norm=grad.flatten(1).norm(dim=1), nonfinite=nonfinite)

    def _unet_epsilon(self, z_t: torch.Tensor, t: torch.Tensor, text_embeddings: torch.Tensor) -> torch.Tensor:
        """The default noise predictor: the UNet at the weights dtype, ε in z_t's dtype."""
        out = self._unet(z_t.to(self.weights_dtype), t, encoder_hidden_states=text_embeddings.to(self.weights_dtype)).sample
        out = out.to(z_t.dtype)
        if self.model.prediction_type == "v_prediction":
            # v = √ᾱ ε − √(1 − ᾱ) z  ⇒  ε = √ᾱ v + √(1 − ᾱ) z_t
            alpha_bar = self.model.alphas_cumprod.to(z_t.device, z_t.dtype)[t].view(-1, 1, 1, 1)
            out = alpha_bar.sqrt() * out + (1.0 - alpha_bar).sqrt() * z_t
        return out

    def _check_sds_inputs(
        self, latents: torch.Tensor, progress: float, generator: torch.Generator | None,
        t: torch.Tensor | int | None, noise: torch.Tensor | None,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Validate before any model work; returns t as int64 [B] (or None) and noise."""
        _check_image(latents, "latents", channels=self.model.unet.config.in_channels)
        batch = latents.shape[0]
        if isinstance(progress, bool) or not isinstance(progress, (int, float)) or not 0.0 <= progress <= 1.0:
            raise ValueError(f"progress: expected a number in [0, 1], got {progress!r}")
        if generator is None and (t is None or noise is None):
            raise ValueError("generator: expected a torch.Generator (randomness is always explicit) unless both t and noise are given, got None")
        if t is not None:
            t = torch.as_tensor(t, dtype=torch.int64)
            t = t.expand(batch) if t.ndim == 0 else t
            if t.shape != (batch,):
                raise ValueError(f"t: expected an int or int64 [{batch}], got shape {list(t.shape)}")
            if t.device.type == "cpu" and not bool(((t >= 0) & (t < self.num_train_timesteps)).all()):
                raise ValueError(f"t: expected train steps in [0, {self.num_train_timesteps}), got {t.tolist()}")
        if noise is not None and noise.shape != latents.shape:
            raise ValueError(f"noise: expected shape {list(latents.shape)} like the latents, got {list(noise.shape)}")
        return t, noise


def _is_tiny(vae: torch.nn.Module) -> bool:
    from diffusers import AutoencoderTiny

    return isinstance(vae, AutoencoderTiny)


def _check_image(x: Any, name: str, channels: int) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point() or x.ndim != 4 or x.shape[1] != channels or x.shape[0] == 0:
        raise ValueError(f"{name}: expected a float tensor [B, {channels}, H, W] with B >= 1, got {x.dtype} {list(x.shape)}")


def _per_item(angles: Angles, batch: int, name: str) -> list[float]:
    """Degrees as a list of `batch` floats (a single value is broadcast)."""
    values = torch.as_tensor(angles, dtype=torch.float64).flatten().tolist()
    if len(values) == 1:
        values = values * batch
    if len(values) != batch:
        raise ValueError(f"{name}: expected one value or {batch} (one per batch item), got {len(values)}")
    return values
