"""`bench fit --architecture sd15`: a shape step through SD's own VAE against one through TAESD.

Both on SD 1.5's architecture with random weights (sd15_architecture.py: the real arithmetic, no
download), 512² renders, the default head. The two fits share the UNet and the text encoder, so
the only difference between their steps is the encoder. Steps alternate between the two, so that
a machine whose speed drifts moves both alike, and each ratio divides a step by its neighbour.

Figures: step_s_full, step_s_tiny, step_ratio_tiny_over_full (median of the paired ratios),
vae_share_full (the encoder's forward and backward as a share of a full step), render_share (the
render's forward and backward as a share of a full step); on CUDA (fp16, channels_last) also
it_per_s_*, peak_mem_gb_* and vae_activations_gb_* (what the encoder keeps for its backward),
each without and with torch.compile of the UNet (`*_compiled`).
"""
from __future__ import annotations

import dataclasses
import time

import torch

from .. import DEFAULT_BUNDLE, bundle
from ..core.fit import Fitter, PhaseTimer
from ..core.guidance import GuidanceConfig, StableDiffusionGuidance
from ..fit_config import FitConfig
from .bench_fit import paired_ratio
from .sd15_architecture import build_sd15_architecture, build_taesd_architecture

RENDER_SIZE = 512


class _Variant:
    """One fit (one VAE) whose shape steps can be timed one by one."""

    def __init__(self, name: str, guidance: StableDiffusionGuidance, device: torch.device):
        self.name, self.device = name, device
        config = FitConfig(render_size=RENDER_SIZE, shading="lambert", checkpoint_every=0,
                           vae="tiny" if guidance.model.tiny_vae else "full")
        self.fitter = Fitter(bundle.load(DEFAULT_BUNDLE), guidance, config, device)
        self.fitter.guidance.set_prompt("a portrait of an old man")
        self.state = self.fitter.initial_state()
        self.optimizer = self.fitter._stage_optimizer("shape", self.state)
        self.generator = torch.Generator().manual_seed(0)
        self.timer = self.fitter.timer = PhaseTimer(device)
        self.seconds: list[float] = []

    def step(self, timed: bool = True) -> None:
        _sync(self.device)
        start = time.perf_counter()
        self.fitter._step("shape", self.state, self.optimizer, self.generator, 0.5)
        _sync(self.device)
        if timed:
            self.seconds.append(time.perf_counter() - start)
        else:
            self.timer.totals.clear()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _render_seconds(variant: _Variant, repeats: int = 3) -> float:
    """Median time of the shape render's forward and backward alone."""
    fitter, times = variant.fitter, []
    for _ in range(repeats):
        weights = variant.state.weights.detach().clone().requires_grad_(True)
        probe = dataclasses.replace(variant.state, weights=weights)
        _sync(variant.device)
        start = time.perf_counter()
        image, _ = fitter.render("shape", probe, torch.Generator().manual_seed(1))
        image.mean().backward()
        _sync(variant.device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def _variants(pipe, device: torch.device, compile: bool) -> tuple[_Variant, _Variant]:
    full = StableDiffusionGuidance.from_pipeline(pipe, GuidanceConfig(model="sd15-arch", compile=compile), device)
    taesd = build_taesd_architecture(device).eval().requires_grad_(False)
    if full.vae_dtype != torch.float32:
        taesd.to(full.vae_dtype)
    tiny_model = dataclasses.replace(full.model, vae=taesd, tiny_vae="taesd-arch")
    tiny = StableDiffusionGuidance(tiny_model, dataclasses.replace(full.config, tiny_vae="taesd-arch"))
    return _Variant("full", full, device), _Variant("tiny", tiny, device)


def _time_pair(full: _Variant, tiny: _Variant, repeats: int, warmup: int) -> None:
    for _ in range(warmup):
        full.step(timed=False)
        tiny.step(timed=False)
    for index in range(repeats):
        for variant in (full, tiny) if index % 2 == 0 else (tiny, full):
            variant.step()


def _cuda_figures(variant: _Variant, repeats: int) -> dict[str, float]:
    """it/s, the peak memory of a step, and what the encoder keeps for its backward."""
    device = variant.device
    torch.cuda.reset_peak_memory_stats(device)
    variant.seconds.clear()
    for _ in range(repeats):
        variant.step()
    peak = torch.cuda.max_memory_allocated(device)
    image = torch.rand(1, 3, RENDER_SIZE, RENDER_SIZE, device=device, requires_grad=True)
    _sync(device)
    before = torch.cuda.memory_allocated(device)
    latents = variant.fitter.guidance.encode(image)
    _sync(device)
    kept = torch.cuda.memory_allocated(device) - before
    del latents
    mean = sum(variant.seconds) / len(variant.seconds)
    return {"it_per_s": round(1.0 / mean, 3), "peak_mem_gb": round(peak / 2 ** 30, 3),
            "vae_activations_gb": round(kept / 2 ** 30, 3)}


def run(device: torch.device, repeats: int | None = None) -> dict:
    cuda = device.type == "cuda"
    repeats = repeats or (10 if cuda else 2)
    pipe = build_sd15_architecture(device)
    full, tiny = _variants(pipe, device, compile=False)
    _time_pair(full, tiny, repeats, warmup=2 if cuda else 1)
    ratio, quartiles = paired_ratio(tiny.seconds, full.seconds)
    step_full = sum(full.seconds) / len(full.seconds)
    per_step = {phase: total / len(full.seconds) for phase, total in full.timer.totals.items()}
    render = _render_seconds(full)
    # the backward phase holds the render's backward too: its share comes out with the render's own time
    render_backward = max(0.0, render - per_step.get("render", 0.0))
    figures = {
        "device": str(device) if not cuda else torch.cuda.get_device_name(device),
        "architecture": "sd15", "render_size": RENDER_SIZE, "sds_resolution": full.fitter.guidance.resolution,
        "dtype": str(full.fitter.guidance.weights_dtype).replace("torch.", ""),
        "torch_threads": torch.get_num_threads(), "timed_steps_per_vae": repeats,
        "step_s_full": round(step_full, 3), "step_s_tiny": round(sum(tiny.seconds) / len(tiny.seconds), 3),
        "step_ratio_tiny_over_full": round(ratio, 3),
        "step_ratio_quartiles": [round(q, 3) for q in quartiles],
        "vae_share_full": round((per_step["vae_encode"] + per_step["backward"] - render_backward) / step_full, 3),
        "render_share": round(render / step_full, 4),
        "breakdown_s_full": {k: round(v, 3) for k, v in sorted(per_step.items())},
        "breakdown_s_tiny": {k: round(v / len(tiny.seconds), 3) for k, v in sorted(tiny.timer.totals.items())},
    }
    if cuda:
        for compiled in (False, True):
            variants = (full, tiny) if not compiled else _variants(pipe, device, compile=True)
            if compiled:
                _time_pair(*variants, repeats=0, warmup=3)      # compilation happens here
            suffix = "_compiled" if compiled else ""
            for variant in variants:
                for key, value in _cuda_figures(variant, repeats).items():
                    figures[f"{key}_{variant.name}{suffix}"] = value
    return figures
