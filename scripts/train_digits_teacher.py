"""Train the embedded teacher shipped in fdistill/assets/digits_teacher (a diffusers DDPM directory).

    python scripts/train_digits_teacher.py [--config configs/assets/digits_teacher.yaml] [key=value ...]

Ordinary DDPM training (Ho et al. 2020, arXiv:2006.11239) of a class-conditional UNet2DModel with the
v-prediction target v = alpha_t eps - sigma_t x0 (Salimans & Ho 2022, arXiv:2202.00512, sec. 4). v rather
than eps because a one-step student reads x0 from the teacher at t=999, where x0 = (x_t - sigma eps) / alpha
amplifies eps errors by 1 / alpha_999 ~ 156, whereas x0 = alpha x_t - sigma v does not. Labels are dropped to
the null class 10 with probability 0.1 so classifier-free guidance (arXiv:2207.12598) is available.
The run then measures its own FD: 35-step DDIM samples against the real digits, in the features of the
shipped digits classifier (train that first: scripts/train_digits_classifier.py).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMPipeline, DDPMScheduler, UNet2DModel
from omegaconf import OmegaConf

from fdistill.data import DigitsDataset
from fdistill.metrics.features import (
    DIGITS_CLASSIFIER_DIR,
    WEIGHTS_FILE,
    load_digits_classifier,
    weights_hash,
)
from fdistill.metrics.fid import feature_statistics, frechet_distance

ROOT = Path(__file__).resolve().parent.parent
NULL_CLASS = 10


def optimizer_and_ema_step(unet, ema, opt, sched, loss: torch.Tensor, grad_clip: float, ema_decay: float,
                           step: int) -> None:
    """Backpropagate ``loss``, clip, step the optimizer and its LR schedule, then move the EMA towards ``unet``
    (decay warmed up over the first steps, so that early EMA weights follow the training ones)."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(unet.parameters(), grad_clip)
    opt.step()
    sched.step()
    decay = min(ema_decay, (1 + step) / (10 + step))
    with torch.no_grad():
        for p_ema, p in zip(ema.parameters(), unet.parameters(), strict=True):
            p_ema.lerp_(p, 1 - decay)


def train(cfg, data: DigitsDataset) -> tuple[UNet2DModel, DDPMScheduler, float]:
    """EMA weights, the noise scheduler and the mean seconds per training step."""
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    t = cfg.train
    unet = UNet2DModel(**OmegaConf.to_container(cfg.unet))
    scheduler = DDPMScheduler(**OmegaConf.to_container(cfg.scheduler))
    ema = copy.deepcopy(unet).requires_grad_(False)
    opt = torch.optim.AdamW(unet.parameters(), lr=t.lr, weight_decay=0.0)

    def lr_factor(s: int) -> float:
        return min(1.0, (s + 1) / t.warmup_steps) * 0.5 * (1 + math.cos(math.pi * s / t.steps))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    start = time.time()
    for step in range(1, t.steps + 1):
        idx = torch.randint(0, len(data), (t.batch_size,), generator=gen)
        x0, labels = data.images[idx], data.labels[idx]
        labels = torch.where(torch.rand(t.batch_size, generator=gen) < t.label_dropout, NULL_CLASS, labels)
        noise = torch.randn(x0.shape, generator=gen)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (t.batch_size,), generator=gen)
        x_t = scheduler.add_noise(x0, noise, timesteps)
        loss = F.mse_loss(
            unet(x_t, timesteps, class_labels=labels).sample, scheduler.get_velocity(x0, noise, timesteps)
        )
        optimizer_and_ema_step(unet, ema, opt, sched, loss, t.grad_clip, t.ema_decay, step)
        if step % 100 == 0 or step == t.steps:
            elapsed = time.time() - start
            print(
                f"step {step:5d}  loss {loss.item():.4f}  {elapsed / step:.3f} s/step  {elapsed:.0f} s",
                flush=True,
            )
    return ema.eval(), scheduler, (time.time() - start) / t.steps


@torch.no_grad()
def ddim_sample(
    unet: UNet2DModel, scheduler: DDPMScheduler, labels: torch.Tensor, steps: int, gen: torch.Generator
) -> torch.Tensor:
    """Deterministic DDIM (eta 0, arXiv:2010.02502) on the teacher's schedule, conditional on ``labels``."""
    ddim = DDIMScheduler.from_config(scheduler.config)
    ddim.set_timesteps(steps)
    c, s = unet.config.in_channels, unet.config.sample_size
    x = torch.randn((len(labels), c, s, s), generator=gen)
    for t in ddim.timesteps:
        x = ddim.step(unet(x, t, class_labels=labels).sample, t, x).prev_sample
    return x.clamp(-1, 1)


@torch.no_grad()
def evaluate(unet: UNet2DModel, scheduler: DDPMScheduler, data: DigitsDataset, cfg) -> dict:
    """FD and label accuracy of class-balanced DDIM samples, and the FD between two real halves for scale.

    The halves are class-stratified like the samples: with ~900 images per side, random class proportions
    alone move this FD by about 2x, and it is the floor the teacher's FD can be read against.
    """
    e = cfg.eval
    classifier = load_digits_classifier()
    gen = torch.Generator().manual_seed(e.seed)
    labels = torch.arange(e.num_samples) % 10
    samples = torch.cat(
        [ddim_sample(unet, scheduler, y, e.ddim_steps, gen) for y in labels.split(e.batch_size)]
    )
    fake_feats, real_feats = classifier.features(samples).numpy(), classifier.features(data.images).numpy()
    rng, targets = np.random.default_rng(e.seed), data.labels.numpy()
    members = [rng.permutation(np.flatnonzero(targets == c)) for c in range(10)]
    halves = [feature_statistics(real_feats[np.concatenate([m[k::2] for m in members])]) for k in (0, 1)]
    return {
        "sampler": f"DDIM eta=0, {e.ddim_steps} steps, timestep_spacing={scheduler.config.timestep_spacing}, "
        "conditional (no guidance), labels i % 10",
        "num_samples": e.num_samples,
        "seed": e.seed,
        "reference": f"all {len(data)} digits; halves: class-stratified, alternate members of each class",
        "feature_net": f"fdistill.metrics.features.DigitsClassifier 64-d, weights sha256 "
        f"{weights_hash(DIGITS_CLASSIFIER_DIR / WEIGHTS_FILE)}",
        "fd": round(frechet_distance(*feature_statistics(fake_feats), *feature_statistics(real_feats)), 3),
        "label_accuracy": round((classifier(samples).argmax(1) == labels).float().mean().item(), 4),
        "fd_real_halves": round(frechet_distance(*halves[0], *halves[1]), 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs/assets/digits_teacher.yaml"))
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.steps=100")
    args = parser.parse_args()
    cfg = OmegaConf.merge(OmegaConf.load(args.config), OmegaConf.from_dotlist(args.overrides))
    data = DigitsDataset("all")
    start = time.time()
    unet, scheduler, step_time = train(cfg, data)
    train_time = time.time() - start
    out = ROOT / cfg.out
    DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(out)
    metric = evaluate(unet, scheduler, data, cfg)
    provenance = {
        "script": "scripts/train_digits_teacher.py",
        "config": OmegaConf.to_container(cfg),
        "steps": cfg.train.steps,
        "data": f"sklearn.datasets.load_digits, all {len(data)} images, 8x8 -> 16x16 bilinear, [-1, 1]",
        "conditioning": "class_labels 0..9; 10 is the null class (trained with probability "
        f"{cfg.train.label_dropout}) for classifier-free guidance",
        "weights": "EMA",
        "parameters": sum(p.numel() for p in unet.parameters()),
        "seconds_per_step": round(step_time, 3),
        "train_wall_time_s": round(train_time, 1),
        "total_wall_time_s": round(time.time() - start, 1),
        "metric": metric,
        "date": datetime.date.today().isoformat(),
        "torch_version": torch.__version__,
    }
    (out / "provenance.json").write_text(json.dumps(provenance, indent=2) + "\n")
    print(json.dumps(provenance, indent=2))


if __name__ == "__main__":
    main()
