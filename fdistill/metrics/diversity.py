"""Per-condition diversity: how different a sampler's samples of one prompt (or class) are from each other.

Definition. For features ``f_1 .. f_n`` of the samples drawn for one condition ``c`` (the FD feature network's
features, so that diversity and FD see the same space),

    diversity(c) = 2 / (n (n - 1)) * sum_{i < j} ||f_i - f_j||_2,

the mean Euclidean distance over the ``n (n - 1) / 2`` unordered pairs; the reported diversity is the mean of
``diversity(c)`` over the conditions with at least two samples, each condition weighted equally. Identical samples
give 0. Reported for the student and for the teacher under the same protocol, a ratio student / teacher below 1
shows a student that draws less varied samples per condition than its teacher: mode collapse within a prompt,
which FD over all prompts together may not show when the collapsed samples still cover the prompts' mix.
"""

from __future__ import annotations

import numpy as np
import torch


def mean_pairwise_distance(features) -> float:
    """The mean Euclidean distance between the rows of ``features`` ([n >= 2, D]) over all unordered pairs."""
    x = torch.as_tensor(np.asarray(features), dtype=torch.float64)
    if x.ndim != 2 or len(x) < 2:
        raise ValueError(f"need features [n >= 2, D] for a pairwise distance, got shape {tuple(x.shape)}")
    return float(torch.pdist(x).mean())


def group_diversity(features, groups) -> float:
    """Per-condition diversity (see the module docstring): ``features`` [N, D] of N samples, ``groups`` [N] the
    condition (prompt or class index) each sample was drawn for."""
    x = torch.as_tensor(np.asarray(features), dtype=torch.float64)
    groups = torch.as_tensor(groups)
    if len(groups) != len(x):
        raise ValueError(f"{len(x)} feature rows but {len(groups)} group indices")
    members = [x[groups == g] for g in torch.unique(groups)]
    values = [mean_pairwise_distance(m) for m in members if len(m) >= 2]
    if not values:
        raise ValueError("per-condition diversity needs at least two samples of one condition")
    return float(np.mean(values))

