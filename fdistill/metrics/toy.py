"""Metrics for low-dimensional mixtures: mode coverage, mode-weight total variation, energy distance."""

from __future__ import annotations

import torch


def mode_assignments(samples: torch.Tensor, means: torch.Tensor, stds: torch.Tensor, radius: float = 4.0):
    """Index of the nearest mode for each sample, or ``-1`` when it is farther than ``radius`` stds from all."""
    d = torch.cdist(samples.double(), means.double())
    nearest = d.argmin(1)
    near_enough = d.gather(1, nearest[:, None])[:, 0] <= radius * stds.double()[nearest]
    return torch.where(near_enough, nearest, torch.full_like(nearest, -1))


def mode_statistics(samples, means, stds, weights, min_share: float = 0.2) -> dict:
    """Modes covered (a mode counts when it gets at least ``min_share`` of its expected share of samples) and
    total variation between the sampled and true mode weights; samples off every mode count as a bin of
    true weight 0."""
    weights = torch.as_tensor(weights, dtype=torch.float64)
    assign = mode_assignments(samples, means, stds)
    counts = torch.bincount(assign[assign >= 0], minlength=len(weights)).double()
    freq = counts / len(samples)
    off_mode = float((assign < 0).double().mean())
    tv = 0.5 * (float((freq - weights).abs().sum()) + off_mode)
    covered = int((freq >= min_share * weights).sum())
    return {"modes_covered": covered, "num_modes": len(weights), "mode_weight_tv": tv, "off_mode_fraction": off_mode}


def energy_distance(x: torch.Tensor, y: torch.Tensor) -> float:
    """``2 E|X - Y| - E|X - X'| - E|Y - Y'|`` (V-statistic with the diagonal excluded), float64."""
    x, y = x.double(), y.double()
    n, m = len(x), len(y)
    dxy = torch.cdist(x, y).mean()
    dxx = torch.cdist(x, x).sum() / (n * (n - 1))
    dyy = torch.cdist(y, y).sum() / (m * (m - 1))
    return float(2 * dxy - dxx - dyy)
