"""Train the captioned-shapes attribute classifier shipped in fdistill/assets/shapes_attributes.

    python scripts/train_shapes_attributes.py [--config configs/assets/shapes_attributes.yaml] [key=value ...]

Trains on every combination (split "all": an evaluator must read held-out combinations too) with degradations
that keep the attributes (noise, brightness, blur), because generated images are slightly noisy or blurry and
must still be read right. Records accuracies on a separate seed of the data, which tests recompute exactly.
"""

from __future__ import annotations

import argparse
import datetime
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from safetensors.torch import save_file

from fdistill.data.captions import HELDOUT_COMBINATIONS, CaptionedShapes
from fdistill.metrics.attributes import AttributeClassifier, compositional_accuracy
from fdistill.metrics.features import CONFIG_FILE, WEIGHTS_FILE, weights_hash

ROOT = Path(__file__).resolve().parent.parent


def shapes_data(num_images: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Images [N, 3, 32, 32] in [-1, 1] of ``CaptionedShapes(split="all")`` and their attribute indices [N, 3]."""
    data = CaptionedShapes(num_images, split="all", seed=seed)
    return data.images, torch.tensor([data.attributes(i) for i in range(num_images)])


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, radius: int = 2) -> torch.Tensor:
    """Blur image ``i`` of ``x`` [N, C, H, W] with a Gaussian of std ``sigma[i]`` (0 leaves it unchanged)."""
    n, c, h, w = x.shape
    taps = torch.arange(-radius, radius + 1, dtype=x.dtype)
    kernel = torch.exp(-0.5 * (taps / sigma.clamp(min=1e-3)[:, None]) ** 2)
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(c, 0)  # [N * C, 2r + 1]
    y = F.pad(x.reshape(1, n * c, h, w), [radius] * 4, mode="replicate")
    y = F.conv2d(y, kernel[:, None, None, :], groups=n * c)
    y = F.conv2d(y, kernel[:, None, :, None], groups=n * c)
    return y.reshape(n, c, h, w)


def augment(x: torch.Tensor, cfg, generator: torch.Generator) -> torch.Tensor:
    """Attribute-preserving degradations of images in [-1, 1]: brightness gain and offset, blur on half the
    images, Gaussian noise; each drawn per image up to the strengths in ``cfg``."""
    n = len(x)

    def uniform(low: float, high: float) -> torch.Tensor:
        return (low + (high - low) * torch.rand(n, generator=generator)).view(n, 1, 1, 1)

    x = ((x + 1) / 2 * uniform(1 - cfg.brightness, 1 + cfg.brightness / 2) + uniform(-cfg.offset, cfg.offset))
    sigma = cfg.blur * torch.rand(n, generator=generator) * (torch.rand(n, generator=generator) < 0.5)
    x = gaussian_blur(x * 2 - 1, sigma)
    x = x + uniform(0, cfg.noise) * torch.randn(x.shape, generator=generator)
    return x.clamp(-1, 1)


def train(cfg) -> dict:
    torch.set_num_threads(1)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    images, combos = shapes_data(cfg.data.train_images, cfg.seed)
    eval_images, eval_combos = shapes_data(cfg.data.eval_images, cfg.data.eval_seed)
    heldout = torch.tensor([tuple(c) in set(HELDOUT_COMBINATIONS) for c in eval_combos.tolist()])
    model = AttributeClassifier(**cfg.model)
    t = cfg.train
    opt = torch.optim.AdamW(model.parameters(), lr=t.lr, weight_decay=t.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, t.steps)
    start = time.time()
    for step in range(1, t.steps + 1):
        model.train()
        idx = torch.randint(0, len(images), (t.batch_size,), generator=gen)
        logits = model(augment(images[idx], cfg.augment, gen))
        loss = sum(F.cross_entropy(logits[name], combos[idx, i]) for i, name in enumerate(model.heads))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 250 == 0 or step == t.steps:
            model.eval()
            acc = compositional_accuracy(model, eval_images, eval_combos)["accuracy"]
            print(f"step {step:5d}  loss {loss.item():.4f}  held-out-seed accuracy {acc:.4f}", flush=True)
    wall_time = time.time() - start
    model.eval()
    out = ROOT / cfg.out
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, out / WEIGHTS_FILE)
    (out / CONFIG_FILE).write_text(json.dumps(model.config, indent=2) + "\n")
    accuracies = {k: round(v, 4) for k, v in compositional_accuracy(model, eval_images, eval_combos).items()}
    heldout_accuracy = compositional_accuracy(model, eval_images[heldout], eval_combos[heldout])["accuracy"]
    provenance = {
        "script": "scripts/train_shapes_attributes.py",
        "config": OmegaConf.to_container(cfg),
        "steps": t.steps,
        "data": f"fdistill.data.captions.CaptionedShapes(split='all'), 32 px RGB in [-1, 1]: "
        f"{cfg.data.train_images} training images (seed {cfg.seed}), augmented; accuracies on "
        f"{cfg.data.eval_images} clean images of seed {cfg.data.eval_seed}",
        "held_out_seed": {"seed": cfg.data.eval_seed, "num_images": cfg.data.eval_images, **accuracies,
                          "heldout_combinations_accuracy": round(heldout_accuracy, 4),
                          "heldout_combinations_images": int(heldout.sum())},
        "augmented_accuracy": round(compositional_accuracy(
            model, augment(eval_images, cfg.augment, torch.Generator().manual_seed(cfg.data.eval_seed)),
            eval_combos)["accuracy"], 4),
        "weights_sha256_16": weights_hash(out / WEIGHTS_FILE),
        "wall_time_s": round(wall_time, 1),
        "date": datetime.date.today().isoformat(),
        "torch_version": torch.__version__,
    }
    (out / "provenance.json").write_text(json.dumps(provenance, indent=2) + "\n")
    return provenance


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs/assets/shapes_attributes.yaml"))
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.steps=100")
    args = parser.parse_args()
    cfg = OmegaConf.merge(OmegaConf.load(args.config), OmegaConf.from_dotlist(args.overrides))
    print(json.dumps(train(cfg), indent=2))


if __name__ == "__main__":
    main()
