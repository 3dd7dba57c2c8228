"""A tiny, randomly initialised Stable Diffusion pipeline for tests and CPU benchmarks.

It has the real model's structure where the guidance code depends on it (CLIP tokenizer and
text encoder, a cross-attention UNet on 4-channel latents, an AutoencoderKL with 8x
downsampling and scaling factor, the SD 1.5 noise schedule) and is saved with
`save_pretrained`, so tests load it through the same `from_pretrained` path as a real model.
Nothing here touches the network.

The UNet and text encoder stay random. The VAE gets a short autoencoder fit on smooth random
images (seconds on a CPU): a random encoder scrambles colour so badly that no texture can be
recovered through it, while the real SD VAE is an autoencoder whose latents carry the image.
The fit is seeded, so the same seed gives the same model.
"""
from __future__ import annotations

import string
from pathlib import Path

import torch

# the SD 1.x/2.x noise schedule (scheduler_config.json of runwayml/stable-diffusion-v1-5)
SD_SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon",
)


def build_tokenizer():
    """A CLIP BPE tokenizer over characters, built in memory (transformers 5 API)."""
    from transformers import CLIPTokenizer

    symbols = list(string.ascii_lowercase + string.digits + ",.'-!?")
    tokens = ["<|startoftext|>", "<|endoftext|>"] + symbols + [s + "</w>" for s in symbols]
    vocab = {token: index for index, token in enumerate(tokens)}
    merges: list[tuple[str, str]] = []  # characters only: every word is split into letters
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def build_pipeline(seed: int = 0, text_hidden: int = 32, unet_channels: tuple[int, ...] = (32, 64),
                   vae_fit_steps: int = 300):
    """Tiny StableDiffusionPipeline on CPU in float32 (random UNet/text encoder, briefly fitted VAE)."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = build_tokenizer()
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer.get_vocab()), hidden_size=text_hidden, intermediate_size=2 * text_hidden,
        num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77,
        bos_token_id=0, eos_token_id=1, pad_token_id=1,
    ))
    torch.manual_seed(seed + 1)
    unet = UNet2DConditionModel(
        sample_size=32, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=unet_channels, norm_num_groups=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=text_hidden, attention_head_dim=4,
    )
    torch.manual_seed(seed + 2)
    # four blocks -> three downsamplings: 8x, like the real SD VAE
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=8,
        block_out_channels=(8, 16, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        sample_size=256, scaling_factor=0.18215,
    )
    if vae_fit_steps:
        _fit_autoencoder(vae, vae_fit_steps, seed)
    scheduler = DDIMScheduler(**SD_SCHEDULER_CONFIG)
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def _fit_autoencoder(vae, steps: int, seed: int, size: int = 64, batch: int = 8) -> None:
    """Fit the VAE to reconstruct smooth random colour fields (what head renders look like to it)."""
    import torch.nn.functional as F

    generator = torch.Generator().manual_seed(seed + 3)
    optimizer = torch.optim.Adam(vae.parameters(), lr=2e-3)
    vae.train()
    for _ in range(steps):
        grids = [torch.rand(batch // 4, 3, cells, cells, generator=generator) for cells in (2, 4, 8, 16)]
        images = torch.cat([F.interpolate(g, size=size, mode="bilinear", align_corners=False) for g in grids]) * 2 - 1
        posterior = vae.encode(images).latent_dist
        loss = F.mse_loss(vae.decode(posterior.mean).sample, images) + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    vae.eval()


def save_tiny_sd(folder: str | Path, seed: int = 0) -> Path:
    """Build the tiny pipeline and save it to `folder` (about 4 MB); returns the folder."""
    folder = Path(folder)
    build_pipeline(seed).save_pretrained(folder, safe_serialization=True)
    return folder


def cached_tiny_sd(seed: int = 0) -> Path:
    """The tiny model folder for `seed`, built once per machine into the user cache.

    The cache key includes a hash of this file, so changing the builder rebuilds the model.
    $SDS_HEAD_CACHE overrides the cache root (default ~/.cache/sds-head).
    """
    import hashlib
    import os
    import shutil
    import tempfile

    digest = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:12]
    root = Path(os.environ.get("SDS_HEAD_CACHE", Path.home() / ".cache" / "sds-head"))
    folder = root / f"tiny-sd-{digest}-seed{seed}"
    if (folder / "model_index.json").exists():
        return folder
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=root, prefix=".building-"))
    try:
        save_tiny_sd(staging, seed)
        try:
            staging.rename(folder)            # atomic: parallel builders never see half a model
        except OSError:
            if not (folder / "model_index.json").exists():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder
