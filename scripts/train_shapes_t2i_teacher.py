"""Train the embedded text-to-image teacher shipped in fdistill/assets/shapes_t2i_teacher, a diffusers
``StableDiffusionPipeline`` directory that plain diffusers loads.

    python scripts/train_shapes_t2i_teacher.py [--config configs/assets/shapes_t2i_teacher.yaml] [key=value ...]

1. A word-level ``CLIPTokenizer`` built with no downloaded files: the 256 byte-level characters (and their
   end-of-word forms) plus one merge chain per caption word, longest words first so that every caption word is
   one token. Words outside the captions fall back to characters.
2. An ``AutoencoderKL`` (32x32x3 -> 8x8x4) trained on reconstruction with a small KL term; its
   ``scaling_factor`` is set to 1 / std of the training latents, as Stable Diffusion's is.
3. A ``UNet2DConditionModel`` on those latents and a ``CLIPTextModel``, trained together with the v-prediction
   target (Salimans & Ho 2022) under Stable Diffusion's scaled-linear betas; captions are dropped to ``""`` with
   probability 0.1 so classifier-free guidance works (Ho & Salimans 2022). EMA weights are saved.

Only the training combinations of the captioned shapes are seen (``fdistill.data.captions``); the held-out ones
test composition. The teacher's own sample metrics are measured by ``scripts/evaluate_shapes_t2i_teacher.py``.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from omegaconf import OmegaConf
from transformers import CLIPTextConfig, CLIPTextModel
from word_tokenizers import word_tokenizer  # the module beside this script

from fdistill.data.captions import CAPTION_WORDS, CaptionedShapes

ROOT = Path(__file__).resolve().parent.parent


def lr_lambda(steps: int, warmup: int):
    return lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * s / steps))


def train_vae(cfg, images: torch.Tensor, gen: torch.Generator) -> tuple[AutoencoderKL, float]:
    vae = AutoencoderKL(**OmegaConf.to_container(cfg.vae))
    t = cfg.vae_train
    opt = torch.optim.AdamW(vae.parameters(), lr=t.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(t.steps, 50))
    start = time.time()
    for step in range(1, t.steps + 1):
        x = images[torch.randint(len(images), (t.batch_size,), generator=gen)]
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(generator=gen)).sample
        rec_loss = F.mse_loss(recon, x)
        loss = rec_loss + t.kl_weight * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0 or step == t.steps:
            print(f"vae step {step:5d}  mse {rec_loss.item():.5f}  {time.time() - start:.0f} s", flush=True)
    vae.eval().requires_grad_(False)
    return vae, rec_loss.item()


@torch.no_grad()
def encode(vae: AutoencoderKL, images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    return torch.cat([vae.encode(chunk).latent_dist.sample(generator=gen) for chunk in images.split(500)])


def train_unet(cfg, latents, captions, tokenizer, text_encoder, gen):
    torch.manual_seed(cfg.seed)
    unet = UNet2DConditionModel(**OmegaConf.to_container(cfg.unet))
    scheduler = DDIMScheduler(**OmegaConf.to_container(cfg.scheduler))
    models = torch.nn.ModuleList([unet, text_encoder])
    ema = copy.deepcopy(models).requires_grad_(False)
    t = cfg.train
    opt = torch.optim.AdamW(models.parameters(), lr=t.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(t.steps, t.warmup_steps))
    start = time.time()
    for step in range(1, t.steps + 1):
        idx = torch.randint(len(latents), (t.batch_size,), generator=gen)
        x0 = latents[idx]
        drop = (torch.rand(t.batch_size, generator=gen) < t.caption_dropout).tolist()
        prompts = ["" if d else captions[i] for d, i in zip(drop, idx.tolist(), strict=True)]
        ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True, return_tensors="pt").input_ids
        noise = torch.randn(x0.shape, generator=gen)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (t.batch_size,), generator=gen)
        x_t = scheduler.add_noise(x0, noise, timesteps)
        out = unet(x_t, timesteps, encoder_hidden_states=text_encoder(ids)[0]).sample
        loss = F.mse_loss(out, scheduler.get_velocity(x0, noise, timesteps))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(models.parameters(), t.grad_clip)
        opt.step()
        sched.step()
        decay = min(t.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for p_ema, p in zip(ema.parameters(), models.parameters(), strict=True):
                p_ema.lerp_(p, 1 - decay)
        if step % 100 == 0 or step == t.steps:
            elapsed = time.time() - start
            print(f"unet step {step:5d}  loss {loss.item():.4f}  {elapsed / step:.3f} s/step  {elapsed:.0f} s",
                  flush=True)
    unet_ema, text_ema = ema
    return unet_ema, text_ema, scheduler, loss.item(), (time.time() - start) / t.steps


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs/assets/shapes_t2i_teacher.yaml"))
    parser.add_argument("overrides", nargs="*", help="key=value overrides")
    args = parser.parse_args(argv)
    cfg = OmegaConf.merge(OmegaConf.load(args.config), OmegaConf.from_dotlist(args.overrides))
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    start = time.time()

    data = CaptionedShapes(cfg.data.num_images, cfg.data.size, cfg.data.split, seed=cfg.seed)
    images, captions = data.images, data.captions
    tokenizer = word_tokenizer(CAPTION_WORDS, cfg.tokenizer.model_max_length)
    text_config = CLIPTextConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                                 eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                                 **OmegaConf.to_container(cfg.text_encoder))
    text_encoder = CLIPTextModel(text_config)

    vae, vae_mse = train_vae(cfg, images, gen)
    latents = encode(vae, images, gen)
    scaling_factor = float(1 / latents.std())
    vae.register_to_config(scaling_factor=scaling_factor)
    latents = latents * scaling_factor
    unet, text_encoder, scheduler, loss, step_time = train_unet(cfg, latents, captions, tokenizer, text_encoder, gen)

    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder.eval(), tokenizer=tokenizer, unet=unet.eval(),
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    out = ROOT / cfg.out
    pipe.save_pretrained(out, safe_serialization=True)
    provenance = {
        "script": "scripts/train_shapes_t2i_teacher.py",
        "config": OmegaConf.to_container(cfg),
        "data": f"fdistill.data.captions.CaptionedShapes: {data.description}; "
                f"{len(data.combinations)} training combinations",
        "tokenizer": f"word-level CLIP BPE, {len(tokenizer)} tokens; caption words {CAPTION_WORDS}",
        "parameters": {"unet": sum(p.numel() for p in unet.parameters()),
                       "text_encoder": sum(p.numel() for p in text_encoder.parameters()),
                       "vae": sum(p.numel() for p in vae.parameters())},
        "vae_final_mse": round(vae_mse, 6),
        "vae_scaling_factor": scaling_factor,
        "final_loss": round(loss, 5),
        "seconds_per_step": round(step_time, 4),
        "wall_time_s": round(time.time() - start, 1),
        "date": datetime.date.today().isoformat(),
        "torch_version": torch.__version__,
    }
    (out / "provenance.json").write_text(json.dumps(provenance, indent=2) + "\n")
    print(json.dumps({k: v for k, v in provenance.items() if k != "config"}, indent=2))


if __name__ == "__main__":
    main()
