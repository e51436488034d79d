"""The two containers every layer passes around: a training :class:`Batch` and the run's :class:`Networks`.

This module is neutral ground: data, objectives, tasks and the trainer all import it, and it imports nothing of
theirs, so none of them has to import another to agree on these types.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch
from torch import nn


@dataclass
class Batch:
    """One training batch: real (or exact teacher) samples when the objective needs them, and conditions."""

    size: int
    real: torch.Tensor | None = None
    cond: torch.Tensor | None = None

    def _payload(self) -> list[str]:
        return [f.name for f in fields(self) if f.name != "size"]

    def split(self, parts: int) -> list[Batch]:
        """``parts`` equal slices: tensors and lists of ``size`` rows are cut (inside dicts too), the rest kept."""
        if self.size % parts:
            raise ValueError(f"a batch of {self.size} does not split into {parts} equal micro-batches")
        size = self.size // parts

        def cut(x, i):
            if isinstance(x, dict):
                return {k: cut(v, i) for k, v in x.items()}
            if (torch.is_tensor(x) or isinstance(x, (list, tuple))) and len(x) == self.size:
                return x[i * size:(i + 1) * size]
            return x

        return [replace(self, size=size, **{n: cut(getattr(self, n), i) for n in self._payload()})
                for i in range(parts)]

    def to(self, device) -> Batch:
        """The batch with every tensor (inside dicts too) on ``device``."""

        def move(x):
            if isinstance(x, dict):
                return {k: move(v) for k, v in x.items()}
            return x.to(device) if torch.is_tensor(x) else x

        return replace(self, **{n: move(getattr(self, n)) for n in self._payload()})


@dataclass
class Networks:
    """Everything an objective may read. The teacher is frozen; every other member present is trained by some
    step (which one, the objective says)."""

    teacher: nn.Module
    student: nn.Module
    fake_score: nn.Module | None = None
    discriminator: nn.Module | None = None

    def present(self) -> dict[str, nn.Module]:
        """Every member that is set, by field name, the teacher first."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    def trainable(self) -> dict[str, nn.Module]:
        """The members that some step trains (all but the teacher), by field name."""
        return {name: net for name, net in self.present().items() if name != "teacher"}

    def to(self, device) -> Networks:
        for net in self.present().values():
            net.to(device)
        return self

    @property
    def device(self) -> torch.device:
        """Where the student (and so every sample it draws) lives."""
        return next(self.student.parameters()).device
