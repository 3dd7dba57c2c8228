"""Stable Diffusion 1.5's architecture with random weights, and TAESD's: the real arithmetic of a
fit step without downloading a model (benchmarks; random weights cost exactly what trained ones do)."""
from __future__ import annotations

import torch


def build_sd15_architecture(device: torch.device):
    """A StableDiffusionPipeline with SD 1.5's published architecture and random weights.

    Configs as in stable-diffusion-v1-5's unet/, vae/ and text_encoder/ config.json; the
    tokenizer is the tiny character tokenizer (its ids are valid for the 49408-token CLIP).
    """
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from .tiny_sd import SD_SCHEDULER_CONFIG, build_tokenizer

    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel(
            sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
            block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        )
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
            block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4, sample_size=512, scaling_factor=0.18215,
        )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
        max_position_embeddings=77, hidden_act="quick_gelu",
    ))
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=build_tokenizer(), unet=unet,
        scheduler=DDIMScheduler(**SD_SCHEDULER_CONFIG), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )


def build_taesd_architecture(device: torch.device):
    """An AutoencoderTiny with TAESD's architecture (diffusers' defaults are madebyollin/taesd's
    config.json), random weights."""
    from diffusers import AutoencoderTiny

    torch.manual_seed(1)
    with torch.device(device):
        return AutoencoderTiny()
