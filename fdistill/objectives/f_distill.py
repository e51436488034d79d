"""f-distill: f-divergence distribution matching (Xu, Nie, Vahdat 2025, arXiv 2502.15681).

Minimises ``int w(t) D_f(p_t || q_t) dt`` with ``r = p_t / q_t`` (teacher over student). Pathwise,

    grad_theta D_f(p_t || q_t) = E[ h(r(x_t)) (s_q(x_t) - s_p(x_t))^T dx_t/dtheta ],   h(r) = r^2 f''(r),

so f-distill is DMD with the per-sample weight ``h`` (docs/objectives.md §4.1; ``h = 1`` is reverse KL = DMD).
``r`` is estimated from the discriminator logit (``r = exp(l)``, clamped), normalised per time bin, and
``h(r)`` is normalised to mean one over the global batch (§4.3), so that with zero logits the loss equals DMD's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fdistill.objectives import common
from fdistill.objectives.base import register
from fdistill.objectives.dmd import DMD, DMDOptions


def normalize_to_mean_one(h: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``h / (global mean h + eps)`` over the global batch (§4.3 step 4)."""
    total = common.all_reduce_sum(torch.stack([h.sum(), torch.tensor(float(h.numel()), device=h.device)]))
    return h / (total[0] / total[1] + eps)


@dataclass
class FDistillOptions(common.RatioOptions, DMDOptions):
    name: str = "f_distill"
    divergence: str = "js"
    alpha: float = 0.5  # parameter of divergence=alpha
    gan_weight: float = 1e-3


@register("f_distill", FDistillOptions)
class FDistill(DMD):
    def __init__(self, options: FDistillOptions, schedule):
        super().__init__(options, schedule)
        if options.gan_weight <= 0:
            raise ValueError("f_distill needs objective.gan_weight > 0: its discriminator estimates the ratio r")
        self.divergence = common.get_divergence(options.divergence, options.alpha)
        self.ratio_normalizer = common.RatioBinNormalizer.for_options(options, schedule)

    @property
    def needs_discriminator(self) -> bool:  # the ratio needs it even when the GAN term is switched off
        return True

    @property
    def needs_real_data(self) -> bool:
        return True

    def ratio(self, logits, t):
        """Density-ratio estimate ``r`` per sample: clamped ``exp(logit)``, normalised per time bin."""
        r, _ = common.density_ratio(logits, self.options)
        return self.ratio_normalizer(r, t) if self.options.normalize_ratio else r

    def sample_weight(self, logits, t):
        """``h(r)`` normalised to mean one, and what shows whether it carries information: the mean and spread of
        ``r`` and of the normalised ``h`` (a spread near 0 means every sample gets DMD's weight), and the per-time-bin
        running means of ``r``."""
        r = self.ratio(logits, t.to(logits.device))
        h = normalize_to_mean_one(self.divergence.h(r))
        bins = {f"ratio_bin_{i}": b.detach().clone() for i, b in enumerate(self.ratio_normalizer.bins)}
        return h, {"ratio_mean": r.mean(), "ratio_std": r.std(correction=0), "h_std": h.std(correction=0), **bins}
