"""An SD 1.5-architecture pipeline with random weights, for memory measurements where no weights can be downloaded.

    python bench/random_sd15.py OUT_DIR [--resolution 256]

Writes a ``StableDiffusionPipeline`` directory: the published SD 1.5 UNet (859.5M parameters,
``bench/architectures.py``) sized for ``--resolution`` pixels, a CLIP ViT-L/14 text encoder (123M), the SD VAE
(84M) and SD 1.5's scheduler, all randomly initialised (seed 0). The tokenizer is the shipped shapes teacher's,
padding to SD's 77 tokens. A run reads it as a user's own pipeline: ``teacher.kind=pretrained
teacher.pretrained=OUT_DIR``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from architectures import ARCHITECTURES  # noqa: E402

from fdistill.teachers import EMBEDDED_T2I_TEACHER_DIR  # noqa: E402

CLIP_VIT_L14 = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                    num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)
SD_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[128, 256, 512, 512],
              layers_per_block=2, down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
              norm_num_groups=32, sample_size=512, scaling_factor=0.18215)
SD15_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                      clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--resolution", type=int, default=256, help="image side in pixels")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**{**ARCHITECTURES["sd15"].config, "sample_size": args.resolution // 8})
    tokenizer_dir = args.out / "tokenizer"
    shutil.copytree(EMBEDDED_T2I_TEACHER_DIR / "tokenizer", tokenizer_dir, dirs_exist_ok=True)
    config_file = tokenizer_dir / "tokenizer_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "model_max_length": 77}, indent=2))
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL(**SD_VAE), text_encoder=CLIPTextModel(CLIPTextConfig(**CLIP_VIT_L14)),
        tokenizer=CLIPTokenizer.from_pretrained(tokenizer_dir), unet=unet, scheduler=DDIMScheduler(**SD15_SCHEDULER),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(args.out)
    counts = {name: sum(p.numel() for p in getattr(pipe, name).parameters())
              for name in ("unet", "text_encoder", "vae")}
    print(f"wrote {args.out}: " + ", ".join(f"{name} {count / 1e6:.1f}M" for name, count in counts.items()))


if __name__ == "__main__":
    main()
