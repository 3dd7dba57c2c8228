"""`bench fit`: time of one fit step, its phases, and its overhead over a bare SDS call.

CPU (default there): the tiny test model at 256² — what matters on a CPU is the overhead of
everything around SDS (render, optimiser), measured as a ratio within one run. CUDA (default
there): an SD 1.5-architecture UNet/VAE/CLIP with random weights built from the published
configs (no download), fp16, 512² renders — the real model's cost without its weights.
`bench fit --architecture sd15` (bench_vae.py) compares the two VAEs on that architecture.
"""
from __future__ import annotations

import time

import torch

from .. import bundle
from ..core.fit import Fitter, PhaseTimer
from ..core.guidance import GuidanceConfig, StableDiffusionGuidance
from ..fit_config import FitConfig
from .. import DEFAULT_BUNDLE
from .sd15_architecture import build_sd15_architecture

PHASES = ("render", "vae_encode", "unet", "backward", "optimizer")


def _guidance(model: str, device: torch.device) -> StableDiffusionGuidance:
    if model == "sd15-arch":
        return StableDiffusionGuidance.from_pipeline(build_sd15_architecture(device), GuidanceConfig(model="sd15-arch"), device)
    if model == "tiny":
        from .tiny_sd import cached_tiny_sd

        model = str(cached_tiny_sd())
    return StableDiffusionGuidance.from_config(GuidanceConfig(model=model), device)


def _median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def paired_ratio(numerators: list[float], denominators: list[float]) -> tuple[float, tuple[float, float]]:
    """Median and (lower, upper) quartiles of the ratios of paired times.

    Each numerator is divided by the denominator timed next to it, so a machine whose speed
    drifts during the run moves both sides of a pair alike (a ratio of the two medians would
    mix minutes at different speeds).
    """
    if len(numerators) != len(denominators) or not numerators:
        raise ValueError(f"need equally many paired times, got {len(numerators)} and {len(denominators)}")
    ratios = sorted(n / d for n, d in zip(numerators, denominators))
    count = len(ratios)
    return ratios[count // 2], (ratios[count // 4], ratios[(3 * count) // 4])


def run(device: torch.device, repeats: int = 25, model: str | None = None) -> dict:
    model = model or ("sd15-arch" if device.type == "cuda" else "tiny")
    render_size = 512 if model == "sd15-arch" else 256
    guidance = _guidance(model, device)
    config = FitConfig(render_size=render_size, shading="lambert", checkpoint_every=0)
    fitter = Fitter(bundle.load(DEFAULT_BUNDLE), guidance, config, device)
    fitter.guidance.set_prompt("a portrait of an old man")
    state = fitter.initial_state()
    optimizer = fitter._stage_optimizer("shape", state)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        image, cams = fitter.render("shape", state, torch.Generator().manual_seed(1))
    bare_image = image.detach().clone().requires_grad_(True)
    yaw, pitch = cams.yaw_deg.cpu(), cams.pitch_deg.cpu()

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def fit_step() -> None:
        fitter._step("shape", state, optimizer, generator, 0.5)

    def bare_sds() -> None:
        # the least any SDS step does: encode, UNet, backward to the image
        guidance_out = fitter.guidance.sds(bare_image, yaw, pitch, 0.5, generator=generator)
        guidance_out.loss.backward()
        bare_image.grad = None

    for warm in (fit_step, bare_sds, fit_step, bare_sds):
        warm()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    timer = PhaseTimer(device)
    fitter.timer = timer
    times: dict[str, list[float]] = {"step": [], "bare": []}
    for index in range(repeats):
        calls = (("step", fit_step), ("bare", bare_sds))
        for name, call in calls if index % 2 == 0 else calls[::-1]:
            sync()
            start = time.perf_counter()
            call()
            sync()
            times[name].append((time.perf_counter() - start) * 1e3)
    step_ms, bare_ms = _median(times["step"]), _median(times["bare"])
    ratio, ratio_quartiles = paired_ratio(times["step"], times["bare"])
    figures = {
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "model": model,
        "render_size": render_size,
        "sds_resolution": fitter.guidance.resolution,
        "dtype": str(fitter.guidance.weights_dtype).replace("torch.", ""),
        "torch_threads": torch.get_num_threads(),
        "triangles": int(fitter.faces.shape[0]),
        "step_ms": round(step_ms, 2),
        "bare_sds_ms": round(bare_ms, 2),
        "overhead_ratio": round(ratio, 3),
        "overhead_ratio_quartiles": [round(q, 3) for q in ratio_quartiles],
        "breakdown_ms": {phase: round(timer.totals.get(phase, 0.0) * 1e3 / repeats, 2) for phase in PHASES},
    }
    if device.type == "cuda":
        figures["it_per_s"] = round(1000.0 / step_ms, 2)
        figures["peak_mem_gb"] = round(torch.cuda.max_memory_allocated(device) / 2 ** 30, 3)
    return figures
