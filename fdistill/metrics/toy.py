"""Metrics for Gaussian mixtures in any dimension: mode coverage, mode-weight total variation, off-mode
fraction, energy distance."""

from __future__ import annotations

import math

import torch
from scipy.special import gammainccinv


def per_mode_coordinate(stds, means: torch.Tensor) -> torch.Tensor:
    """Standard deviations given as one number, one per mode (``[K]``) or one per mode and coordinate
    (``[K, D]``), as ``[K, D]`` float64."""
    stds = torch.as_tensor(stds, dtype=torch.float64, device=means.device)
    return (stds[:, None] if stds.dim() == 1 else stds).expand(means.shape)


def nearest_mode(samples: torch.Tensor, means: torch.Tensor, stds) -> tuple[torch.Tensor, torch.Tensor]:
    """Index of the nearest mode mean for each sample in units of that mode's standard deviations (the
    Mahalanobis distance ``|(x - mu_k) / s_k|`` of a diagonal Gaussian), and that distance."""
    means = means.double()
    scaled = (samples.double()[:, None, :] - means) / per_mode_coordinate(stds, means)  # [N, K, D]
    distance, index = scaled.square().sum(-1).sqrt().min(1)
    return index, distance


def off_mode_threshold(dim: int, radius: float) -> float:
    """The distance, in stds, that a sample of a ``dim``-dimensional Gaussian exceeds as rarely as a 2-D one
    exceeds ``radius``: ``P(chi^2_dim > r^2) = P(chi^2_2 > radius^2) = exp(-radius^2 / 2)``. It is ``radius``
    itself in 2-D and grows with the dimension, where typical samples lie ``sqrt(dim)`` stds from their mean."""
    return math.sqrt(2 * gammainccinv(dim / 2, math.exp(-(radius**2) / 2)))


def mode_statistics(samples, means, stds, weights, min_share: float = 0.2, radius: float = 4.0) -> dict:
    """Mode weights from nearest-mode assignment (in units of each mode's stds): modes covered (a mode counts
    when it gets at least ``min_share`` of its expected share of samples) and the total variation between
    sampled and true mode weights. Sharpness is reported apart: the fraction of samples farther from every mode
    than ``radius`` stds in 2-D, or than the distance as unlikely for an exact sample in D dimensions
    (:func:`off_mode_threshold`). ``stds`` is one number, ``[K]`` or ``[K, D]``."""
    weights = torch.as_tensor(weights, dtype=torch.float64)
    index, distance = nearest_mode(samples, means, stds)
    freq = torch.bincount(index, minlength=len(weights)).double() / len(samples)
    off_mode = float((distance > off_mode_threshold(samples.shape[1], radius)).double().mean())
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
