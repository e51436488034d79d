"""An attribute classifier for captioned shapes: reads colour, shape and position off an image, so that a
text-to-image sample can be checked against the caption it was asked for (compositional accuracy), and gives
the 64-d features of the ``fdistill-shapes`` Frechet distance.

It is trained on every combination, the held-out ones included (``scripts/train_shapes_attributes.py``):
an evaluator that never saw a held-out combination could not be trusted to judge samples of one. Attribute
indices follow ``fdistill.data.captions.ATTRIBUTES`` (colour, shape, position), which this module does not
import so that metrics stay independent of the data sets.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from fdistill.metrics.features import CONFIG_FILE, WEIGHTS_FILE

SHAPES_ATTRIBUTES_DIR = Path(__file__).resolve().parent.parent / "assets" / "shapes_attributes"
HEADS = {"colour": 4, "shape": 3, "position": 4}  # classes per attribute, in the order of a combination
IMAGE_SIZE = 32


class AttributeClassifier(nn.Module):
    """Three conv stages (32 -> 16 -> 8 -> 4 px), a ``feature_dim`` ReLU layer and one linear head per
    attribute; inputs [N, 3, 32, 32] in [-1, 1]. Position is read from the 4x4 map before flattening, which is
    why there is no global pooling."""

    def __init__(self, channels: int = 16, feature_dim: int = 64, heads: dict[str, int] | None = None):
        super().__init__()
        heads = dict(HEADS if heads is None else heads)
        c = channels

        def stage(c_in: int, c_out: int) -> list[nn.Module]:
            return [nn.Conv2d(c_in, c_out, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]

        self.body = nn.Sequential(
            nn.Conv2d(3, c, 3, padding=1), nn.ReLU(),
            *stage(c, c), *stage(c, 2 * c), *stage(2 * c, 2 * c),
            nn.Flatten(), nn.Linear(2 * c * 4 * 4, feature_dim), nn.ReLU(),
        )
        self.heads = nn.ModuleDict({name: nn.Linear(feature_dim, n) for name, n in heads.items()})
        self.config = {"channels": channels, "feature_dim": feature_dim, "heads": heads}

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate activations [N, feature_dim] of images [N, 3, 32, 32] in [-1, 1]."""
        return self.body(x)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Logits per attribute: ``{"colour": [N, 4], "shape": [N, 3], "position": [N, 4]}``."""
        h = self.body(x)
        return {name: head(h) for name, head in self.heads.items()}


def load_attribute_classifier(path: str | Path | None = None, device: str | torch.device = "cpu"
                              ) -> AttributeClassifier:
    """The shipped (or ``path``'s) classifier, frozen and in eval mode."""
    from safetensors.torch import load_file

    folder = Path(path) if path is not None else SHAPES_ATTRIBUTES_DIR
    missing = [folder / name for name in (CONFIG_FILE, WEIGHTS_FILE) if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(f"shapes attribute classifier file {missing[0]} is missing; recreate it with "
                                "`python scripts/train_shapes_attributes.py`")
    model = AttributeClassifier(**json.loads((folder / CONFIG_FILE).read_text()))
    model.load_state_dict(load_file(folder / WEIGHTS_FILE, device=str(device)))
    return model.to(device).eval().requires_grad_(False)


@torch.no_grad()
def predict_attributes(classifier: AttributeClassifier, images: torch.Tensor, batch_size: int = 512
                       ) -> torch.Tensor:
    """Predicted (colour, shape, position) indices [N, 3] of float images [N, 3, H, W] in [-1, 1]; other sizes
    than 32 px are resized (bilinear, antialiased) as the Frechet-distance features are."""
    if images.ndim != 4 or images.shape[1] != 3 or not images.is_floating_point():
        raise ValueError(f"images must be float [N, 3, H, W] in [-1, 1], got {images.dtype} {tuple(images.shape)}")
    device = next(classifier.parameters()).device
    predictions = []
    for batch in images.split(batch_size):
        x = batch.to(device, torch.float32)
        if tuple(x.shape[-2:]) != (IMAGE_SIZE, IMAGE_SIZE):
            x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False,
                              antialias=True)
        logits = classifier(x)
        predictions.append(torch.stack([logits[name].argmax(1) for name in classifier.heads], 1).cpu())
    return torch.cat(predictions)


def compositional_accuracy(classifier: AttributeClassifier, images: torch.Tensor,
                           combos: Sequence[Sequence[int]] | torch.Tensor, batch_size: int = 512) -> dict:
    """How often images show the attributes they were asked for: ``accuracy`` is the fraction whose colour,
    shape and position all match ``combos[i]`` (the (colour, shape, position) indices of image ``i``'s
    caption), and ``colour``, ``shape``, ``position`` the fraction right per attribute."""
    target = torch.as_tensor(combos, dtype=torch.long).reshape(-1, len(classifier.heads))
    if len(target) != len(images):
        raise ValueError(f"{len(images)} images but {len(target)} attribute combinations")
    correct = predict_attributes(classifier, images, batch_size) == target
    result = {"accuracy": correct.all(1).float().mean().item()}
    result.update({name: correct[:, i].float().mean().item() for i, name in enumerate(classifier.heads)})
    return result
