"""Feature-extraction throughput for FD/FID on this machine: the shipped digits network against Inception-v3.

    python bench/feature_speed.py [--images 256] [--batch 64] [--threads N] [--device cpu|cuda]

The standard FID Inception weights cannot be downloaded here, so Inception is timed as torchvision's
Inception-v3 architecture with random weights on 299x299 inputs (the pool3 2048-d features FID reads);
throughput does not depend on the weight values. Images start as 16x16 uint8 digits-like tensors and go through
fdistill's ``FeatureNet`` (which resizes to 299 for Inception), so preprocessing is included. Prints a table and
writes ``bench/results/feature_speed.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from torch import nn

from fdistill.metrics.fid import FeatureNet, load_feature_net

RESULTS = Path(__file__).resolve().parents[1] / "bench" / "results" / "feature_speed.json"


class _InceptionPool3(nn.Module):
    """torchvision Inception-v3 up to its 2048-d average pool (the FID layer), random weights."""

    def __init__(self):
        super().__init__()
        from torchvision.models import inception_v3

        self.net = inception_v3(weights=None, aux_logits=False, init_weights=False)
        self.net.fc = nn.Identity()

    def forward(self, x):
        return self.net(x)


def images_per_second(net: FeatureNet, images: torch.Tensor, batch: int, device: str) -> float:
    net = net.to(device)
    net(images[:batch].to(device))  # warm-up
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for i in range(0, len(images), batch):
        net(images[i : i + batch].to(device))
    if device == "cuda":
        torch.cuda.synchronize()
    return len(images) / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (args.images, 1, 16, 16), dtype=torch.uint8, generator=generator)
    nets = {
        "fdistill-digits (16 px, 64-d)": load_feature_net("fdistill-digits"),
        "Inception-v3 architecture (299 px, 2048-d)": FeatureNet(_InceptionPool3().eval(), "inception-architecture",
                                                                 "random", in_channels=3, input_size=299),
    }
    rates = {name: images_per_second(net, images, args.batch, args.device) for name, net in nets.items()}
    digits, inception = rates.values()
    print(f"{'feature network':45s} {'images/s':>10s}")
    for name, rate in rates.items():
        print(f"{name:45s} {rate:10.1f}")
    print(f"ratio digits / inception: {digits / inception:.0f}x")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"images_per_second": rates, "ratio": digits / inception, "device": args.device,
                                   "threads": torch.get_num_threads(), "images": args.images, "batch": args.batch,
                                   "machine": platform.machine(), "torch": torch.__version__}, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
