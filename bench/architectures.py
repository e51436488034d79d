"""Published architectures of seven diffusers denoisers, built on the meta device to count their parameters.

    python bench/architectures.py

Each entry holds the denoiser's ``config.json`` as published on the Hugging Face Hub (``source``, subfolder
``unet`` or ``transformer``): the keys that set its widths, depths and block layout, plus every other key whose
published value differs from the installed diffusers' default. The remaining keys of the published file are
bookkeeping (``_class_name``, ``_diffusers_version``) or leave the model as diffusers' defaults build it.
``published_parameters`` is the denoiser's size as its authors state it: exact for SD 1.5, SDXL and FLUX.1-dev,
otherwise their rounded figure ("2.5B" is 2_500_000_000; PixArt-Sigma's is its paper's "0.6B"). Wan2.1's
"1.3B" is the name of the release rather than a count: its checkpoint holds 1.42B weights.

Models are built under :func:`accelerate.init_empty_weights`, so no memory is allocated for their weights.
Running the module prints each model's count on the meta device next to the published one.
"""

from __future__ import annotations

from dataclasses import dataclass

import accelerate
import diffusers
import torch


@dataclass(frozen=True)
class Architecture:
    """A published denoiser: its diffusers class and config, its size, and the latent space it works in."""

    name: str
    class_name: str  # the diffusers model class
    config: dict
    published_parameters: int
    source: str  # Hugging Face Hub repository of the pipeline
    latent_channels: int
    vae_scale_factor: int  # pixels per latent pixel along each spatial axis
    temporal_compression: int | None = None  # frames per latent frame (video models only)


_ARCHITECTURES = (
    Architecture(
        name="sd15",
        class_name="UNet2DConditionModel",
        config={
            "sample_size": 64,
            "in_channels": 4,
            "out_channels": 4,
            "block_out_channels": [320, 640, 1280, 1280],
            "layers_per_block": 2,
            "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
            "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
            "attention_head_dim": 8,
            "cross_attention_dim": 768,
        },
        published_parameters=859_520_964,
        source="runwayml/stable-diffusion-v1-5",
        latent_channels=4,
        vae_scale_factor=8,
    ),
    Architecture(
        name="sdxl",
        class_name="UNet2DConditionModel",
        config={
            "sample_size": 128,
            "in_channels": 4,
            "out_channels": 4,
            "block_out_channels": [320, 640, 1280],
            "layers_per_block": 2,
            "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
            "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
            "transformer_layers_per_block": [1, 2, 10],
            "attention_head_dim": [5, 10, 20],
            "cross_attention_dim": 2048,
            "use_linear_projection": True,
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": 256,
            "projection_class_embeddings_input_dim": 2816,
        },
        published_parameters=2_567_463_684,
        source="stabilityai/stable-diffusion-xl-base-1.0",
        latent_channels=4,
        vae_scale_factor=8,
    ),
    Architecture(
        name="sd35_medium",
        class_name="SD3Transformer2DModel",
        config={
            "sample_size": 128,
            "patch_size": 2,
            "in_channels": 16,
            "out_channels": 16,
            "num_layers": 24,
            "attention_head_dim": 64,
            "num_attention_heads": 24,
            "joint_attention_dim": 4096,
            "caption_projection_dim": 1536,
            "pooled_projection_dim": 2048,
            "pos_embed_max_size": 384,
            "dual_attention_layers": list(range(13)),
            "qk_norm": "rms_norm",
        },
        published_parameters=2_500_000_000,
        source="stabilityai/stable-diffusion-3.5-medium",
        latent_channels=16,
        vae_scale_factor=8,
    ),
    Architecture(
        name="flux_dev",
        class_name="FluxTransformer2DModel",
        config={
            "patch_size": 1,
            "in_channels": 64,
            "num_layers": 19,
            "num_single_layers": 38,
            "attention_head_dim": 128,
            "num_attention_heads": 24,
            "joint_attention_dim": 4096,
            "pooled_projection_dim": 768,
            "guidance_embeds": True,
            "axes_dims_rope": [16, 56, 56],
        },
        published_parameters=11_901_408_320,
        source="black-forest-labs/FLUX.1-dev",
        latent_channels=16,
        vae_scale_factor=8,
    ),
    Architecture(
        name="sana_1600m",
        class_name="SanaTransformer2DModel",
        config={
            "sample_size": 32,
            "patch_size": 1,
            "in_channels": 32,
            "out_channels": 32,
            "num_layers": 20,
            "num_attention_heads": 70,
            "attention_head_dim": 32,
            "num_cross_attention_heads": 20,
            "cross_attention_head_dim": 112,
            "cross_attention_dim": 2240,
            "caption_channels": 2304,
            "mlp_ratio": 2.5,
        },
        published_parameters=1_600_000_000,
        source="Efficient-Large-Model/Sana_1600M_1024px_diffusers",
        latent_channels=32,
        vae_scale_factor=32,
    ),
    Architecture(
        name="pixart_sigma",
        class_name="PixArtTransformer2DModel",
        config={
            "sample_size": 128,
            "patch_size": 2,
            "in_channels": 4,
            "out_channels": 8,
            "num_layers": 28,
            "num_attention_heads": 16,
            "attention_head_dim": 72,
            "cross_attention_dim": 1152,
            "caption_channels": 4096,
            "norm_type": "ada_norm_single",
            "interpolation_scale": 2,
            "use_additional_conditions": False,
        },
        published_parameters=600_000_000,
        source="PixArt-alpha/PixArt-Sigma-XL-2-1024-MS",
        latent_channels=4,
        vae_scale_factor=8,
    ),
    Architecture(
        name="wan21_t2v_1_3b",
        class_name="WanTransformer3DModel",
        config={
            "patch_size": [1, 2, 2],
            "in_channels": 16,
            "out_channels": 16,
            "num_layers": 30,
            "num_attention_heads": 12,
            "attention_head_dim": 128,
            "ffn_dim": 8960,
            "text_dim": 4096,
            "freq_dim": 256,
            "qk_norm": "rms_norm_across_heads",
            "cross_attn_norm": True,
            "eps": 1e-6,
            "rope_max_seq_len": 1024,
        },
        published_parameters=1_300_000_000,
        source="Wan-AI/Wan2.1-T2V-1.3B-Diffusers",
        latent_channels=16,
        vae_scale_factor=8,
        temporal_compression=4,
    ),
)
ARCHITECTURES: dict[str, Architecture] = {arch.name: arch for arch in _ARCHITECTURES}


def build_on_meta(name: str) -> torch.nn.Module:
    """The named denoiser with its published config, every parameter and buffer on the meta device."""
    arch = ARCHITECTURES[name]
    with accelerate.init_empty_weights(include_buffers=True):
        return getattr(diffusers, arch.class_name).from_config(arch.config)


def parameter_count(name: str) -> int:
    """Number of weights of the named denoiser, counted on its meta-device build as its checkpoint stores them.

    These are the parameters plus the persistent buffers (the tensors of ``state_dict()``), which is what the
    published counts count. Only SD3.5 Medium has such a buffer: its 384x384 positional table (226,492,416
    values), a checkpoint tensor that diffusers registers as a buffer rather than a parameter.
    """
    return sum(tensor.numel() for tensor in build_on_meta(name).state_dict().values())


if __name__ == "__main__":
    print(f"{'name':<16} {'class':<26} {'meta count':>15} {'published':>15} {'ratio':>7}")
    for arch in _ARCHITECTURES:
        count = parameter_count(arch.name)
        print(f"{arch.name:<16} {arch.class_name:<26} {count:>15,} {arch.published_parameters:>15,}"
              f" {count / arch.published_parameters:>7.4f}")
