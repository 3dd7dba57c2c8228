"""SDS guidance on the tiny random Stable Diffusion: exact gradients, CFG, prompts, loading, schedule."""
from __future__ import annotations

import dataclasses
import time
import traceback

import pytest
import torch

from sds_backend.core.guidance import (
    DEFAULT_MODEL, GuidanceConfig, ModelLoadError, StableDiffusionGuidance, TimestepSchedule, load_model,
    view_suffix,
)

RES = 64  # render side used in most tests: 8x8 latents keep the tiny UNet fast


def tiny_pipeline(folder):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(folder, local_files_only=True, safety_checker=None,
                                                   feature_extractor=None, requires_safety_checker=False)


def tiny_vae(folder):
    from diffusers import AutoencoderTiny

    from sds_backend.tools.tiny_sd import TINY_VAE_FOLDER

    return AutoencoderTiny.from_pretrained(folder / TINY_VAE_FOLDER, local_files_only=True)


def make_guidance(folder, noise_predictor=None, tiny=False, **config):
    """(guidance, pipe): the pipe's modules are the guidance's, for by-hand references; `tiny`:
    the tiny model's AutoencoderTiny in place of its own VAE."""
    pipe = tiny_pipeline(folder)
    if tiny:
        pipe.vae = tiny_vae(folder)
        config["tiny_vae"] = "tiny"
    config = GuidanceConfig(model=str(folder), **{"resolution": RES, **config})
    guidance = StableDiffusionGuidance.from_pipeline(pipe, config, "cpu", noise_predictor=noise_predictor)
    return guidance, pipe


def embed(pipe, text):
    """[1, L, D] text embedding computed directly with the pipeline's CLIP."""
    ids = pipe.tokenizer([text], padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        return pipe.text_encoder(ids)[0]


def assert_single_exception(exc):
    """No chained traceback (e.g. of a network retry) would be printed with `exc`."""
    printed = "".join(traceback.format_exception(exc))
    assert "During handling" not in printed and "direct cause" not in printed


def rel_err(a, b):
    return float((a - b).norm() / b.norm())


def alpha_bar_of(pipe, t):
    return pipe.scheduler.alphas_cumprod.to(torch.float32)[t].view(-1, 1, 1, 1)


# ------------------------------------------------------------------------------- gradient parity
@pytest.mark.parametrize("weighting", ["1-alpha", "sqrt_alpha_1m_alpha", "uniform"])
def test_latent_gradient_is_w_times_eps_hat_minus_eps(tiny_sd_dir, weighting):
    guidance, pipe = make_guidance(tiny_sd_dir, weighting=weighting, guidance_scale=7.5)
    guidance.set_prompt("a bust of an old man", negative_prompt="blurry")
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 8, 8, generator=gen).requires_grad_(True)
    noise = torch.randn(2, 4, 8, 8, generator=gen)
    t = torch.tensor([100, 700])
    azimuth, elevation = [10.0, 100.0], [0.0, 0.0]  # front, side

    out = guidance.sds_latents(latents, azimuth, elevation, t=t, noise=noise)
    out.loss.backward()

    # by hand: separate UNet calls per prompt, ᾱ straight from the pipeline's scheduler
    alpha_bar = alpha_bar_of(pipe, t)
    z_t = alpha_bar.sqrt() * latents.detach() + (1 - alpha_bar).sqrt() * noise
    conds = torch.cat([embed(pipe, "a bust of an old man, front view"), embed(pipe, "a bust of an old man, side view")])
    uncond = embed(pipe, "blurry").expand(2, -1, -1)
    with torch.no_grad():
        eps_cond = pipe.unet(z_t, t, encoder_hidden_states=conds).sample
        eps_uncond = pipe.unet(z_t, t, encoder_hidden_states=uncond).sample
    eps_hat = eps_uncond + 7.5 * (eps_cond - eps_uncond)
    w = {"1-alpha": 1 - alpha_bar, "sqrt_alpha_1m_alpha": alpha_bar.sqrt() * (1 - alpha_bar),
         "uniform": torch.ones_like(alpha_bar)}[weighting]
    expected = w * (eps_hat - noise) / 2  # loss averages over the batch of 2

    assert rel_err(latents.grad, expected) <= 1e-5
    assert torch.equal(out.t, t)
    torch.testing.assert_close(out.weight, w.view(2))
    torch.testing.assert_close(out.grad_norm, (2 * expected).flatten(1).norm(dim=1))
    assert int(out.nonfinite) == 0


def test_default_guidance_scale_100_and_single_item_gradient_is_exact(tiny_sd_dir):
    guidance, pipe = make_guidance(tiny_sd_dir)
    assert guidance.config.guidance_scale == 100.0
    guidance.set_prompt("a face")
    gen = torch.Generator().manual_seed(1)
    latents = torch.randn(1, 4, 8, 8, generator=gen).requires_grad_(True)
    noise = torch.randn(1, 4, 8, 8, generator=gen)
    guidance.sds_latents(latents, 180.0, 0.0, t=500, noise=noise).loss.backward()

    alpha_bar = alpha_bar_of(pipe, torch.tensor([500]))
    z_t = alpha_bar.sqrt() * latents.detach() + (1 - alpha_bar).sqrt() * noise
    with torch.no_grad():
        eps_cond = pipe.unet(z_t, 500, encoder_hidden_states=embed(pipe, "a face, back view")).sample
        eps_uncond = pipe.unet(z_t, 500, encoder_hidden_states=embed(pipe, "")).sample
    expected = (1 - alpha_bar) * (eps_uncond + 100 * (eps_cond - eps_uncond) - noise)
    assert rel_err(latents.grad, expected) <= 1e-5


@pytest.mark.parametrize("tiny", [False, True], ids=["full-vae", "tiny-vae"])
def test_rgb_gradient_is_vae_encoder_vjp_of_latent_gradient(tiny_sd_dir, tiny):
    guidance, pipe = make_guidance(tiny_sd_dir, guidance_scale=7.5, tiny=tiny)
    guidance.set_prompt("a bust")
    gen = torch.Generator().manual_seed(2)
    rgb = torch.rand(2, 3, 48, 48, generator=gen).requires_grad_(True)  # resized to 64 inside
    noise = torch.randn(2, 4, 8, 8, generator=gen)
    t = torch.tensor([300, 600])
    guidance.sds(rgb, 0.0, 0.0, t=t, noise=noise).loss.backward()

    # by hand: z = E(2·resize(rgb) − 1) · scaling_factor (posterior mean; TAESD's latents as they
    # come, its factor is 1), g = w(t)(ε̂ − ε)/B, VJP
    rgb_ref = rgb.detach().requires_grad_(True)
    x = torch.nn.functional.interpolate(rgb_ref, (RES, RES), mode="bilinear", align_corners=False)
    encoded = pipe.vae.encode(2 * x - 1)
    z = (encoded.latents if tiny else encoded.latent_dist.mean) * pipe.vae.config.scaling_factor
    alpha_bar = alpha_bar_of(pipe, t)
    z_t = alpha_bar.sqrt() * z.detach() + (1 - alpha_bar).sqrt() * noise
    with torch.no_grad():
        eps_cond = pipe.unet(z_t, t, encoder_hidden_states=embed(pipe, "a bust, front view").expand(2, -1, -1)).sample
        eps_uncond = pipe.unet(z_t, t, encoder_hidden_states=embed(pipe, "").expand(2, -1, -1)).sample
    g = (1 - alpha_bar) * (eps_uncond + 7.5 * (eps_cond - eps_uncond) - noise) / 2
    (expected,) = torch.autograd.grad(z, rgb_ref, grad_outputs=g)
    assert rel_err(rgb.grad, expected) <= 1e-5


def test_v_prediction_output_is_converted_to_epsilon(tiny_sd_dir):
    pipe = tiny_pipeline(tiny_sd_dir)
    from diffusers import DDIMScheduler

    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, prediction_type="v_prediction")
    guidance = StableDiffusionGuidance.from_pipeline(pipe, GuidanceConfig(model="tiny", resolution=RES, guidance_scale=1.0))
    guidance.set_prompt("a face")
    gen = torch.Generator().manual_seed(3)
    latents = torch.randn(1, 4, 8, 8, generator=gen).requires_grad_(True)
    noise = torch.randn(1, 4, 8, 8, generator=gen)
    guidance.sds_latents(latents, 0.0, 0.0, t=400, noise=noise).loss.backward()

    alpha_bar = alpha_bar_of(pipe, torch.tensor([400]))
    z_t = alpha_bar.sqrt() * latents.detach() + (1 - alpha_bar).sqrt() * noise
    with torch.no_grad():
        v = pipe.unet(z_t, 400, encoder_hidden_states=embed(pipe, "a face, front view")).sample
    eps = alpha_bar.sqrt() * v + (1 - alpha_bar).sqrt() * z_t  # s = 1: the conditional prediction only
    assert rel_err(latents.grad, (1 - alpha_bar) * (eps - noise)) <= 1e-5


# ------------------------------------------------------------------------ CFG and the predictor seam
def test_cfg_formula_and_batch_order_through_the_noise_predictor_seam(tiny_sd_dir):
    seen = {}
    eps_u, eps_c = torch.full((2, 4, 8, 8), 0.25), torch.full((2, 4, 8, 8), 0.5)

    def predictor(z_t, t, text_embeddings):
        seen.update(z_t=z_t, t=t, emb=text_embeddings)
        return torch.cat([eps_u, eps_c])

    guidance, pipe = make_guidance(tiny_sd_dir, noise_predictor=predictor, guidance_scale=10.0, weighting="uniform")
    guidance.set_prompt("a head", negative_prompt="ugly")
    latents = torch.zeros(2, 4, 8, 8, requires_grad=True)
    noise = torch.ones(2, 4, 8, 8)
    guidance.sds_latents(latents, [0.0, 180.0], [0.0, 0.0], t=torch.tensor([50, 900]), noise=noise).loss.backward()

    # batch order [uncond × B ; cond × B], the same z_t and t on both halves
    assert seen["z_t"].shape == (4, 4, 8, 8) and torch.equal(seen["z_t"][:2], seen["z_t"][2:])
    assert seen["t"].tolist() == [50, 900, 50, 900]
    expected_emb = torch.cat([embed(pipe, "ugly"), embed(pipe, "ugly"), embed(pipe, "a head, front view"),
                              embed(pipe, "a head, back view")])
    torch.testing.assert_close(seen["emb"], expected_emb)
    # ε̂ = ε_u + s (ε_c − ε_u) = 0.25 + 10 · 0.25 = 2.75;  grad = 1 · (2.75 − 1) / B
    torch.testing.assert_close(latents.grad, torch.full_like(latents, 1.75 / 2))


def test_nonfinite_gradient_entries_become_zero(tiny_sd_dir):
    def predictor(z_t, t, text_embeddings):
        eps = torch.zeros_like(z_t)
        eps[2, 0, 0, 0] = float("nan")   # cond half, item 0
        eps[3, 1, 2, 3] = float("inf")   # cond half, item 1
        return eps

    guidance, _ = make_guidance(tiny_sd_dir, noise_predictor=predictor, weighting="uniform", guidance_scale=1.0)
    guidance.set_prompt("a head")
    latents = torch.zeros(2, 4, 8, 8, requires_grad=True)
    noise = torch.ones(2, 4, 8, 8)
    out = guidance.sds_latents(latents, 0.0, 0.0, t=500, noise=noise)
    out.loss.backward()

    assert torch.isfinite(out.loss) and int(out.nonfinite) == 2
    expected = torch.full_like(latents, -0.5)  # (0 − 1) / B elsewhere
    expected[0, 0, 0, 0] = 0.0
    expected[1, 1, 2, 3] = 0.0
    assert torch.equal(latents.grad, expected)


# -------------------------------------------------------------------------------------- prompts
@pytest.mark.parametrize("azimuth, elevation, suffix", [
    (0.0, 0.0, ", front view"), (45.0, 0.0, ", front view"), (-45.0, 0.0, ", front view"),
    (45.01, 0.0, ", side view"), (-90.0, 0.0, ", side view"), (134.99, 0.0, ", side view"),
    (135.0, 0.0, ", back view"), (-135.0, 0.0, ", back view"), (180.0, 0.0, ", back view"),
    (225.0, 0.0, ", back view"), (225.01, 0.0, ", side view"), (360.0, 0.0, ", front view"),
    (315.0, 0.0, ", front view"), (0.0, 60.0, ", front view"), (0.0, 60.01, ", overhead view"),
    (180.0, 89.0, ", overhead view"), (0.0, -70.0, ", front view"),
])
def test_view_suffix_at_boundaries(azimuth, elevation, suffix):
    assert view_suffix(azimuth, elevation) == suffix


def test_embeddings_are_cached_and_the_text_encoder_stays_off_the_accelerator(tiny_sd_dir):
    guidance, pipe = make_guidance(tiny_sd_dir)
    calls = []
    pipe.text_encoder.register_forward_hook(lambda module, args, output: calls.append(args[0].shape[0]))

    guidance.set_prompt("a bust of a woman")
    assert calls == [5]  # negative + 4 view variants, one batched call
    guidance.set_prompt("a bust of a woman")
    assert calls == [5]  # cached: not called again
    assert next(guidance.model.text_encoder.parameters()).device.type == "cpu"

    gen = torch.Generator().manual_seed(0)
    guidance.sds(torch.rand(1, 3, RES, RES), 0.0, 0.0, generator=gen)
    assert calls == [5]  # sds never encodes text

    guidance.set_prompt("a bust of a knight")
    assert calls == [5, 4]  # only the new texts (the empty negative prompt is cached)
    emb = guidance.text_embeddings([0.0, 90.0], [0.0, 70.0], batch=2)
    torch.testing.assert_close(emb[2], embed(pipe, "a bust of a knight, front view")[0])
    torch.testing.assert_close(emb[3], embed(pipe, "a bust of a knight, overhead view")[0])
    torch.testing.assert_close(emb[0], embed(pipe, "")[0])
    out = guidance.sds(torch.rand(1, 3, RES, RES), 90.0, 0.0, generator=gen)
    assert torch.isfinite(out.loss)


def test_view_prompts_off_uses_the_plain_prompt(tiny_sd_dir):
    guidance, pipe = make_guidance(tiny_sd_dir, view_prompts=False)
    guidance.set_prompt("a head")
    emb = guidance.text_embeddings(180.0, 0.0, batch=1)
    torch.testing.assert_close(emb[1], embed(pipe, "a head")[0])


# --------------------------------------------------------------------------- schedule, randomness
def test_timestep_schedule_bounds_and_annealing():
    fixed = TimestepSchedule()
    assert fixed.bounds(0.0, 1000) == (20, 980) == fixed.bounds(1.0, 1000)
    annealed = TimestepSchedule(t_min=0.02, t_max=0.98, t_max_end=0.5)
    assert annealed.bounds(0.0, 1000) == (20, 980)
    assert annealed.bounds(0.5, 1000) == (20, 740)
    assert annealed.bounds(1.0, 1000) == (20, 500)
    assert TimestepSchedule(t_min=0.02, t_max=1.0).bounds(0.0, 1000) == (20, 999)
    assert TimestepSchedule(t_min=0.02, t_max=0.98, t_max_end=0.02).bounds(1.0, 1000) == (20, 20)

    samples = annealed.sample(4000, 1.0, 1000, torch.Generator().manual_seed(0))
    assert samples.dtype == torch.int64 and int(samples.min()) == 20 and int(samples.max()) == 500


def test_sds_samples_t_from_the_annealed_schedule(tiny_sd_dir):
    schedule = TimestepSchedule(t_min=0.1, t_max=0.9, t_max_end=0.2)
    guidance, _ = make_guidance(tiny_sd_dir, timesteps=schedule)
    guidance.set_prompt("a head")
    gen = torch.Generator().manual_seed(0)
    latents = torch.zeros(16, 4, 8, 8)
    late = guidance.sds_latents(latents, 0.0, 0.0, progress=1.0, generator=gen).t
    early = guidance.sds_latents(latents, 0.0, 0.0, progress=0.0, generator=gen).t
    assert late.min() >= 100 and late.max() <= 200
    assert early.min() >= 100 and early.max() <= 900 and early.max() > 200


def test_fixed_generator_is_deterministic(tiny_sd_dir):
    guidance, _ = make_guidance(tiny_sd_dir)
    guidance.set_prompt("a head")
    rgb = torch.rand(2, 3, RES, RES, generator=torch.Generator().manual_seed(5))

    def run(seed):
        rgb_leaf = rgb.clone().requires_grad_(True)
        out = guidance.sds(rgb_leaf, [0.0, 90.0], 0.0, 0.3, generator=torch.Generator().manual_seed(seed))
        out.loss.backward()
        return out, rgb_leaf.grad

    (a, grad_a), (b, grad_b), (c, _) = run(7), run(7), run(8)
    assert torch.equal(a.t, b.t) and torch.equal(a.loss, b.loss) and torch.equal(grad_a, grad_b)
    assert not torch.equal(a.loss, c.loss)
    summary = a.summary()
    assert isinstance(summary["loss"], float) and len(summary["t"]) == 2 and summary["nonfinite"] == 0


# ------------------------------------------------------------------------------------------- VAE
def test_encode_decode_shapes_range_and_gradient(tiny_sd_dir):
    guidance, pipe = make_guidance(tiny_sd_dir)
    rgb = torch.rand(2, 3, 100, 80, requires_grad=True)
    latents = guidance.encode(rgb)
    assert latents.shape == (2, 4, 8, 8) and latents.requires_grad
    image = guidance.decode(latents)
    assert image.shape == (2, 3, 64, 64) and float(image.detach().min()) >= 0.0 and float(image.detach().max()) <= 1.0
    image.mean().backward()
    assert rgb.grad is not None and rgb.grad.abs().sum() > 0
    assert all(not p.requires_grad for p in pipe.vae.parameters())  # frozen: no grads into the model


def test_tiny_vae_encodes_the_colour_of_each_8x8_block_and_decodes_it_back(tiny_sd_dir):
    """The property the oracle fits rely on (tiny_sd._colour_code_vae): scaled latents are the
    colour code of each block's mean colour, and decoding gives the block colours back."""
    import torch.nn.functional as F

    from sds_backend.tools.tiny_sd import latent_colour_code

    vae = tiny_pipeline(tiny_sd_dir).vae
    gen = torch.Generator().manual_seed(4)
    blocks = torch.rand(2, 3, 8, 8, generator=gen) * 2 - 1               # saturated colours too
    x = F.interpolate(blocks, scale_factor=8, mode="nearest") + 0.1 * torch.randn(2, 3, 64, 64, generator=gen)
    with torch.no_grad():
        latents = vae.encode(x).latent_dist.mean * vae.config.scaling_factor
        decoded = vae.decode(latents / vae.config.scaling_factor).sample
    expected = torch.einsum("lc,bchw->blhw", latent_colour_code(), F.avg_pool2d(x, 8))
    assert rel_err(latents, expected) <= 1e-4
    assert (decoded - F.interpolate(F.avg_pool2d(x, 8), scale_factor=8, mode="nearest")).abs().max() <= 1e-3


@pytest.mark.parametrize("tiny", [False, True], ids=["full-vae", "tiny-vae"])
def test_latents_follow_diffusers_own_image_to_image_convention(tiny_sd_dir, tiny):
    """diffusers' img2img pipelines encode with retrieve_latents(vae.encode(x)) * scaling_factor, for
    AutoencoderKL (0.18215) and AutoencoderTiny (1: TAESD's latents come scaled) alike."""
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img import retrieve_latents

    guidance, pipe = make_guidance(tiny_sd_dir, tiny=tiny)
    rgb = torch.rand(2, 3, RES, RES, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        reference = retrieve_latents(pipe.vae.encode(2 * rgb - 1), sample_mode="argmax") * pipe.vae.config.scaling_factor
        latents = guidance.encode(rgb)
    assert pipe.vae.config.scaling_factor == (1.0 if tiny else 0.18215)
    assert rel_err(latents, reference) <= 1e-6


def test_tiny_vae_latents_are_the_full_vaes_scaled_latents(tiny_sd_dir):
    """TAESD is trained to reproduce SD's *scaled* latents, so both encoders hand the UNet latents of
    the same variance. The tiny model's two encoders compute the same colour code exactly: any
    misapplied scaling factor (0.18215 too many or too few) would show as a 5.5x gap."""
    full, _ = make_guidance(tiny_sd_dir)
    tiny, _ = make_guidance(tiny_sd_dir, tiny=True)
    rgb = torch.rand(3, 3, 2 * RES, 2 * RES, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        expected, latents = full.encode(rgb), tiny.encode(rgb)
    assert rel_err(latents, expected) <= 1e-5
    assert abs(float(latents.std() / expected.std()) - 1) <= 1e-5


def test_gradient_through_the_tiny_encoder_matches_finite_differences(tiny_sd_dir):
    """A random AutoencoderTiny (ReLUs, strided convs, residual blocks), in float64: d<latents, G>/d rgb
    at a few pixels by autograd and by central differences."""
    from diffusers import AutoencoderTiny

    torch.manual_seed(0)
    pipe = tiny_pipeline(tiny_sd_dir)
    pipe.vae = AutoencoderTiny(encoder_block_out_channels=(8, 8, 8, 8), decoder_block_out_channels=(8, 8, 8, 8),
                               num_encoder_blocks=(1, 2, 2, 2), num_decoder_blocks=(1, 1, 1, 1))
    guidance = StableDiffusionGuidance.from_pipeline(pipe, GuidanceConfig(model="tiny", resolution=RES, tiny_vae="random"))
    guidance.model.vae.double()
    guidance.vae_dtype = torch.float64
    gen = torch.Generator().manual_seed(8)
    rgb = torch.rand(1, 3, RES, RES, generator=gen, dtype=torch.float64)
    weights = torch.randn(1, 4, RES // 8, RES // 8, generator=gen, dtype=torch.float64)

    def objective(image):
        return (guidance.encode(image) * weights).sum()

    image = rgb.clone().requires_grad_(True)
    objective(image).backward()
    eps = 1e-6
    for c, y, x in [(0, 5, 7), (1, 31, 32), (2, 60, 3), (0, 40, 41), (1, 0, 63)]:
        step = torch.zeros_like(rgb)
        step[0, c, y, x] = eps
        with torch.no_grad():
            numeric = float(objective(rgb + step) - objective(rgb - step)) / (2 * eps)
        assert abs(float(image.grad[0, c, y, x]) - numeric) <= 1e-6 * max(1.0, abs(numeric)), (c, y, x)
    assert float(image.grad.abs().sum()) > 0


def test_native_resolution_comes_from_the_model(tiny_sd_dir):
    guidance, _ = make_guidance(tiny_sd_dir, resolution=None)
    assert guidance.resolution == 256  # tiny UNet: 32² latents × 8
    assert guidance.encode(torch.rand(1, 3, 32, 32)).shape == (1, 4, 32, 32)


# ---------------------------------------------------------------------------------- input checks
@pytest.mark.parametrize("kwargs, message", [
    (dict(generator=None), "generator"),
    (dict(progress=1.5), "progress"),
    (dict(t=1000, noise=torch.zeros(1, 4, 8, 8)), "t: expected train steps"),
    (dict(t=torch.tensor([1, 2]), noise=torch.zeros(1, 4, 8, 8)), "t: expected an int or int64 [1]"),
    (dict(t=10, noise=torch.zeros(1, 4, 4, 4)), "noise: expected shape [1, 4, 8, 8]"),
    (dict(azimuth=[0.0, 1.0, 2.0]), "azimuth: expected one value or 1"),
])
def test_sds_input_errors_name_the_argument(tiny_sd_dir, kwargs, message):
    guidance, _ = make_guidance(tiny_sd_dir)
    guidance.set_prompt("a head")
    call = {"azimuth": 0.0, "elevation": 0.0, "generator": torch.Generator(), **kwargs}
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        guidance.sds_latents(torch.zeros(1, 4, 8, 8), **call)


def test_image_shape_and_missing_prompt_errors(tiny_sd_dir):
    guidance, _ = make_guidance(tiny_sd_dir)
    with pytest.raises(ValueError, match=r"rgb: expected a float tensor \[B, 3, H, W\].*\[1, 4, 64, 64\]"):
        guidance.encode(torch.zeros(1, 4, 64, 64))
    with pytest.raises(ValueError, match="set_prompt"):
        guidance.sds(torch.zeros(1, 3, RES, RES), 0.0, 0.0, generator=torch.Generator())


# ------------------------------------------------------------------------------------------ config
def test_config_defaults_and_env(monkeypatch):
    monkeypatch.delenv("SDS_HEAD_MODEL", raising=False)
    config = GuidanceConfig()
    assert config.model == DEFAULT_MODEL == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert (config.guidance_scale, config.weighting, config.timesteps) == (100.0, "1-alpha", TimestepSchedule(0.02, 0.98))
    monkeypatch.setenv("SDS_HEAD_MODEL", "/models/sd21")
    assert GuidanceConfig().model == "/models/sd21"


@pytest.mark.parametrize("field, value, message", [
    ("guidance_scale", -1.0, "guidance_scale: expected a finite number >= 0, got -1.0"),
    ("weighting", "sds", "weighting: expected one of ('1-alpha', 'sqrt_alpha_1m_alpha', 'uniform'), got 'sds'"),
    ("resolution", 100, "resolution: expected None or a positive multiple of 8, got 100"),
    ("dtype", "bfloat16", "dtype: expected one of ('auto', 'float32', 'float16'), got 'bfloat16'"),
    ("model", "", "model: expected a hub id or a folder, got ''"),
    ("compile", "yes", "compile: expected a bool, got 'yes'"),
])
def test_config_errors_name_field_expected_and_got(field, value, message):
    with pytest.raises((ValueError, TypeError)) as info:
        dataclasses.replace(GuidanceConfig(model="x/y"), **{field: value})
    assert str(info.value) == message


@pytest.mark.parametrize("kwargs, message", [
    (dict(t_min=-0.1), "timesteps.t_min: expected a number in [0, 1], got -0.1"),
    (dict(t_max=1.5), "timesteps.t_max: expected a number in [0, 1], got 1.5"),
    (dict(t_min=0.6, t_max=0.5), "timesteps: expected t_min <= t_max, got t_min=0.6 > t_max=0.5"),
    (dict(t_min=0.3, t_max_end=0.2), "timesteps: expected t_min <= t_max_end, got t_min=0.3 > t_max_end=0.2"),
])
def test_timestep_schedule_errors(kwargs, message):
    with pytest.raises(ValueError) as info:
        TimestepSchedule(**kwargs)
    assert str(info.value) == message


def test_float16_on_cpu_is_refused(tiny_sd_dir):
    with pytest.raises(ValueError, match="dtype: expected 'float32' or 'auto' on a CPU device, got 'float16'"):
        make_guidance(tiny_sd_dir, dtype="float16")


# ----------------------------------------------------------------------------------------- loading
def test_loads_a_local_folder_through_from_pretrained(tiny_sd_dir):
    config = GuidanceConfig(model=str(tiny_sd_dir), resolution=RES)
    guidance = StableDiffusionGuidance.from_config(config, device="cpu")
    model = guidance.model
    assert model.model_id == str(tiny_sd_dir) and model.prediction_type == "epsilon"
    assert model.alphas_cumprod.shape == (1000,) and model.native_resolution == 256
    assert {f.name for f in dataclasses.fields(model)} == {  # no safety checker, feature extractor, scheduler
        "model_id", "tokenizer", "text_encoder", "unet", "vae", "alphas_cumprod", "prediction_type", "tiny_vae"}
    assert model.tiny_vae is None and type(model.vae).__name__ == "AutoencoderKL"
    for module in (model.unet, model.vae, model.text_encoder):
        assert not module.training and not any(p.requires_grad for p in module.parameters())
        assert next(module.parameters()).dtype == torch.float32
    guidance.set_prompt("a head")
    out = guidance.sds(torch.rand(1, 3, RES, RES), 0.0, 0.0, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(out.loss)


def test_loads_a_tiny_vae_in_place_of_the_models_own_without_loading_that(tiny_sd_dir, monkeypatch):
    from diffusers import AutoencoderKL

    from sds_backend.tools.tiny_sd import TINY_VAE_FOLDER

    def refuse(*args, **kwargs):
        raise AssertionError("the model's own VAE was loaded")

    monkeypatch.setattr(AutoencoderKL, "from_pretrained", refuse)
    folder = tiny_sd_dir / TINY_VAE_FOLDER
    guidance = StableDiffusionGuidance.from_config(GuidanceConfig(model=str(tiny_sd_dir), resolution=RES,
                                                                  tiny_vae=str(folder)), device="cpu")
    model = guidance.model
    assert type(model.vae).__name__ == "AutoencoderTiny" and model.tiny_vae == str(folder)
    assert not model.vae.training and not any(p.requires_grad for p in model.vae.parameters())
    guidance.set_prompt("a head")
    rgb = torch.rand(1, 3, RES, RES, requires_grad=True)
    guidance.sds(rgb, 0.0, 0.0, generator=torch.Generator().manual_seed(0)).loss.backward()
    assert torch.isfinite(rgb.grad).all() and float(rgb.grad.abs().sum()) > 0


@pytest.mark.parametrize("source,expected", [
    ("{tmp}/missing", "cannot load tiny VAE '{tmp}/missing': vae_model: folder {tmp}/missing not found"),
    ("{tmp}", "vae_model: folder {tmp} has no config.json, so it is not a diffusers model folder"),
    ("nobody/no-such-taesd", "download: disabled by HF_HUB_OFFLINE"),
], ids=["missing-folder", "not-a-model-folder", "unknown-hub-id-offline"])
def test_a_tiny_vae_that_cannot_load_gives_one_clear_error_fast(tiny_sd_dir, tmp_path, source, expected):
    start = time.perf_counter()
    with pytest.raises(ModelLoadError) as info:
        load_model(str(tiny_sd_dir), torch.float32, "cpu", tiny_vae=source.format(tmp=tmp_path))
    assert time.perf_counter() - start < 5.0
    message = str(info.value)
    assert expected.format(tmp=tmp_path) in message and "--vae-model DIR" in message and "SDS_HEAD_TINY_VAE" in message
    assert_single_exception(info.value)


def test_missing_folder_gives_one_clear_error_fast(tmp_path):
    missing = tmp_path / "no" / "such" / "model"
    start = time.perf_counter()
    with pytest.raises(ModelLoadError) as info:
        load_model(str(missing), torch.float32, "cpu")
    assert time.perf_counter() - start < 5.0
    message = str(info.value)
    assert f"folder {missing} not found" in message
    assert "--model DIR" in message and "SDS_HEAD_MODEL" in message
    assert_single_exception(info.value)


def test_unknown_hub_id_offline_lists_what_was_tried_fast():
    start = time.perf_counter()
    with pytest.raises(ModelLoadError) as info:
        load_model("nobody/no-such-sd-model", torch.float32, "cpu")
    assert time.perf_counter() - start < 5.0
    message = str(info.value)
    assert "local folder ./nobody/no-such-sd-model: not found" in message
    assert "Hugging Face cache" in message and "download: disabled by HF_HUB_OFFLINE" in message
    assert "--model DIR" in message
    assert_single_exception(info.value)


def test_folder_without_a_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match=r"cannot load Stable Diffusion model .*has no model_index\.json") as info:
        load_model(str(tmp_path), torch.float32, "cpu")
    assert_single_exception(info.value)


# ---------------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_float16_path(tiny_sd_dir):
    guidance = StableDiffusionGuidance.from_config(GuidanceConfig(model=str(tiny_sd_dir), resolution=RES), device="cuda")
    assert guidance.weights_dtype == torch.float16
    assert guidance.model.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    guidance.set_prompt("a head")
    rgb = torch.rand(2, 3, RES, RES, device="cuda", requires_grad=True)
    out = guidance.sds(rgb, [0.0, 180.0], 0.0, generator=torch.Generator("cuda").manual_seed(0))
    out.loss.backward()
    assert out.loss.dtype == torch.float32 and rgb.grad.dtype == torch.float32
    assert torch.isfinite(out.loss) and torch.isfinite(rgb.grad).all() and rgb.grad.abs().sum() > 0
    assert out.t.device.type == "cuda"
