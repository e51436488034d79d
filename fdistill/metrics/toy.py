"""Metrics for low-dimensional mixtures: mode coverage, mode-weight total variation, energy distance."""

from __future__ import annotations

import torch


def nearest_mode(samples: torch.Tensor, means: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Index of the nearest mode mean for each sample, and the distance to it."""
    d = torch.cdist(samples.double(), means.double())
    distance, index = d.min(1)
    return index, distance


def mode_statistics(samples, means, stds, weights, min_share: float = 0.2, radius: float = 4.0) -> dict:
    """Mode weights from nearest-mode assignment: modes covered (a mode counts when it gets at least
    ``min_share`` of its expected share of samples) and the total variation between sampled and true mode
    weights. Sharpness is reported apart: the fraction of samples farther than ``radius`` stds from every mode."""
    weights = torch.as_tensor(weights, dtype=torch.float64)
    index, distance = nearest_mode(samples, means)
    freq = torch.bincount(index, minlength=len(weights)).double() / len(samples)
    off_mode = float((distance > radius * stds.double()[index]).double().mean())
    return {
        "modes_covered": int((freq >= min_share * weights).sum()),
        "num_modes": len(weights),
        "mode_weight_tv": 0.5 * float((freq - weights).abs().sum()),
        "off_mode_fraction": off_mode,
    }


def energy_distance(x: torch.Tensor, y: torch.Tensor) -> float:
    """``2 E|X - Y| - E|X - X'| - E|Y - Y'|`` (V-statistic with the diagonal excluded), float64."""
    x, y = x.double(), y.double()
    n, m = len(x), len(y)
    dxy = torch.cdist(x, y).mean()
    dxx = torch.cdist(x, x).sum() / (n * (n - 1))
    dyy = torch.cdist(y, y).sum() / (m * (m - 1))
    return float(2 * dxy - dxx - dyy)
