"""Train the digits feature network shipped in fdistill/assets/digits_classifier.

    python scripts/train_digits_classifier.py [--config configs/assets/digits_classifier.yaml] [key=value ...]

Trains on the fixed train split of scikit-learn's digits with small random shifts (so features do not hinge
on exact pixel positions, which generators get slightly wrong) and records accuracy on the held-out split.
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

from fdistill.data import DigitsDataset
from fdistill.metrics.features import CONFIG_FILE, WEIGHTS_FILE, DigitsClassifier, weights_hash

ROOT = Path(__file__).resolve().parent.parent


def random_shift(x: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each image by up to ``max_shift`` pixels, filling with the background value -1."""
    n, _, h, w = x.shape
    padded = F.pad(x, [max_shift] * 4, value=-1.0)
    offsets = torch.randint(0, 2 * max_shift + 1, (n, 2), generator=generator).tolist()
    return torch.stack([padded[i, :, dy : dy + h, dx : dx + w] for i, (dy, dx) in enumerate(offsets)])


@torch.no_grad()
def accuracy(model: DigitsClassifier, data: DigitsDataset) -> float:
    model.eval()
    return (model(data.images).argmax(1) == data.labels).float().mean().item()


def train(cfg) -> dict:
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    train_set, test_set = DigitsDataset("train"), DigitsDataset("test")
    model = DigitsClassifier(**cfg.model)
    t = cfg.train
    opt = torch.optim.AdamW(model.parameters(), lr=t.lr, weight_decay=t.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, t.steps)
    start = time.time()
    for step in range(1, t.steps + 1):
        model.train()
        idx = torch.randint(0, len(train_set), (t.batch_size,), generator=gen)
        x = random_shift(train_set.images[idx], t.max_shift, gen)
        loss = F.cross_entropy(model(x), train_set.labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 250 == 0 or step == t.steps:
            print(
                f"step {step:5d}  loss {loss.item():.4f}  held-out acc {accuracy(model, test_set):.4f}",
                flush=True,
            )
    out = ROOT / cfg.out
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, out / WEIGHTS_FILE)
    (out / CONFIG_FILE).write_text(json.dumps(model.config, indent=2) + "\n")
    provenance = {
        "script": "scripts/train_digits_classifier.py",
        "config": OmegaConf.to_container(cfg),
        "steps": t.steps,
        "data": f"sklearn.datasets.load_digits, 8x8 -> 16x16 bilinear, [-1, 1]; fdistill.data.DigitsDataset "
        f"split 'train' ({len(train_set)} images), held-out split 'test' ({len(test_set)} images)",
        "held_out_accuracy": round(accuracy(model, test_set), 4),
        "train_accuracy": round(accuracy(model, train_set), 4),
        "weights_sha256_16": weights_hash(out / WEIGHTS_FILE),
        "wall_time_s": round(time.time() - start, 1),
        "date": datetime.date.today().isoformat(),
        "torch_version": torch.__version__,
    }
    (out / "provenance.json").write_text(json.dumps(provenance, indent=2) + "\n")
    return provenance


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs/assets/digits_classifier.yaml"))
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.steps=100")
    args = parser.parse_args()
    cfg = OmegaConf.merge(OmegaConf.load(args.config), OmegaConf.from_dotlist(args.overrides))
    print(json.dumps(train(cfg), indent=2))


if __name__ == "__main__":
    main()
