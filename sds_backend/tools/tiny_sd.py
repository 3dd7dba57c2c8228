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
preview factors). The tiny VAE has exactly that property, by construction (`_colour_code_vae`):
its encoder puts the mean colour of each 8x8 block into the latent along SD's colour directions
with equal gains (so no colour is harder to recover than another), and its decoder inverts that
code block by block. No training: the same seed gives the same model on every machine, in
about a second.
"""
from __future__ import annotations

import contextlib
import json
import string
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
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
                   colour_vae: bool = True):
    """Tiny StableDiffusionPipeline on CPU in float32 (random UNet/text encoder, colour-code VAE).

    colour_vae=False leaves the VAE random.
    """
    import torch
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
    # four blocks -> three downsamplings: 8x, like the real SD VAE; one norm group, so that each
    # GroupNorm has room for the channels `_colour_code_vae` needs. Eight channels (its six colour
    # channels and two carriers) all the way and no ResNets in the encoder's blocks (their residual
    # branches would be zero): the same function as wider blocks at less than half the cost of a
    # texture step's encode and its backward at 256²
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=0, norm_num_groups=1,
        block_out_channels=(8, 8, 8, 8),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        sample_size=256, scaling_factor=0.18215,
    )
    if colour_vae:
        _colour_code_vae(vae)
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
    import torch

    u, _, vh = torch.linalg.svd(torch.tensor(SD_LATENT_RGB_FACTORS), full_matrices=False)
    return u @ vh


_CARRIER = 100.0   # the constant channels that fix each GroupNorm's statistics (see below)


def _colour_code_vae(vae) -> None:
    """Set the VAE's weights so that encode = `latent_colour_code` of each 8x8 block's mean colour
    (scaled latents; the posterior mean) and decode = the block colours back, upsampled 8x nearest.

    Every residual branch (ResNet conv2, attention output) is zero, so each block is the identity
    (or its 1x1 shortcut); the downsampling convs take the mean of each 2x2 block and the
    upsampling convs pass the nearest pixel through. What is left is a linear chain but for the
    final GroupNorm and SiLU of each half. The chain carries each colour c twice, as +c and -c,
    next to two constant channels +K and -K: the group mean is then exactly 0 and its variance
    2K^2/C for C channels (K^2/4 at the tiny VAE's eight) up to (c/K)^2 ~ 1e-4, so the norm is a
    fixed scale, and
    silu(c) - silu(-c) = c exactly, so the SiLU is undone by the output conv.
    """
    import torch
    import torch.nn as nn
    from diffusers.models.attention_processor import Attention
    from diffusers.models.resnet import ResnetBlock2D

    code = latent_colour_code()                               # [4, 3]
    scale = vae.config.scaling_factor
    carry = torch.cat([torch.eye(3), -torch.eye(3)])          # colour -> (+c, -c) channels [6, 3]

    def centre_tap(conv: nn.Conv2d, matrix: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        """conv = a 1x1 map by `matrix` [out, in'] (in' <= in), from the kernel's centre (or sole) tap."""
        conv.weight.zero_()
        k = conv.kernel_size[0] // 2
        conv.weight[:matrix.shape[0], :matrix.shape[1], k, k] = matrix
        conv.bias.zero_()
        if bias is not None:
            conv.bias[:bias.shape[0]] = bias

    def carrier_bias(channels: int) -> torch.Tensor:
        bias = torch.zeros(channels)
        bias[6], bias[7] = _CARRIER, -_CARRIER
        return bias

    def fixed_norm(norm: nn.GroupNorm) -> None:
        """The norm's output: the colour channels back at unit scale, the carriers (and the rest) 0."""
        std = _CARRIER * (2.0 / norm.num_channels) ** 0.5    # the carriers' share of the variance
        norm.weight.zero_()
        norm.weight[:6] = std
        norm.bias.zero_()

    with torch.no_grad():
        for module in vae.modules():
            if isinstance(module, ResnetBlock2D):
                module.conv2.weight.zero_()
                module.conv2.bias.zero_()
                if module.conv_shortcut is not None:      # a change of width: keep the first channels
                    shortcut = module.conv_shortcut
                    centre_tap(shortcut, torch.eye(shortcut.out_channels, shortcut.in_channels))
            elif isinstance(module, Attention):
                module.to_out[0].weight.zero_()
                module.to_out[0].bias.zero_()
        encoder, decoder = vae.encoder, vae.decoder
        # encoder: pixels x in [-1, 1] -> (+x, -x, K, -K) -> 2x2 means (three times) -> norm -> silu
        centre_tap(encoder.conv_in, carry, carrier_bias(encoder.conv_in.out_channels))
        for block in encoder.down_blocks:
            for down in block.downsamplers or []:
                # the encoder pads right and bottom by one, then a 3x3 stride-2 conv: the top-left
                # 2x2 taps see exactly the 2x2 block (even sizes never reach the padding)
                conv = down.conv
                conv.weight.zero_()
                conv.bias.zero_()
                conv.weight[:, :, :2, :2] = torch.eye(conv.out_channels, conv.in_channels)[:, :, None, None] / 4
        fixed_norm(encoder.conv_norm_out)
        moments = torch.zeros(8, encoder.conv_out.in_channels)
        moments[:4, :6] = code @ carry.T / scale                   # silu(+c) - silu(-c) = c
        centre_tap(encoder.conv_out, moments, torch.tensor([0.0] * 4 + [-20.0] * 4))  # log-variance -20
        centre_tap(vae.quant_conv, torch.eye(8))
        # decoder: latents -> colours (code^T code = I) -> (+c, -c, K, -K) -> nearest 8x -> norm -> silu
        centre_tap(vae.post_quant_conv, torch.eye(4))
        centre_tap(decoder.conv_in, carry @ code.T * scale, carrier_bias(decoder.conv_in.out_channels))
        for block in decoder.up_blocks:
            for up in block.upsamplers or []:
                centre_tap(up.conv, torch.eye(up.conv.out_channels, up.conv.in_channels))
        fixed_norm(decoder.conv_norm_out)
        centre_tap(decoder.conv_out, carry.T)


TINY_VAE_FOLDER = "tiny_vae"      # inside the tiny model's folder: the `--vae tiny` encoder of the tests


def build_tiny_vae(seed: int = 0):
    """A tiny AutoencoderTiny (TAESD's architecture, narrow) whose encoder computes exactly what
    the tiny pipeline's VAE does: the colour code of each 8x8 block's mean colour, as scaled
    latents (TAESD's convention: its latents are SD's scaled latents, scaling_factor 1).

    The encoder's input is (x + 1) / 2 in [0, 1], never negative, so every ReLU passes it through:
    each block's residual branch is zero, each stride-2 conv takes the mean of the 2x2 block it
    starts at, and the last conv maps the mean colour m' in [0, 1] to code @ (2 m' - 1). The
    decoder stays random: SDS never decodes.
    """
    import torch
    from diffusers import AutoencoderTiny
    from diffusers.models.unets.unet_2d_blocks import AutoencoderTinyBlock

    torch.manual_seed(seed + 3)
    vae = AutoencoderTiny(encoder_block_out_channels=(8, 8, 8, 8), decoder_block_out_channels=(8, 8, 8, 8),
                          num_encoder_blocks=(1, 1, 1, 1), num_decoder_blocks=(1, 1, 1, 1))
    code = latent_colour_code()
    layers = list(vae.encoder.layers)
    convs = [layer for layer in layers if isinstance(layer, torch.nn.Conv2d)]
    first, downsamplers, last = convs[0], convs[1:-1], convs[-1]
    with torch.no_grad():
        first.weight.zero_()
        first.bias.zero_()
        first.weight[:3, :3, 1, 1] = torch.eye(3)
        for block in (layer for layer in layers if isinstance(layer, AutoencoderTinyBlock)):
            block.conv[-1].weight.zero_()
            block.conv[-1].bias.zero_()
        for down in downsamplers:        # padding 1: taps 1 and 2 are the rows and columns 2i, 2i + 1
            down.weight.zero_()
            down.weight[:, :, 1:3, 1:3] = torch.eye(down.out_channels, down.in_channels)[:, :, None, None] / 4
        last.weight.zero_()
        last.weight[:, :3, 1, 1] = 2 * code
        last.bias.copy_(-code.sum(dim=1))
    return vae


def save_tiny_sd(folder: str | Path, seed: int = 0) -> Path:
    """Build the tiny pipeline and save it to `folder` (about 4 MB), with its tiny VAE in
    `folder/tiny_vae`; returns the folder."""
    folder = Path(folder)
    build_pipeline(seed).save_pretrained(folder, safe_serialization=True)
    build_tiny_vae(seed).save_pretrained(folder / TINY_VAE_FOLDER, safe_serialization=True)
    # AutoencoderTiny saves a derived key that its loader then warns about; TAESD's own config.json
    # does not have it
    config_path = folder / TINY_VAE_FOLDER / "config.json"
    config = json.loads(config_path.read_text())
    config.pop("block_out_channels", None)
    config_path.write_text(json.dumps(config, indent=2))
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
    # one builder at a time: parallel test processes on a fresh machine wait for the first one
    # instead of each writing the same model
    with _exclusive_lock(root / f".{folder.name}.lock"):
        if (folder / "model_index.json").exists():
            return folder
        staging = Path(tempfile.mkdtemp(dir=root, prefix=".building-"))
        try:
            save_tiny_sd(staging, seed)
            try:
                staging.rename(folder)        # atomic: readers never see half a model
            except OSError:                   # without the lock, another builder got there first
                if not (folder / "model_index.json").exists():
                    raise
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


# ------------------------------------------------------------------------------------------- CLI
def add_arguments(parser) -> None:
    """`python -m sds_backend make-tiny-sd [DIR]`: with DIR, save a fresh copy there; without, print
    the folder of the per-machine cached copy (built on first use), which the test suites load."""
    parser.add_argument("folder", nargs="?", help="output folder (created); omit to use the cached copy")
    parser.add_argument("--seed", type=int, default=0)


def run(args) -> int:
    print(save_tiny_sd(args.folder, seed=args.seed) if args.folder else cached_tiny_sd(seed=args.seed))
    return 0
