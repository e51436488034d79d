"""Train the embedded flow-matching text-to-image teacher shipped in fdistill/assets/shapes_flow_teacher, a diffusers
``StableDiffusion3Pipeline`` directory that plain diffusers loads.

    python scripts/train_shapes_flow_teacher.py [--config configs/assets/shapes_flow_teacher.yaml] [key=value ...]

1. The VAE, tokenizer and CLIP text encoder of the embedded text-to-image teacher, frozen. The VAE's config gains
   ``shift_factor: 0`` (SD3's pipeline reads it). The text encoder becomes a ``CLIPTextModelWithProjection`` with a
   fixed random projection of its pooled output, and fills both CLIP slots of the pipeline; the T5 slot stays
   empty, so the pipeline feeds ``max_sequence_length`` zero tokens in its place.
2. Prompt embeddings are computed once per caption by the stock pipeline's own ``encode_prompt``.
3. An ``SD3Transformer2DModel`` is trained on the scaled latents with the rectified-flow target
   ``v = eps - x0`` at ``x_s = (1 - s) x0 + s eps`` (Esser et al. 2024, arXiv 2403.03206): ``s`` is logit-normal
   and then shifted as the scheduler shifts its sampling times, ``s <- shift s / (1 + (shift - 1) s)``. Captions
   are dropped to ``""`` with probability 0.1 so classifier-free guidance works. EMA weights are saved.

Only the training combinations of the captioned shapes are seen (``fdistill.data.captions``).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
from omegaconf import OmegaConf
from train_digits_teacher import optimizer_and_ema_step  # the scripts beside this one
from train_shapes_t2i_teacher import lr_lambda
from transformers import CLIPTextModelWithProjection, CLIPTokenizer

from fdistill.data.captions import CaptionedShapes

ROOT = Path(__file__).resolve().parent.parent


def load_parts(cfg):
    """The source pipeline's VAE (with ``shift_factor`` 0), tokenizer and text encoder with a seeded projection."""
    source = ROOT / cfg.source
    vae = AutoencoderKL.from_pretrained(source / "vae")
    vae.register_to_config(shift_factor=0.0)
    tokenizer = CLIPTokenizer.from_pretrained(source / "tokenizer")
    torch.manual_seed(cfg.seed)
    text_encoder = CLIPTextModelWithProjection.from_pretrained(source / "text_encoder",
                                                               projection_dim=cfg.projection_dim)
    torch.nn.init.normal_(text_encoder.text_projection.weight, std=text_encoder.config.hidden_size ** -0.5)
    return vae.eval().requires_grad_(False), tokenizer, text_encoder.eval().requires_grad_(False)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs/assets/shapes_flow_teacher.yaml"))
    parser.add_argument("overrides", nargs="*", help="key=value overrides")
    args = parser.parse_args(argv)
    cfg = OmegaConf.merge(OmegaConf.load(args.config), OmegaConf.from_dotlist(args.overrides))
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    start = time.time()

    vae, tokenizer, text_encoder = load_parts(cfg)
    transformer = SD3Transformer2DModel(**OmegaConf.to_container(cfg.transformer))
    scheduler = FlowMatchEulerDiscreteScheduler(**OmegaConf.to_container(cfg.scheduler))
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=text_encoder,
                                    tokenizer=tokenizer, text_encoder_2=copy.deepcopy(text_encoder),
                                    tokenizer_2=tokenizer, text_encoder_3=None, tokenizer_3=None)

    data = CaptionedShapes(cfg.data.num_images, cfg.data.size, cfg.data.split, seed=cfg.seed)
    with torch.no_grad():
        latents = torch.cat([vae.encode(chunk).latent_dist.sample(generator=gen) for chunk in data.images.split(500)])
        latents = (latents - vae.config.shift_factor) * vae.config.scaling_factor
        prompts = ["", *data.prompts]
        hidden, _, pooled, _ = pipe.encode_prompt(prompts, prompts, None, do_classifier_free_guidance=False,
                                                  max_sequence_length=cfg.max_sequence_length)
    row = {p: i for i, p in enumerate(prompts)}
    caption_rows = torch.tensor([row[c] for c in data.captions])

    ema = copy.deepcopy(transformer).requires_grad_(False)
    t = cfg.train
    opt = torch.optim.AdamW(transformer.parameters(), lr=t.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(t.steps, t.warmup_steps))
    shift = scheduler.config.shift
    train_start = time.time()
    for step in range(1, t.steps + 1):
        idx = torch.randint(len(latents), (t.batch_size,), generator=gen)
        x0 = latents[idx]
        drop = torch.rand(t.batch_size, generator=gen) < t.caption_dropout
        rows = torch.where(drop, 0, caption_rows[idx])
        s = torch.sigmoid(t.logit_mean + t.logit_std * torch.randn(t.batch_size, generator=gen))
        s = shift * s / (1 + (shift - 1) * s)
        noise = torch.randn(x0.shape, generator=gen)
        x_s = (1 - s[:, None, None, None]) * x0 + s[:, None, None, None] * noise
        out = transformer(x_s, timestep=s * scheduler.config.num_train_timesteps, encoder_hidden_states=hidden[rows],
                          pooled_projections=pooled[rows]).sample
        loss = F.mse_loss(out, noise - x0)
        optimizer_and_ema_step(transformer, ema, opt, sched, loss, t.grad_clip, t.ema_decay, step)
        if step % 100 == 0 or step == t.steps:
            elapsed = time.time() - train_start
            print(f"step {step:5d}  loss {loss.item():.4f}  {elapsed / step:.3f} s/step  {elapsed:.0f} s", flush=True)

    pipe.transformer = ema.eval()
    out_dir = ROOT / cfg.out
    pipe.save_pretrained(out_dir, safe_serialization=True)
    provenance = {
        "script": "scripts/train_shapes_flow_teacher.py",
        "config": OmegaConf.to_container(cfg),
        "data": f"fdistill.data.captions.CaptionedShapes: {data.description}; "
                f"{len(data.combinations)} training combinations",
        "parts": f"VAE, tokenizer and CLIP text encoder of {cfg.source} (frozen; the VAE's shift_factor set to 0; "
                 f"a fixed random pooled projection of {cfg.projection_dim} dimensions, seed {cfg.seed})",
        "parameters": {"transformer": sum(p.numel() for p in ema.parameters())},
        "final_loss": round(loss.item(), 5),
        "seconds_per_step": round((time.time() - train_start) / t.steps, 4),
        "wall_time_s": round(time.time() - start, 1),
        "date": datetime.date.today().isoformat(),
        "torch_version": torch.__version__,
    }
    (out_dir / "provenance.json").write_text(json.dumps(provenance, indent=2) + "\n")
    print(json.dumps({k: v for k, v in provenance.items() if k != "config"}, indent=2))


if __name__ == "__main__":
    main()
