"""A tiny, randomly initialised Stable Diffusion pipeline for tests and CPU benchmarks.

It has the real model's structure where the guidance code depends on it (CLIP tokenizer and
text encoder, a cross-attention UNet on 4-channel latents, an AutoencoderKL with 8x
downsampling and scaling factor, the SD 1.5 noise schedule) and is saved with
`save_pretrained`, so tests load it through the same `from_pretrained` path as a real model.
Nothing here touches the network.

The UNet and text encoder stay random. The VAE does not: SDS pulls the render through the
encoder's Jacobian, and a random encoder (tiny widths, a GroupNorm in front of every conv)
scrambles colour and normalises contrast away, so no texture could be recovered through it. The
real SD VAE is a trained autoencoder whose latents carry the image; to a good approximation each
latent pixel is a linear function of the colour of its 8x8 block (the well-known latent -> RGB
preview factors). The tiny VAE gets that property from a short fit (`_fit_vae`, seconds on a
CPU): its encoder learns to put the mean colour of each 8x8 block into the latent, along SD's
colour directions with equal gains (so no colour is much harder to recover than another), and
its decoder then learns to invert the encoder. The fit is seeded, so the same seed gives the
same model (on the same machine and thread count).
"""
from __future__ import annotations

import contextlib
import string
from pathlib import Path

import torch

# the SD 1.x/2.x noise schedule (scheduler_config.json of runwayml/stable-diffusion-v1-5)
SD_SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon",
)
# SD 1.x latent -> RGB preview factors: rgb[c] ≈ sum_l z[l] * F[l][c] for scaled latents z and rgb
# in [-1, 1] (the linear approximation used for cheap latent previews).
SD_LATENT_RGB_FACTORS = ((0.298, 0.207, 0.208), (0.187, 0.286, 0.173), (-0.158, 0.189, 0.264), (-0.184, -0.271, -0.473))


def build_tokenizer():
    """A CLIP BPE tokenizer over characters, built in memory (transformers 5 API)."""
    from transformers import CLIPTokenizer

    symbols = list(string.ascii_lowercase + string.digits + ",.'-!?")
    tokens = ["<|startoftext|>", "<|endoftext|>"] + symbols + [s + "</w>" for s in symbols]
    vocab = {token: index for index, token in enumerate(tokens)}
    merges: list[tuple[str, str]] = []  # characters only: every word is split into letters
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def build_pipeline(seed: int = 0, text_hidden: int = 32, unet_channels: tuple[int, ...] = (32, 64),
                   vae_fit_steps: int = 800):
    """Tiny StableDiffusionPipeline on CPU in float32 (random UNet/text encoder, briefly fitted VAE).

    vae_fit_steps: encoder steps of `_fit_vae` (the decoder gets a quarter); 0 leaves the VAE random.
    """
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
    # four blocks -> three downsamplings: 8x, like the real SD VAE; 4 channels per norm group
    # (2 in the first block) like SD's 128 / 32
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=4,
        block_out_channels=(8, 16, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        sample_size=256, scaling_factor=0.18215,
    )
    if vae_fit_steps:
        _fit_vae(vae, vae_fit_steps, seed)
    scheduler = DDIMScheduler(**SD_SCHEDULER_CONFIG)
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def latent_colour_code() -> torch.Tensor:
    """float [4, 3] C: the tiny VAE's scaled latent of a pixel is C @ (mean RGB of its 8x8 block, in [-1, 1]).

    SD's preview factors with their singular values set to 1 (the nearest matrix with orthonormal
    columns): SD's colour directions with equal gains, and C is its own exact preview (C^T C = I).
    """
    u, _, vh = torch.linalg.svd(torch.tensor(SD_LATENT_RGB_FACTORS), full_matrices=False)
    return u @ vh


def _training_images(count: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """[count, 3, size, size] in [-1, 1]: smooth random colour fields (2 to 16 cells across);
    the smoother half as an ellipse on a black or grey background, like a head render."""
    import torch.nn.functional as F

    cells = (2, 4, 8, 16)
    grids = [torch.rand(count // len(cells), 3, c, c, generator=generator) for c in cells]
    images = torch.cat([F.interpolate(g, size=size, mode="bilinear", align_corners=False) for g in grids])
    half = count // 2
    axis = torch.linspace(-1, 1, size)
    centre = torch.rand(half, 2, 1, 1, generator=generator) * 0.6 - 0.3
    radius = torch.rand(half, 2, 1, 1, generator=generator) * 0.5 + 0.4
    inside = (((axis.view(1, 1, -1) - centre[:, 0]) / radius[:, 0]) ** 2
              + ((axis.view(1, -1, 1) - centre[:, 1]) / radius[:, 1]) ** 2 < 1).float()[:, None]
    is_grey = torch.rand(half, 1, 1, 1, generator=generator) < 0.5
    background = is_grey * torch.rand(half, 1, 1, 1, generator=generator)
    images[:half] = images[:half] * inside + background * (1 - inside)
    return images * 2 - 1


def _fit_vae(vae, steps: int, seed: int, size: int = 64, batch: int = 8) -> None:
    """Fit the encoder to `latent_colour_code` (`steps` steps), then the decoder to invert it.

    Every residual branch (ResNet conv2, attention output) starts at zero, so each block starts
    as the identity and the encoder as a near-linear chain of strided convolutions. From the
    default random start the same fit leaves ~20% latent error on head renders and colours the
    oracle texture test cannot recover (15 dB); from this start, ~6%. Adam with a cosine decay to
    0; a higher rate or fewer steps fails for some seeds. Runs in channels_last (faster on a CPU).
    """
    import math

    import torch.nn.functional as F
    from diffusers.models.attention_processor import Attention
    from diffusers.models.resnet import ResnetBlock2D

    with torch.no_grad():
        for module in vae.modules():
            if isinstance(module, ResnetBlock2D):
                module.conv2.weight.zero_()
                module.conv2.bias.zero_()
            elif isinstance(module, Attention):
                module.to_out[0].weight.zero_()
                module.to_out[0].bias.zero_()
    code = latent_colour_code()
    scale = vae.config.scaling_factor
    generator = torch.Generator().manual_seed(seed + 3)
    vae.to(memory_format=torch.channels_last).train()

    def images(count: int) -> torch.Tensor:
        return _training_images(count, size, generator).contiguous(memory_format=torch.channels_last)

    def run(params, lr: float, count: int, loss_of) -> None:
        optimizer = torch.optim.Adam(params, lr=lr)
        for step in range(count):
            for group in optimizer.param_groups:
                group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / count))
            loss = loss_of()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    def encoder_loss() -> torch.Tensor:
        x = images(batch)
        z = vae.encode(x).latent_dist.mean * scale
        return F.mse_loss(z, torch.einsum("lc,bchw->blhw", code, F.avg_pool2d(x, 8)))

    def decoder_loss() -> torch.Tensor:
        x = images(batch // 2)
        with torch.no_grad():
            z = vae.encode(x).latent_dist.mean
        return F.mse_loss(vae.decode(z).sample, x)

    encoder = [*vae.encoder.parameters(), *vae.quant_conv.parameters()]
    run(encoder, 2e-3, steps, encoder_loss)
    for p in encoder:
        p.requires_grad_(False)
    run([*vae.decoder.parameters(), *vae.post_quant_conv.parameters()], 5e-3, steps // 4, decoder_loss)
    vae.requires_grad_(True).eval().to(memory_format=torch.contiguous_format)


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
    # one builder at a time (a build takes about a minute of both cores): parallel test processes
    # on a fresh machine wait for the first one instead of each building the same model
    with _exclusive_lock(root / f".{folder.name}.lock"):
        if (folder / "model_index.json").exists():
            return folder
        staging = Path(tempfile.mkdtemp(dir=root, prefix=".building-"))
        try:
            save_tiny_sd(staging, seed)
            staging.rename(folder)            # atomic: readers never see half a model
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return folder


@contextlib.contextmanager
def _exclusive_lock(path: Path):
    """An advisory lock on `path` held for the block (POSIX); elsewhere, no lock: the rename above
    still keeps a half-built model out of sight, two builders only do the work twice."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
