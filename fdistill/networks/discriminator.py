"""Discriminator heads on a frozen network's features (docs/objectives.md §2.4).

The discriminator reads the features the teacher returns from ``forward_with_features`` on a noisy sample
``x_t`` and outputs logits ``[B, n_heads]``. Trained with real = teacher/data as the positive class, its
optimal logit is ``log p_t(x)/q_t(x)``, so ``exp(logit)`` estimates the density ratio.
"""

from __future__ import annotations

import torch
from torch import nn


def _groups(channels: int) -> int:
    """GroupNorm groups: FastGen's largest divisor <= 32, kept to >= 4 channels per group, since the 1x1
    stage normalises over the channels of a group alone (one channel per group would output zeros)."""
    return max(g for g in range(1, max(1, min(32, channels // 4)) + 1) if channels % g == 0)


def _down(channels: int, kernel: int = 4, stride: int = 2, padding: int = 1) -> list[nn.Module]:
    conv = nn.Conv2d(channels, channels, kernel, stride, padding)
    return [conv, nn.GroupNorm(_groups(channels), channels), nn.SiLU()]


class ConvHead(nn.Module):
    """FastGen's head: ``[Conv4x4 s2 -> GN -> SiLU]`` down to 8x8, then 8->4, 4->1 and a 1x1 conv to one logit.

    Feature maps smaller than 8x8 go straight to the 4->1 stage after a 2x nearest upsample to 4x4 when needed.
    """

    def __init__(self, channels: int, resolution: int):
        super().__init__()
        layers: list[nn.Module] = []
        while resolution > 4:
            layers += _down(channels)
            resolution //= 2
        if resolution < 4:
            layers.append(nn.Upsample(size=(4, 4), mode="nearest"))
        layers += _down(channels, kernel=4, stride=4, padding=0)
        layers.append(nn.Conv2d(channels, 1, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, feature: torch.Tensor) -> torch.Tensor:
        return self.net(feature).flatten(1)


class FrameConvHead(ConvHead):
    """For video features ``[B, C, F, H, W]``: the :class:`ConvHead` on each of the ``F`` frames' maps (the frames
    have already attended to each other inside the teacher), its logits averaged into one per video."""

    def forward(self, feature: torch.Tensor) -> torch.Tensor:
        frames = feature.transpose(1, 2).flatten(0, 1)  # [B F, C, H, W]
        return self.net(frames).reshape(len(feature), -1).mean(1, keepdim=True)


class MLPHead(nn.Module):
    """For vector data: an MLP on the feature vector (for analytic teachers: ``[x_t, c_noise]``)."""

    def __init__(self, in_dim: int, hidden: int = 128, depth: int = 3):
        super().__init__()
        layers, width = [], in_dim
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.SiLU()]
            width = hidden
        layers.append(nn.Linear(width, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, feature: torch.Tensor) -> torch.Tensor:
        return self.net(feature)


class Discriminator(nn.Module):
    """One head per feature tensor; logits ``[B, n_heads]``."""

    def __init__(self, heads: list[nn.Module]):
        super().__init__()
        self.heads = nn.ModuleList(heads)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        if len(features) != len(self.heads):
            raise ValueError(f"discriminator has {len(self.heads)} heads but got {len(features)} feature maps")
        return torch.cat([head(f.float()) for head, f in zip(self.heads, features, strict=True)], dim=1)


def discriminator_for(features: list[torch.Tensor]) -> Discriminator:
    """Build heads matching example features: conv heads for ``[B, C, H, W]``, per-frame conv heads for video's
    ``[B, C, F, H, W]``, MLP heads for ``[B, D]``."""
    return Discriminator([head_for(f) for f in features])


def head_for(feature: torch.Tensor) -> nn.Module:
    """The head that reads example ``feature``: by its dimensions, video maps, image maps or vectors."""
    if feature.dim() == 5:
        return FrameConvHead(feature.shape[1], feature.shape[-1])
    if feature.dim() == 4:
        return ConvHead(feature.shape[1], feature.shape[-1])
    return MLPHead(feature.shape[1])
