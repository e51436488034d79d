"""Class frequencies of generated samples and their total-variation distance to reference frequencies.

An unconditional generator chooses how often it draws each class; a classifier's predictions give those
frequencies, and ``TV = 1/2 sum_y |f_y - f_ref_y|`` (in [0, 1]) measures how far they are from a reference: the
class frequencies of the training data or of the teacher's samples. With ``n`` samples TV is biased upward by
sampling noise, about ``1/2 sum_y sqrt(2 f_y (1 - f_y) / (pi n))`` when the frequencies match exactly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def class_frequencies(predicted: torch.Tensor, num_classes: int) -> torch.Tensor:
    """The fraction of ``predicted`` class indices (``[N]`` integers in ``[0, num_classes)``) in each class."""
    predicted = torch.as_tensor(predicted)
    if predicted.ndim != 1 or not len(predicted) or predicted.is_floating_point():
        raise ValueError(f"predicted must be a non-empty [N] tensor of class indices, got {predicted.dtype} "
                         f"{tuple(predicted.shape)}")
    if predicted.min() < 0 or predicted.max() >= num_classes:
        raise ValueError(f"predicted class indices must lie in [0, {num_classes}), got "
                         f"[{int(predicted.min())}, {int(predicted.max())}]")
    return torch.bincount(predicted.long(), minlength=num_classes).double() / len(predicted)


def total_variation(frequencies: Sequence[float] | torch.Tensor, reference: Sequence[float] | torch.Tensor) -> float:
    """``1/2 sum_y |f_y - ref_y|`` between two class-frequency vectors of the same length, each summing to 1."""
    f, ref = (torch.as_tensor(v, dtype=torch.float64) for v in (frequencies, reference))
    if f.shape != ref.shape or f.ndim != 1:
        raise ValueError(f"frequency vectors of shapes {tuple(f.shape)} and {tuple(ref.shape)}; give two of "
                         "one length")
    for v in (f, ref):
        if (v < 0).any() or not math.isclose(float(v.sum()), 1.0, abs_tol=1e-6):
            raise ValueError(f"class frequencies {v.tolist()} must be non-negative and sum to 1")
    return 0.5 * float((f - ref).abs().sum())


def sampling_floor(reference: Sequence[float] | torch.Tensor, num_samples: int) -> float:
    """The expected TV of ``num_samples`` draws from ``reference`` to ``reference`` itself (normal
    approximation): TVs below a few times this are indistinguishable from exact agreement."""
    f = torch.as_tensor(reference, dtype=torch.float64)
    return 0.5 * float(torch.sqrt(2 * f * (1 - f) / (math.pi * num_samples)).sum())
