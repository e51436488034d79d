"""Fine-tune the shipped digits teacher into fdistill/assets/digits_imbalanced_teacher (a diffusers DDPM directory).

    OMP_NUM_THREADS=1 python scripts/train_digits_imbalanced_teacher.py \
        [--config configs/assets/digits_imbalanced_teacher.yaml] [key=value ...]

The shipped teacher's null class 10 is an unconditional model of the training digits, whose classes are close to
balanced. This fine-tune gives it the configured class frequencies: every step's batch holds null-class examples
whose digits are drawn with ``class_frequencies``, and labelled examples in the data's own proportions, so that
the conditional classes 0..9 keep drawing their digit. The loss is the shipped teacher's own (DDPM, v-prediction;
see scripts/train_digits_teacher.py) and the shipped weights are the EMA. The run then samples the null class
the way fdistill's image evaluation samples a teacher (Euler ODE steps from one seeded generator, batch by batch,
8-bit images classified by the shipped digits classifier) and records the class frequencies and their total
variation to the configured ones, plus the conditional classes' label accuracy under the same sampler.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
from omegaconf import OmegaConf
from train_digits_teacher import optimizer_and_ema_step  # the script beside this one

from fdistill.data import DigitsDataset
from fdistill.data.images import ImageBatches, normalised_frequencies
from fdistill.evaluation import class_statistics
from fdistill.metrics.class_frequencies import sampling_floor, total_variation
from fdistill.metrics.features import load_digits_classifier, weights_hash
from fdistill.metrics.image_sources import to_uint8_nchw
from fdistill.networks.denoisers import UNetDenoiser, freeze
from fdistill.pipelines.loading import load_diffusers_teacher
from fdistill.samplers.ode import sample_ode

ROOT = Path(__file__).resolve().parent.parent
NULL_CLASS = 10


def train(cfg, data: DigitsDataset) -> tuple[UNet2DModel, DDPMScheduler, float]:
    """EMA weights of the fine-tuned UNet, the base teacher's noise scheduler and the mean seconds per step."""
    torch.manual_seed(cfg.seed)  # batches, noise and timesteps all come from torch's global RNG
    t = cfg.train
    base = ROOT / cfg.base
    unet = UNet2DModel.from_pretrained(base / "unet").train()
    unet.register_to_config(_name_or_path=f"{cfg.base}/unet")  # saved as the repository's path, not this machine's
    scheduler = DDPMScheduler.from_pretrained(base / "scheduler")
    ema = copy.deepcopy(unet).requires_grad_(False)
    opt = torch.optim.AdamW(unet.parameters(), lr=t.lr, weight_decay=0.0)

    def lr_factor(s: int) -> float:
        return min(1.0, (s + 1) / t.warmup_steps) * 0.5 * (1 + math.cos(math.pi * s / t.steps))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    null_batches = iter(ImageBatches(data, t.null_batch_size, class_frequencies=cfg.class_frequencies,
                                     null_label=NULL_CLASS))
    labelled_batches = iter(ImageBatches(data, t.labelled_batch_size))
    start = time.time()
    for step in range(1, t.steps + 1):
        null, labelled = next(null_batches), next(labelled_batches)
        x0, labels = torch.cat([null.real, labelled.real]), torch.cat([null.cond, labelled.cond])
        noise = torch.randn(x0.shape)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (len(x0),))
        x_t = scheduler.add_noise(x0, noise, timesteps)
        loss = F.mse_loss(
            unet(x_t, timesteps, class_labels=labels).sample, scheduler.get_velocity(x0, noise, timesteps)
        )
        optimizer_and_ema_step(unet, ema, opt, sched, loss, t.grad_clip, t.ema_decay, step)
        if step % 50 == 0 or step == t.steps:
            elapsed = time.time() - start
            print(
                f"step {step:5d}  loss {loss.item():.4f}  {elapsed / step:.3f} s/step  {elapsed:.0f} s",
                flush=True,
            )
    return ema.eval(), scheduler, (time.time() - start) / t.steps


@torch.no_grad()
def classifier_logits(teacher: UNetDenoiser, classifier: torch.nn.Module, conditions: torch.Tensor, e) -> torch.Tensor:
    """The digits classifier's logits of teacher samples under ``conditions``, drawn as fdistill's image evaluation
    draws its teacher entry: one generator seeded with ``e.seed`` gives each batch's noise in turn, ``e.steps``
    ODE steps of ``e.sampler``, and the images are classified as their 8-bit quantisation."""
    gen = torch.Generator().manual_seed(e.seed)
    logits = []
    for batch in conditions.split(e.batch_size):
        z = torch.randn((len(batch), *teacher.sample_shape), generator=gen)
        x, _ = sample_ode(teacher, z, e.steps, e.sampler, batch)
        pixels = to_uint8_nchw(x.float().clamp(-1, 1))
        logits.append(classifier(pixels.float() / 127.5 - 1))
    return torch.cat(logits)


def evaluate(teacher_dir: Path, cfg) -> dict:
    """The null class's class frequencies and their TV to ``class_frequencies``, and the label accuracy of the
    conditional classes (labels ``i % 10``), of the teacher saved in ``teacher_dir``."""
    e = cfg.eval
    teacher = freeze(load_diffusers_teacher(teacher_dir))
    classifier = load_digits_classifier()
    target = normalised_frequencies(cfg.class_frequencies, DigitsDataset.num_classes)
    null = class_statistics(classifier_logits(teacher, classifier, torch.full((e.num_samples,), NULL_CLASS), e),
                            None, DigitsDataset.num_classes)
    labels = torch.arange(e.num_samples) % DigitsDataset.num_classes
    labelled = class_statistics(classifier_logits(teacher, classifier, labels, e), labels, DigitsDataset.num_classes)
    return {
        "sampler": f"{e.sampler} ODE, {e.steps} steps (fdistill.samplers.ode.sample_ode), noise from one generator "
        f"seeded {e.seed}, batches of {e.batch_size}; images quantised to 8 bits",
        "num_samples": e.num_samples,
        "seed": e.seed,
        "classifier": f"fdistill.metrics.features.DigitsClassifier argmax, weights sha256 {weights_hash()}",
        "null_class": {
            "class_frequencies": null["class_frequencies"],
            "target_frequencies": [round(f, 6) for f in target.tolist()],
            "tv_to_target": round(total_variation(null["class_frequencies"], target), 4),
            "tv_floor": round(sampling_floor(target, e.num_samples), 4),
            "class_coverage": null["class_coverage"],
        },
        "conditional": {"labels": "i % 10 for sample i", "label_accuracy": labelled["class_accuracy"]},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs/assets/digits_imbalanced_teacher.yaml"))
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.steps=100")
    args = parser.parse_args()
    cfg = OmegaConf.merge(OmegaConf.load(args.config), OmegaConf.from_dotlist(args.overrides))
    data = DigitsDataset("all")
    start = time.time()
    unet, scheduler, step_time = train(cfg, data)
    train_time = time.time() - start
    out = ROOT / cfg.out
    DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(out)
    metric = evaluate(out, cfg)
    command = " ".join(["python", str(Path(sys.argv[0]).resolve().relative_to(ROOT)), *sys.argv[1:]])
    provenance = {
        "script": "scripts/train_digits_imbalanced_teacher.py",
        "command": f"OMP_NUM_THREADS={torch.get_num_threads()} {command}",
        "config": OmegaConf.to_container(cfg),
        "base": f"{cfg.base} (scripts/train_digits_teacher.py), all weights fine-tuned",
        "steps": cfg.train.steps,
        "data": f"sklearn.datasets.load_digits, all {len(data)} images, 8x8 -> 16x16 bilinear, [-1, 1]",
        "conditioning": f"null class 10: {cfg.train.null_batch_size} examples a step, digits drawn with "
        f"class_frequencies; class_labels 0..9: {cfg.train.labelled_batch_size} examples a step, in the data's "
        "proportions",
        "weights": "EMA",
        "parameters": sum(p.numel() for p in unet.parameters()),
        "threads": torch.get_num_threads(),
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
