"""The toy judge: samples of an analytic Gaussian mixture judged against the mixture itself (modes covered,
mode-weight TV, off-mode fraction) and against exact teacher samples (energy distance)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fdistill.evaluation.loop import Drawn, Judge, SampleSet
from fdistill.metrics.toy import energy_distance, mode_statistics


@dataclass
class ToyJudge(Judge):
    """The mixture's ``means``, per-mode ``stds`` and ``weights``, and exact samples ``reference`` of it (drawn
    under their own seed, not the samplers')."""

    means: torch.Tensor
    stds: torch.Tensor
    weights: torch.Tensor
    reference: torch.Tensor

    def score(self, drawn: Drawn, sample_set: SampleSet) -> dict:
        x = drawn.samples
        return {**mode_statistics(x, self.means, self.stds, self.weights),
                "energy_distance": energy_distance(x, self.reference)}
