"""Fit a morphable head's shape weights, then optionally its UV texture, to a prompt with SDS.

One iteration of the shape stage (the blog post's loop, made explicit):
    1. sample B cameras around the head (yaw, pitch, zoom) and a light
    2. vertices = mean + weights . basis;  render grey-Lambert or normal-map images
    3. loss = SDS(render) + l2_weight * ||weights||^2;  backward through VAE, renderer, model
    4. clip the gradient norm, Adam step, clamp weights to +-weight_clamp (standard deviations)
The texture stage keeps the shape fixed and optimises a UV texture the same way, with lit
textured renders all around the head and an annealed timestep range.

Texture parametrisation (UV-space SDS gradients are noisy: each step sees one view and only a
few texels per pixel): the texture is a sum of a Laplacian-like pyramid of RGB logits at 1/32
to 1/1 of the texture size, each level upsampled bilinearly. A gradient reaching a texel also
reaches the coarse levels, which average it over large regions, so low frequencies converge
first and little noise survives at fine levels. `texture_param="rgb"` keeps the plain texture.

Everything random draws from one torch.Generator seeded from the config, so a CPU run is
repeatable; checkpoints store that generator's state, and `resume` continues bit for bit.
"""
from __future__ import annotations

import hashlib
import logging
import math
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Literal, get_args

import numpy as np
import torch
import torch.nn.functional as F

from .guidance import StableDiffusionGuidance, TimestepSchedule
from .morphable import MorphableModel
from .render import camera, prepare_topology, shading

log = logging.getLogger("sds_backend")
Stage = Literal["shape", "texture"]
Shading = Literal["mixed", "lambert", "normal"]
TextureParam = Literal["pyramid", "rgb"]
Background = Literal["black", "white", "random"]
CHECKPOINT_VERSION = 1


@dataclass(frozen=True)
class FitConfig:
    """Every knob of a fit, with the defaults from ../shared/SDS_DEFAULTS.md (see there for sources)."""

    stages: tuple[Stage, ...] = ("shape",)
    """Stages to run, in order: "shape" (the weights) and/or "texture" (the UV texture)."""
    shape_steps: int = 200
    """Iterations of the shape stage."""
    texture_steps: int = 400
    """Iterations of the texture stage."""
    seed: int = 0
    """Seed of the one generator behind cameras, lights, timesteps and noise."""
    guidance_scale: float = 100.0
    """Classifier-free guidance scale (DreamFusion-style SDS uses 100)."""
    weighting: Literal["1-alpha", "sqrt_alpha_1m_alpha", "uniform"] = "1-alpha"
    """w(t) of the SDS gradient."""
    t_min: float = 0.02
    """Lowest diffusion timestep, as a fraction of the train steps."""
    t_max: float = 0.98
    """Highest diffusion timestep at the start of each stage."""
    shape_t_max_end: float | None = None
    """Highest timestep at the end of the shape stage; None keeps t_max."""
    texture_t_max_end: float | None = 0.5
    """Highest timestep at the end of the texture stage (annealed linearly from t_max)."""
    lr: float = 0.05
    """Adam learning rate of the shape weights at the start of the stage."""
    lr_decay: float = 1.0
    """The shape learning rate decays exponentially to lr * lr_decay by the end; 1 (FaceG2E) keeps it
    constant. Adam's steps do not shrink with the gradient, so at a constant rate the weights keep
    jittering by about lr (0.05 sd: invisible); below 1 they settle, but travel less."""
    texture_lr: float = 0.05
    """Adam learning rate of the texture parameters (decays x0.9 every 100 steps)."""
    l2_weight: float = 1e-3
    """Weight of the L2 penalty on the shape weights."""
    grad_clip: float = 5.0
    """Clip the gradient norm of the shape weights to this (0 disables)."""
    weight_clamp: float = 3.0
    """Clamp every shape weight to +-this many standard deviations."""
    batch_size: int = 1
    """Views rendered per iteration."""
    render_size: int = 256
    """Side of the square render in pixels (the guidance resizes it to `guidance_resolution`)."""
    guidance_resolution: int | None = None
    """Side the render is resized to before VAE encoding; None = the model's own (512 for SD 1.5)."""
    texture_size: int = 512
    """Side of the square UV texture in texels."""
    texture_param: TextureParam = "pyramid"
    """Texture parametrisation: "pyramid" (multi-resolution, less noise) or "rgb" (plain texels)."""
    shading: Shading = "mixed"
    """Shape-stage renders: "lambert" (grey, random light), "normal" (normal map) or "mixed" (either, per step)."""
    background: Background = "black"
    """Colour behind the head: black, white, or a random grey per step."""
    yaw_range: tuple[float, float] = (-45.0, 45.0)
    """Camera yaw range in degrees for the shape stage (0 = front)."""
    texture_yaw_range: tuple[float, float] = (-180.0, 180.0)
    """Camera yaw range for the texture stage (all around the head)."""
    pitch_range: tuple[float, float] = (-20.0, 20.0)
    """Camera pitch range in degrees (positive = from above)."""
    zoom_range: tuple[float, float] = (0.9, 1.1)
    """Random zoom; 1 frames the head to fill 90% of the image."""
    fov_deg: float = 30.0
    """Vertical field of view of the cameras."""
    event_every: int = 5
    """Send a progress event every N iterations (and at the last)."""
    texture_every: int = 20
    """Send a texture event every N texture-stage iterations (and at the last)."""
    checkpoint_every: int = 50
    """Write a checkpoint every N iterations when a checkpoint path is given (0 disables)."""
    gif_frames: int = 24
    """Snapshots kept for the evolution GIF."""
    compile: bool = False
    """torch.compile the UNet: on CUDA the first steps are slow (compilation), later ones faster."""

    def __post_init__(self) -> None:
        check_fit_config(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "FitConfig":
        """Build from JSON values (lists become tuples); unknown keys are an error."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"config: unknown key(s) {', '.join(unknown)}; known keys: {', '.join(sorted(known))}")
        converted = {key: tuple(value) if isinstance(value, list) else value for key, value in values.items()}
        try:
            return cls(**converted)
        except TypeError as exc:
            raise ValueError(f"config: {exc}") from None

    def to_dict(self) -> dict[str, Any]:
        return {key: list(value) if isinstance(value, tuple) else value for key, value in asdict(self).items()}

    def steps_of(self, stage: Stage) -> int:
        return self.shape_steps if stage == "shape" else self.texture_steps


def check_fit_config(config: FitConfig) -> None:
    """Raise ValueError naming the field, what was expected and what arrived."""
    def fail(name: str, expected: str) -> None:
        raise ValueError(f"config.{name}: expected {expected}, got {getattr(config, name)!r}")

    def is_int(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    def is_number(value: Any) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

    if (not isinstance(config.stages, tuple) or not config.stages
            or any(not isinstance(stage, str) or stage not in get_args(Stage) for stage in config.stages)
            or len(set(config.stages)) != len(config.stages)):
        fail("stages", "a non-empty list of distinct 'shape' / 'texture'")
    if list(config.stages) != sorted(config.stages, key=("shape", "texture").index):
        fail("stages", "'shape' before 'texture'")
    for name, low, high in (("shape_steps", 1, 100_000), ("texture_steps", 1, 100_000), ("batch_size", 1, 64),
                            ("render_size", 16, 2048), ("texture_size", 16, 4096), ("event_every", 1, 100_000),
                            ("texture_every", 1, 100_000), ("checkpoint_every", 0, 100_000), ("gif_frames", 1, 500)):
        if not is_int(getattr(config, name)) or not low <= getattr(config, name) <= high:
            fail(name, f"an integer in [{low}, {high}]")
    if not isinstance(config.compile, bool):
        fail("compile", "true or false")
    if not is_int(config.seed) or not 0 <= config.seed < 2 ** 63:
        fail("seed", "an integer in [0, 2**63)")
    if config.guidance_resolution is not None and (not is_int(config.guidance_resolution)
                                                   or not 64 <= config.guidance_resolution <= 2048
                                                   or config.guidance_resolution % 8):
        fail("guidance_resolution", "null or a multiple of 8 in [64, 2048]")
    for name in ("lr", "texture_lr", "lr_decay"):
        if not is_number(getattr(config, name)) or not 0 < getattr(config, name) <= 10:
            fail(name, "a number in (0, 10]")
    for name in ("guidance_scale", "l2_weight", "grad_clip"):
        if not is_number(getattr(config, name)) or getattr(config, name) < 0:
            fail(name, "a finite number >= 0")
    if not is_number(config.weight_clamp) or config.weight_clamp <= 0:
        fail("weight_clamp", "a number > 0")
    if not is_number(config.fov_deg) or not 5 <= config.fov_deg <= 120:
        fail("fov_deg", "a number in [5, 120]")
    for name, choices in (("weighting", ("1-alpha", "sqrt_alpha_1m_alpha", "uniform")),
                          ("texture_param", get_args(TextureParam)), ("shading", get_args(Shading)),
                          ("background", get_args(Background))):
        if getattr(config, name) not in choices:
            fail(name, f"one of {', '.join(choices)}")
    for name in ("yaw_range", "texture_yaw_range", "pitch_range", "zoom_range"):
        value = getattr(config, name)
        if not isinstance(value, tuple) or len(value) != 2 or not all(is_number(v) for v in value) or value[0] > value[1]:
            fail(name, "a pair [low, high] with low <= high")
    if not 0 < config.zoom_range[0]:
        fail("zoom_range", "positive values")
    if not (-89 <= config.pitch_range[0] and config.pitch_range[1] <= 89):
        fail("pitch_range", "values within [-89, 89]")
    for name in ("t_min", "t_max"):
        if not is_number(getattr(config, name)) or not 0 <= getattr(config, name) <= 1:
            fail(name, "a number in [0, 1]")
    if config.t_min > config.t_max:
        fail("t_min", f"a value <= t_max={config.t_max}")
    for name in ("shape_t_max_end", "texture_t_max_end"):
        value = getattr(config, name)
        if value is not None and (not is_number(value) or not config.t_min <= value <= 1):
            fail(name, f"null or a number in [t_min={config.t_min}, 1] (set it along with t_min)")


# ------------------------------------------------------------------------------------------ events
@dataclass(frozen=True)
class ProgressEvent:
    iteration: int          # 1-based, counted over all stages
    total: int              # iterations over all stages
    stage: Stage
    loss: float
    t: float                # mean timestep of the step, fraction of the train steps
    weights: list[float]
    seconds: float          # since the fit started (this process)


@dataclass(frozen=True)
class TextureEvent:
    iteration: int
    texture: np.ndarray     # uint8 [H, W, 3], row 0 = v 1


FitEvent = ProgressEvent | TextureEvent


@dataclass
class Snapshot:
    """State recorded for the evolution GIF."""

    iteration: int
    weights: np.ndarray             # float32 [K]
    texture: np.ndarray | None      # uint8 [h, w, 3] (downsampled) or None before the texture stage


@dataclass
class FitResult:
    weights: np.ndarray             # float32 [K], the fitted shape weights
    texture: np.ndarray | None      # uint8 [H, W, 3], or None without a texture stage
    stopped: bool                   # True when should_stop() ended the fit early
    iterations: int                 # iterations completed over all stages
    seconds: float
    losses: list[float] = field(default_factory=list)
    snapshots: list[Snapshot] = field(default_factory=list)
    skipped_steps: int = 0          # steps dropped because their gradient was not finite


class PhaseTimer:
    """Accumulates wall time per phase of a step (bench); the default does nothing."""

    def __init__(self, device: torch.device | None = None):
        self.device = device
        self.totals: dict[str, float] = {}
        self._start: float | None = None
        self._phase: str | None = None

    def mark(self, phase: str | None) -> None:
        """End the running phase (if any) and start `phase` (None: just end)."""
        if self.device is not None and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        if self._start is not None and self._phase is not None:
            self.totals[self._phase] = self.totals.get(self._phase, 0.0) + now - self._start
        self._start, self._phase = now, phase


class _NoTimer(PhaseTimer):
    def mark(self, phase: str | None) -> None:
        pass


# ------------------------------------------------------------------------------------------ fitter
class Fitter:
    """Runs the stages of a fit for one prompt on one morphable model."""

    def __init__(self, model: MorphableModel, guidance: StableDiffusionGuidance, config: FitConfig,
                 device: torch.device | str | None = None):
        self.model = model
        self.guidance = guidance.with_settings(guidance_scale=config.guidance_scale, weighting=config.weighting,
                                               resolution=config.guidance_resolution)
        self.config = config
        self.device = torch.device(device) if device is not None else guidance.device
        self.tensors = model.torch_buffers(self.device)
        self.faces = self.tensors.faces
        self.topology = prepare_topology(self.faces)
        self.uv = torch.as_tensor(model.uv, device=self.device)
        self.uv_faces = torch.as_tensor(model.uv_faces, device=self.device, dtype=torch.int64)
        mean = self.tensors.mean
        low, high = mean.min(0).values, mean.max(0).values
        self.center = (low + high) / 2
        self.radius = float((mean - self.center).norm(dim=1).max()) * 1.05
        self.timer: PhaseTimer = _NoTimer()
        self.orbit = {
            "shape": camera.OrbitSampler(config.yaw_range, config.pitch_range, config.zoom_range, config.fov_deg),
            "texture": camera.OrbitSampler(config.texture_yaw_range, config.pitch_range, config.zoom_range, config.fov_deg),
        }
        self.schedules = {
            "shape": TimestepSchedule(config.t_min, config.t_max, config.shape_t_max_end),
            "texture": TimestepSchedule(config.t_min, config.t_max, config.texture_t_max_end),
        }

    # -------------------------------------------------------------------------------- state
    def initial_state(self, initial_weights: np.ndarray | list[float] | None = None) -> "FitState":
        num_components = self.model.num_components
        weights = torch.zeros(num_components, device=self.device)
        if initial_weights is not None:
            given = torch.as_tensor(np.asarray(initial_weights, dtype=np.float32), device=self.device)
            if given.shape != (num_components,):
                raise ValueError(f"initial_weights: expected {num_components} values (one per component), got {tuple(given.shape)}")
            if not bool(torch.isfinite(given).all()):
                raise ValueError("initial_weights: contains NaN or inf")
            weights = given.clamp(-self.config.weight_clamp, self.config.weight_clamp)
        generator = torch.Generator(device="cpu").manual_seed(self.config.seed)
        return FitState(stage_index=0, step=0, weights=weights, texture_levels=None, optimizer_state=None,
                        generator_state=generator.get_state(), losses=[], snapshots=[])

    # -------------------------------------------------------------------------------- run
    def run(self, prompt: str, negative_prompt: str = "", initial_weights=None,
            on_event: Callable[[FitEvent], None] | None = None, should_stop: Callable[[], bool] | None = None,
            state: "FitState | None" = None, checkpoint: str | Path | None = None) -> FitResult:
        """Fit and return the result; `state` (from a checkpoint) resumes where it stopped.

        should_stop() is polled once per iteration: the fit then ends after at most one more
        iteration, keeping the weights and texture reached so far.
        """
        check_prompt(prompt, negative_prompt)
        self.guidance.set_prompt(prompt, negative_prompt)
        state = state or self.initial_state(initial_weights)
        on_event = on_event or (lambda event: None)
        should_stop = should_stop or (lambda: False)
        config = self.config
        total = sum(config.steps_of(stage) for stage in config.stages)
        started = time.perf_counter()
        generator = torch.Generator(device="cpu")
        generator.set_state(state.generator_state)
        stopped = False
        snapshot_every = max(1, total // config.gif_frames)

        while state.stage_index < len(config.stages) and not stopped:
            stage = config.stages[state.stage_index]
            steps = config.steps_of(stage)
            before = sum(config.steps_of(s) for s in config.stages[:state.stage_index])
            optimizer = self._stage_optimizer(stage, state)
            while state.step < steps:
                if should_stop():
                    stopped = True
                    break
                loss, t = self._step(stage, state, optimizer, generator, state.step / max(steps - 1, 1))
                state.step += 1
                state.losses.append(loss)
                iteration, last = before + state.step, state.step == steps
                if iteration % config.event_every == 0 or last:
                    on_event(ProgressEvent(iteration, total, stage, loss, t, state.weights.tolist(),
                                           time.perf_counter() - started))
                if stage == "texture" and (state.step % config.texture_every == 0 or last):
                    on_event(TextureEvent(iteration, self.texture_image(state)))
                if iteration % snapshot_every == 0 or iteration == total:
                    state.snapshots.append(Snapshot(iteration, state.weights.detach().cpu().numpy().copy(),
                                                    self.texture_image(state, size=128) if stage == "texture" else None))
                state.optimizer_state = optimizer.state_dict()
                if checkpoint and config.checkpoint_every and iteration % config.checkpoint_every == 0:
                    state.generator_state = generator.get_state()
                    save_checkpoint(checkpoint, self, state)
            if not stopped:
                state.stage_index, state.step, state.optimizer_state = state.stage_index + 1, 0, None
        state.generator_state = generator.get_state()
        if checkpoint:
            save_checkpoint(checkpoint, self, state)
        iterations = sum(config.steps_of(s) for s in config.stages[:state.stage_index]) + state.step
        return FitResult(
            weights=state.weights.detach().cpu().numpy().astype(np.float32),
            texture=self.texture_image(state) if state.texture_levels is not None else None,
            stopped=stopped, iterations=iterations, seconds=time.perf_counter() - started,
            losses=list(state.losses), snapshots=list(state.snapshots), skipped_steps=state.skipped_steps,
        )

    # -------------------------------------------------------------------------------- stages
    def _stage_optimizer(self, stage: Stage, state: "FitState") -> torch.optim.Optimizer:
        """Make the stage's parameters leaves of `state` and an optimizer over them (resumed if saved)."""
        config = self.config
        if stage == "shape":
            state.weights = state.weights.detach().clone().requires_grad_(True)
            optimizer = torch.optim.Adam([state.weights], lr=config.lr, betas=(0.9, 0.99))
        else:
            levels = state.texture_levels if state.texture_levels is not None else self._initial_texture_levels()
            state.texture_levels = [level.detach().clone().requires_grad_(True) for level in levels]
            # Adam gives every parameter steps of about lr whatever its gradient's size, which would
            # make fine levels as fast (and as noisy) as coarse ones: each finer level gets half the
            # rate of the one below, so structure settles coarse to fine.
            finest = len(state.texture_levels) - 1
            groups = [{"params": [level], "lr_scale": 0.5 ** (finest - index)}
                      for index, level in enumerate(state.texture_levels)]
            optimizer = torch.optim.AdamW(groups, lr=config.texture_lr, betas=(0.9, 0.99), weight_decay=0.0)
        if state.optimizer_state is not None:
            optimizer.load_state_dict(state.optimizer_state)
        return optimizer

    def _initial_texture_levels(self) -> list[torch.Tensor]:
        """Texture parameters (logits) whose sum starts as a uniform mid-grey skin tone."""
        size = self.config.texture_size
        base = torch.logit(torch.tensor([0.72, 0.56, 0.48], device=self.device))  # light skin albedo
        if self.config.texture_param == "rgb":
            return [base.view(1, 1, 1, 3).expand(1, size, size, 3).clone()]
        sizes = pyramid_sizes(size)
        levels = [torch.zeros(1, s, s, 3, device=self.device) for s in sizes]
        levels[0] += base
        return levels

    def texture(self, levels: list[torch.Tensor]) -> torch.Tensor:
        """Texture float [1, S, S, 3] in (0, 1): sigmoid of the summed, upsampled levels (differentiable)."""
        size = self.config.texture_size
        return torch.sigmoid(sum(_upsample(level, size) for level in levels))

    def texture_image(self, state: "FitState", size: int | None = None) -> np.ndarray:
        """uint8 [H, W, 3] of the current texture (grey before the texture stage)."""
        with torch.no_grad():
            levels = state.texture_levels if state.texture_levels is not None else self._initial_texture_levels()
            tex = self.texture(levels)
            if size is not None and size != tex.shape[1]:
                tex = F.interpolate(tex.permute(0, 3, 1, 2), size=(size, size), mode="area").permute(0, 2, 3, 1)
        return (tex[0].clamp(0, 1) * 255 + 0.5).to(torch.uint8).cpu().numpy()

    # -------------------------------------------------------------------------------- one step
    def _step(self, stage: Stage, state: "FitState", optimizer: torch.optim.Optimizer, generator: torch.Generator,
              progress: float) -> tuple[float, float]:
        """One iteration; returns (loss, mean t as a fraction of the train steps)."""
        config, timer = self.config, self.timer
        timer.mark("render")
        for group in optimizer.param_groups:       # zero_grad(set_to_none=True) without its overhead
            for param in group["params"]:
                param.grad = None
        image, cams = self.render(stage, state, generator)
        timer.mark("vae_encode")
        latents = self.guidance.encode(image)
        timer.mark("unet")
        t = self.schedules[stage].sample(config.batch_size, progress, self.guidance.num_train_timesteps, generator)
        loss = self.guidance.sds_latents(latents, cams.yaw_deg.cpu(), cams.pitch_deg.cpu(), progress,
                                         generator=generator, t=t).loss
        if stage == "shape" and config.l2_weight:
            loss = loss + config.l2_weight * state.weights.pow(2).sum()
        timer.mark("backward")
        loss.backward()
        timer.mark("optimizer")
        params = [state.weights] if stage == "shape" else state.texture_levels
        grads = [p.grad for p in params if p.grad is not None]
        norm = _gradient_norm(grads)          # one reduction: tests finiteness and sizes the clip
        if not math.isfinite(norm) and not all(bool(torch.isfinite(g).all()) for g in grads):
            # an fp16 overflow somewhere in the backward: this step carries no usable direction,
            # and one NaN would poison Adam's moments (and the weights) for good
            state.skipped_steps += 1
            log.warning("step %d of the %s stage: non-finite gradient, step skipped", state.step + 1, stage)
            timer.mark(None)
            return float("nan"), float(t.float().mean()) / self.guidance.num_train_timesteps
        if stage == "shape":
            if config.grad_clip and norm > config.grad_clip:      # as clip_grad_norm_, without its extra pass
                state.weights.grad.mul_(config.grad_clip / (norm + 1e-6))
            for group in optimizer.param_groups:
                group["lr"] = config.lr * config.lr_decay ** progress
            optimizer.step()
            with torch.no_grad():
                state.weights.clamp_(-config.weight_clamp, config.weight_clamp)
        else:
            for group in optimizer.param_groups:   # x0.9 every 100 steps, from the step count (resumable)
                group["lr"] = config.texture_lr * group["lr_scale"] * 0.9 ** (state.step // 100)
            optimizer.step()
        timer.mark(None)
        return float(loss.detach()), float(t.float().mean()) / self.guidance.num_train_timesteps

    def render(self, stage: Stage, state: "FitState", generator: torch.Generator) -> tuple[torch.Tensor, camera.Cameras]:
        """The stage's render of the current state from random cameras -> (image [B, 3, H, W], cameras)."""
        config = self.config
        cams = self.orbit[stage].sample(config.batch_size, self.radius, self.center.cpu(), generator)
        cams = cams.map(lambda t: t.to(self.device))
        light = _random_light(config.batch_size, generator).to(self.device)
        background = _background(config.background, generator)
        if stage == "shape":
            vertices = self.tensors.vertices(state.weights)
            mode = config.shading
            if mode == "mixed":
                mode = ("lambert", "normal")[int(torch.randint(2, (1,), generator=generator))]
            render = shading.render_mesh(vertices, self.faces, cams, config.render_size, mode=mode, light_dir=light,
                                         background=background, topology=self.topology)
        else:
            vertices = self.tensors.vertices(state.weights.detach())
            render = shading.render_textured(vertices, self.faces, self.uv, self.uv_faces, self.texture(state.texture_levels),
                                             cams, config.render_size, light_dir=light, ambient=0.6,
                                             background=background, topology=self.topology)
        return render.image.permute(0, 3, 1, 2), cams


def _gradient_norm(grads: list[torch.Tensor]) -> float:
    """Euclidean norm of all gradients together; NaN or inf when any entry is (or it overflows)."""
    if not grads:
        return 0.0
    if len(grads) == 1:
        return float(torch.linalg.vector_norm(grads[0]))
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))


def _upsample(level: torch.Tensor, size: int) -> torch.Tensor:
    """[1, s, s, C] -> [1, size, size, C], bilinear (identity at full size)."""
    if level.shape[1] == size:
        return level
    return F.interpolate(level.permute(0, 3, 1, 2), size=(size, size), mode="bilinear",
                         align_corners=False).permute(0, 2, 3, 1)


def pyramid_sizes(size: int) -> list[int]:
    """Level sides from size/32 (at least 8) up to size, doubling."""
    sizes = [size]
    while sizes[-1] // 2 >= max(8, size // 32):
        sizes.append(sizes[-1] // 2)
    return sizes[::-1]


def check_prompt(prompt: Any, negative_prompt: Any = "") -> None:
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError("prompt: expected a non-empty text, got " + repr(prompt))
    if len(prompt) > 2000:
        raise ValueError(f"prompt: expected at most 2000 characters, got {len(prompt)}")
    if not isinstance(negative_prompt, str):
        raise ValueError(f"negative_prompt: expected a text, got {negative_prompt!r}")


def _random_light(batch: int, generator: torch.Generator) -> torch.Tensor:
    """Directions toward the light in camera space: in front, up to ~60 degrees off axis, [B, 3]."""
    # scalar math on one draw: a dozen tensor ops on B numbers would cost more than the numbers
    directions = []
    for u, v in zip(*torch.rand(2, batch, generator=generator).tolist()):
        azimuth, elevation = (u - 0.5) * math.radians(120), (v - 0.3) * math.radians(90)
        directions.append([math.sin(azimuth) * math.cos(elevation), math.sin(elevation),
                           math.cos(azimuth) * math.cos(elevation)])
    return torch.tensor(directions)


def _background(kind: Background, generator: torch.Generator) -> float:
    if kind == "black":
        return 0.0
    if kind == "white":
        return 1.0
    return float(torch.rand(1, generator=generator))


# ------------------------------------------------------------------------------------- checkpoints
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


def save_checkpoint(path: str | Path, fitter: Fitter, state: FitState) -> None:
    """Write atomically: a crash while writing never leaves a broken checkpoint behind."""
    path = Path(path)
    payload = {
        "version": CHECKPOINT_VERSION,
        "config": fitter.config.to_dict(),
        "prompt": fitter.guidance.prompt, "negative_prompt": fitter.guidance.negative_prompt,
        "model_id": fitter.guidance.model.model_id, "num_components": fitter.model.num_components,
        "bundle_digest": bundle_digest(fitter.model), "skipped_steps": state.skipped_steps,
        "stage_index": state.stage_index, "step": state.step,
        "weights": state.weights.detach().cpu(),
        "texture_levels": None if state.texture_levels is None else [t.detach().cpu() for t in state.texture_levels],
        "optimizer_state": state.optimizer_state, "generator_state": state.generator_state,
        "losses": state.losses,
        "snapshots": [(s.iteration, s.weights, s.texture) for s in state.snapshots],
    }
    tmp = path.with_suffix(path.suffix + ".tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(payload, tmp)
    tmp.replace(path)


def load_checkpoint(path: str | Path, fitter: Fitter, prompt: str, negative_prompt: str = "") -> FitState:
    """State to resume from; refuses a checkpoint of another prompt, model size or config."""
    try:
        payload = torch.load(Path(path), map_location="cpu", weights_only=False)
    except Exception as exc:  # truncated, garbage, or from another program: unpickling raises anything
        raise ValueError(f"cannot read checkpoint {path}: {type(exc).__name__}: {exc}") from None
    if not isinstance(payload, dict) or payload.get("version") != CHECKPOINT_VERSION:
        found = payload.get("version") if isinstance(payload, dict) else type(payload).__name__
        raise ValueError(f"checkpoint {path}: not an SDS Head checkpoint of version {CHECKPOINT_VERSION} (found {found!r})")
    if payload["num_components"] != fitter.model.num_components or payload.get("bundle_digest") != bundle_digest(fitter.model):
        raise ValueError(f"checkpoint {path} was made for another morphable model; resume with the same bundle")
    if payload["model_id"] != fitter.guidance.model.model_id:
        raise ValueError(f"checkpoint {path} was made with model {payload['model_id']!r}, not "
                         f"{fitter.guidance.model.model_id!r}; resume with the same model")
    if (payload["prompt"], payload["negative_prompt"]) != (prompt, negative_prompt):
        raise ValueError(f"checkpoint {path} was made for prompt {payload['prompt']!r}, not {prompt!r}")
    if payload["config"] != fitter.config.to_dict():
        changed = sorted(k for k, v in fitter.config.to_dict().items() if payload["config"].get(k) != v)
        raise ValueError(f"checkpoint {path} was made with a different config ({', '.join(changed)}); "
                         "resume with the same settings")
    device = fitter.device
    return FitState(
        stage_index=payload["stage_index"], step=payload["step"], weights=payload["weights"].to(device),
        texture_levels=None if payload["texture_levels"] is None else [t.to(device) for t in payload["texture_levels"]],
        optimizer_state=payload["optimizer_state"], generator_state=payload["generator_state"],
        losses=list(payload["losses"]),
        snapshots=[Snapshot(i, w, t) for i, w, t in payload["snapshots"]],
        skipped_steps=int(payload.get("skipped_steps", 0)),
    )


def bundle_digest(model: MorphableModel) -> str:
    """Identity of a morphable model's geometry, so a checkpoint resumes only on the same one."""
    digest = hashlib.sha256()
    for array in (model.mean, model.basis, model.faces):
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()[:16]

