"""Fit a morphable head's shape weights, then optionally its UV texture, to a prompt with SDS.

One iteration of the shape stage (the blog post's loop, made explicit):
    1. sample B cameras around the head (yaw, pitch, zoom) and a light
    2. vertices = mean + weights . basis;  render grey-Lambert or normal-map images
    3. loss = SDS(render) + l2_weight * ||weights||^2;  backward through VAE, renderer, model
    4. clip the gradient norm, Adam step, clamp weights to their bounds (+-weight_clamp standard
       deviations by default)

The weights move as the fit's rig says (inputs.Rig): the optimiser works on u with
weight = centre + scale * u and the L2 prior on u. By default centre is 0 and scale 1 (u is the
weight in standard deviations); a rig's key with a slider range has its prior centred on the value
it starts from and scaled to its range; a key that is not fitted has scale 0 and keeps its value.
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

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from ..bundle import Bundle
from ..fit_config import Background, FitConfig, Stage, texture_level_sides
from ..inputs import Rig, check_prompt, make_rig
from . import checkpoint
from .checkpoint import FitState, Snapshot
from .guidance import StableDiffusionGuidance, TimestepSchedule
from .morphable import MorphableTensors
from .render import camera, prepare_topology, shading

log = logging.getLogger("sds_backend")


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

    def __init__(self, model: Bundle, guidance: StableDiffusionGuidance, config: FitConfig,
                 device: torch.device | str | None = None, rig: Rig | None = None):
        """rig: how each component moves (inputs.make_rig); default: all fitted, +-weight_clamp, from 0."""
        self.model = model
        self.guidance = guidance.with_settings(guidance_scale=config.guidance_scale, weighting=config.weighting,
                                               resolution=config.guidance_resolution)
        if (config.vae == "tiny") != (guidance.model.tiny_vae is not None):
            raise ValueError(f"config.vae is {config.vae!r}, but the guidance encodes with "
                             f"{'the tiny VAE ' + repr(guidance.model.tiny_vae) if guidance.model.tiny_vae else 'the model VAE'}"
                             "; load the guidance with GuidanceConfig(tiny_vae=...) for vae 'tiny'")
        self.config = config
        self.device = torch.device(device) if device is not None else guidance.device
        self.tensors = MorphableTensors.from_bundle(model, self.device)
        self.rig = rig or make_rig(model.names, weight_clamp=config.weight_clamp)
        if len(self.rig.start) != model.num_components:
            raise ValueError(f"rig: expected {model.num_components} components, got {len(self.rig.start)}")
        self.centre, self.scale, self.low, self.high, self.u_low, self.u_high = (
            torch.tensor(v, dtype=torch.float32, device=self.device)
            for v in (self.rig.centre, self.rig.scale, self.rig.low, self.rig.high, *self.rig.coordinate_bounds()))
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
        """The state a fit starts from: the rig's start weights, or `initial_weights` instead."""
        num_components = self.model.num_components
        start = self.rig.start if initial_weights is None else initial_weights
        given = torch.as_tensor(np.asarray(start, dtype=np.float32), device=self.device)
        if given.shape != (num_components,):
            raise ValueError(f"initial_weights: expected {num_components} values (one per component), got {tuple(given.shape)}")
        if not bool(torch.isfinite(given).all()):
            raise ValueError("initial_weights: contains NaN or inf")
        fitted = self.scale > 0
        u = torch.where(fitted, (given - self.centre) / torch.where(fitted, self.scale, 1.0), 0.0)
        generator = torch.Generator(device="cpu").manual_seed(self.config.seed)
        return FitState(stage_index=0, step=0, weights=u.clamp(self.u_low, self.u_high), texture_levels=None,
                        optimizer_state=None, generator_state=generator.get_state(), losses=[], snapshots=[])

    def weights(self, state: "FitState") -> torch.Tensor:
        """The shape weights [K] of a state: centre + scale * u (differentiable in u)."""
        return self.centre + self.scale * state.weights

    def reported_weights(self, state: "FitState") -> torch.Tensor:
        """The weights as events and results give them: inside their bounds also after float32
        rounding of centre + scale * u (a slider must never be asked for 1.0000001 of 1)."""
        return self.weights(state).detach().clamp(self.low, self.high)

    def _identity(self, prompt: str, negative_prompt: str) -> checkpoint.Identity:
        """What a checkpoint of this fit for this prompt is made for (a resume must match all of it)."""
        return checkpoint.Identity(
            config=self.config.to_dict(), prompt=prompt, negative_prompt=negative_prompt,
            model=self.guidance.model.model_id, bundle=self.model.digest(), components=self.model.num_components,
            rig=self.rig.identity(), tiny_vae=self.guidance.model.tiny_vae)

    def load_checkpoint(self, path: str | Path, prompt: str, negative_prompt: str = "") -> FitState:
        """The state saved at `path`; checkpoint.CheckpointError unless it was made by this very fit
        (same prompt, model, bundle and settings) and holds well-formed data."""
        return checkpoint.load(path, self._identity(prompt, negative_prompt), checkpoint.Expected.of(self.config, self.rig),
                               self.device)

    # -------------------------------------------------------------------------------- run
    def run(self, prompt: str, negative_prompt: str = "", initial_weights=None,
            on_event: Callable[[FitEvent], None] | None = None, should_stop: Callable[[], bool] | None = None,
            state: "FitState | None" = None, checkpoint_path: str | Path | None = None) -> FitResult:
        """Fit and return the result; `state` (from `load_checkpoint`) resumes where it stopped.

        should_stop() is polled once per iteration: the fit then ends after at most one more
        iteration, keeping the weights and texture reached so far. With `checkpoint_path`, the
        state is saved there every `checkpoint_every` iterations and at the end.
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
                    on_event(ProgressEvent(iteration, total, stage, loss, t, self.reported_weights(state).tolist(),
                                           time.perf_counter() - started))
                if stage == "texture" and (state.step % config.texture_every == 0 or last):
                    on_event(TextureEvent(iteration, self.texture_image(state)))
                if iteration % snapshot_every == 0 or iteration == total:
                    state.snapshots.append(Snapshot(iteration, self.reported_weights(state).cpu().numpy().copy(),
                                                    self.texture_image(state, size=128) if stage == "texture" else None))
                state.optimizer_state = optimizer.state_dict()["state"]
                if checkpoint_path and config.checkpoint_every and iteration % config.checkpoint_every == 0:
                    state.generator_state = generator.get_state()
                    checkpoint.save(checkpoint_path, self._identity(prompt, negative_prompt), state)
            if not stopped:
                state.stage_index, state.step, state.optimizer_state = state.stage_index + 1, 0, None
        state.generator_state = generator.get_state()
        if checkpoint_path:
            checkpoint.save(checkpoint_path, self._identity(prompt, negative_prompt), state)
        iterations = sum(config.steps_of(s) for s in config.stages[:state.stage_index]) + state.step
        return FitResult(
            weights=self.reported_weights(state).cpu().numpy().astype(np.float32),
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
        if state.optimizer_state is not None:      # a resumed stage: its statistics, this optimiser's settings
            optimizer.load_state_dict({"state": state.optimizer_state,
                                       "param_groups": optimizer.state_dict()["param_groups"]})
        return optimizer

    def _initial_texture_levels(self) -> list[torch.Tensor]:
        """Texture parameters (logits) whose sum starts as a uniform mid-grey skin tone."""
        base = torch.logit(torch.tensor([0.72, 0.56, 0.48], device=self.device))  # light skin albedo
        levels = [torch.zeros(1, side, side, 3, device=self.device) for side in texture_level_sides(self.config)]
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
                state.weights.clamp_(self.u_low, self.u_high)
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
            vertices = self.tensors.vertices(self.weights(state))
            mode = config.shading
            if mode == "mixed":
                mode = ("lambert", "normal")[int(torch.randint(2, (1,), generator=generator))]
            render = shading.render_mesh(vertices, self.faces, cams, config.render_size, mode=mode, light_dir=light,
                                         background=background, topology=self.topology)
        else:
            vertices = self.tensors.vertices(self.weights(state).detach())
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
