"""Feature-space metrics beside FD: KID and improved precision/recall.

Both take features already extracted by a :class:`fdistill.metrics.fid.FeatureNet`, shaped [N, D].
"""

from __future__ import annotations

import numpy as np
import torch


def kernel_inception_distance(
    real: np.ndarray, fake: np.ndarray, subsets: int = 100, subset_size: int = 1000, seed: int = 0
) -> dict:
    """KID (Binkowski et al. 2018, arXiv:1801.01401, eq. 2 with the cubic polynomial kernel
    k(x, y) = (x.y / d + 1)^3): the unbiased MMD^2 estimate, averaged over ``subsets`` random subsets of
    ``min(subset_size, N_real, N_fake)`` points each. The per-subset estimator is torchmetrics' ``poly_mmd``;
    the subsets are drawn from a seeded generator (computed in float64)."""
    from torchmetrics.image.kid import poly_mmd  # importing torchmetrics takes seconds: only when asked

    real_t, fake_t = torch.as_tensor(real, dtype=torch.float64), torch.as_tensor(fake, dtype=torch.float64)
    m = min(subset_size, len(real_t), len(fake_t))
    if m < 2:
        raise ValueError(f"KID needs at least 2 samples per set, got {len(real_t)} and {len(fake_t)}")
    gen = torch.Generator().manual_seed(seed)
    values = torch.stack(
        [
            poly_mmd(real_t[torch.randperm(len(real_t), generator=gen)[:m]],
                     fake_t[torch.randperm(len(fake_t), generator=gen)[:m]])
            for _ in range(subsets)
        ]
    )
    return {"kid_mean": float(values.mean()), "kid_std": float(values.std(unbiased=False)),
            "kid_subsets": subsets, "kid_subset_size": m}


def _pairwise(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # Exact differences (no matmul expansion): a point's distance to its own copy must be exactly 0.
    return torch.cdist(a, b, compute_mode="donot_use_mm_for_euclid_dist")


def _knn_radii(feats: torch.Tensor, k: int, chunk: int) -> torch.Tensor:
    """Distance from each point to its k-th nearest neighbour in the same set, the point itself excluded."""
    return torch.cat([_pairwise(feats[i : i + chunk], feats).topk(k + 1, largest=False).values[:, k]
                      for i in range(0, len(feats), chunk)])


def _inside_manifold(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor,
                     chunk: int) -> torch.Tensor:
    return torch.cat([(_pairwise(points[i : i + chunk], centres) <= radii[None]).any(dim=1)
                      for i in range(0, len(points), chunk)])


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3, chunk: int = 1024) -> dict:
    """Improved precision and recall (Kynkaanniemi et al. 2019, arXiv:1904.06991, eqs. 1-3).

    Each set's manifold is the union of balls around its points with radius the distance to the k-th
    nearest neighbour (k=3 as in the paper). Precision is the fraction of fake points inside the real
    manifold, recall the fraction of real points inside the fake manifold. torchmetrics has no
    implementation; it is small enough to write here on features (float32, distances chunked).
    """
    real_t, fake_t = torch.as_tensor(real, dtype=torch.float32), torch.as_tensor(fake, dtype=torch.float32)
    if min(len(real_t), len(fake_t)) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} samples per set")
    real_radii, fake_radii = _knn_radii(real_t, k, chunk), _knn_radii(fake_t, k, chunk)
    precision = _inside_manifold(fake_t, real_t, real_radii, chunk).double().mean()
    recall = _inside_manifold(real_t, fake_t, fake_radii, chunk).double().mean()
    return {"precision": float(precision), "recall": float(recall), "pr_k": k}
