"""A small digits classifier whose 64-d penultimate layer is the feature space for CPU Frechet distances.

Inception at 299 px runs at about 5 images/s on CPU, so the embedded default measures FD in the features of
a classifier trained on the real digits (``scripts/train_digits_classifier.py``). Numbers from different
feature nets are not comparable; ``weights_hash`` names the net a number was computed with.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
import torch.nn as nn

DIGITS_CLASSIFIER_DIR = Path(__file__).resolve().parent.parent / "assets" / "digits_classifier"
WEIGHTS_FILE, CONFIG_FILE = "model.safetensors", "config.json"


class DigitsClassifier(nn.Module):
    """Two conv stages (16 -> 8 -> 4 px), a ``feature_dim`` ReLU layer, a linear head; inputs in [-1, 1]."""

    def __init__(
        self, channels: int = 32, feature_dim: int = 64, num_classes: int = 10, in_channels: int = 1
    ):
        super().__init__()
        c = channels

        def stage(c_in: int, c_out: int) -> list[nn.Module]:
            return [
                nn.Conv2d(c_in, c_out, 3, padding=1),
                nn.ReLU(),
                nn.Conv2d(c_out, c_out, 3, padding=1),
                nn.ReLU(),
                nn.MaxPool2d(2),
            ]

        self.body = nn.Sequential(
            *stage(in_channels, c),
            *stage(c, 2 * c),
            nn.Flatten(),
            nn.Linear(2 * c * 4 * 4, feature_dim),
            nn.ReLU(),
        )
        self.head = nn.Linear(feature_dim, num_classes)
        self.config = {
            "channels": channels,
            "feature_dim": feature_dim,
            "num_classes": num_classes,
            "in_channels": in_channels,
        }

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate activations [N, feature_dim] of images [N, 1, 16, 16] in [-1, 1]."""
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def load_digits_classifier(
    device: str | torch.device = "cpu", path: str | Path | None = None
) -> DigitsClassifier:
    """The shipped (or ``path``'s) classifier, frozen and in eval mode."""
    from safetensors.torch import load_file

    folder = Path(path) if path is not None else DIGITS_CLASSIFIER_DIR
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        raise FileNotFoundError(
            f"digits classifier weights {weights} are missing; recreate them with "
            "`python scripts/train_digits_classifier.py`"
        )
    model = DigitsClassifier(**json.loads((folder / CONFIG_FILE).read_text()))
    model.load_state_dict(load_file(weights, device=str(device)))
    return model.to(device).eval().requires_grad_(False)


def weights_hash(path: str | Path | None = None) -> str:
    """First 16 hex digits of the sha256 of a safetensors file (default: the shipped classifier's)."""
    file = Path(path) if path is not None else DIGITS_CLASSIFIER_DIR / WEIGHTS_FILE
    return hashlib.sha256(file.read_bytes()).hexdigest()[:16]
