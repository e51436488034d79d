"""Uni-Instruct (Wang et al. 2025, arXiv 2505.20755): distillation by the expanded f-divergence.

Objective (ALGORITHMS.md 7.1; ``r = p_t/q_t`` teacher over student, ``psi(r) = r^2 f''(r)``):

    D_UI(theta) = int lambda(t) E_{x_t ~ q_theta,t}[ psi(r(x_t)) ||delta(x_t)||^2 ] dt,   delta = s_q - s_p.

Exact tractable loss (7.2); all networks frozen, gradient through ``x_t`` and the explicit ``x_g``:

    L_UI = lambda(t) [ w1(r) ||delta||^2 - 2 psi(r) delta.c ],   w1 = psi - r psi',   c = s_q + eps/sigma,

implemented in x0 units and halved (:func:`fdistill.objectives.common.uni_instruct_loss`), so that with ``r``
fixed it is ``psi(r) * SiD(alpha_eff(r))``, ``alpha_eff(r) = 1/2 + r psi'(r) / (2 psi(r))``. Hence **RKL
(psi = 1) is exactly SiD(alpha = 1/2)**; at ``r = 1`` FKL is SiD(1) = SIM-L2, JS and Jeffreys SiD(3/4),
Pearson SiD(3/2).

* ``ratio_grad: detached`` (option B, default): ``r`` from the discriminator is detached and the gradient
  through ``r`` is added as the pseudo-gradient ``r [2 psi'(r) (delta.c) + r psi''(r) ||delta||^2] delta`` on
  ``x_t``, from ``grad_x log r = s_p - s_q = -delta``: no gradient through the discriminator's input.
* ``ratio_grad: attached`` (option A): ``r = exp(l(x_t))`` keeps its gradient through the frozen
  discriminator.
* ``estimator: official``: the public code's estimator, ``psi(r) Grad(SIM)`` plus the ``-r w1'(r)`` DI term,
  without the ``w1`` (FGM) and ``psi'`` terms. It is biased: on the 1-D check of ALGORITHMS.md 13.7
  (gradient w.r.t. the student's (mean, std), exact ratio) it gives FKL (0.143, -0.738) for the true
  (0.143, -1.104), JS (-0.009, -0.297) for (-0.039, -0.358), Jeffreys (0.154, -1.463) for (-0.017, -1.733)
  and Pearson (2.632, -4.523) for (2.432, -6.320); for RKL it is SiD(alpha = 1). The code's other quirks (the
  ratio from the BCE value, ``||Delta||`` for ``||Delta||^2``, dropping ``alpha^2/sigma^2``) are not
  reproduced.

``lambda(t) alpha^2/sigma^4`` is replaced by SiD's normaliser times 100. The ratio is ``exp(clamp(l, +-10))``
clamped to [0.1, 20] and optionally normalised per time bin (4.3). Warm-up: the first
``warmup_generator_steps`` generator steps are plain SiD(``warmup_alpha``) without the GAN term, as the
official code does before 200k images.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from fdistill.objectives import common
from fdistill.objectives.base import register
from fdistill.objectives.common import Divergence
from fdistill.objectives.sid import ScoreIdentity, ScoreIdentityOptions


@dataclass
class UniInstructOptions(ScoreIdentityOptions):
    name: str = "uni_instruct"
    divergence: str = "js"  # rkl, fkl (kl), js, jeffreys (jf), pearson (chi2), sf, sh, neyman, alpha
    alpha: float = 0.5  # parameter of divergence=alpha
    estimator: str = "exact"  # exact | official
    ratio_grad: str = "detached"  # detached (option B) | attached (option A)
    gan_weight: float = 0.01
    warmup_generator_steps: int = 0
    warmup_alpha: float = 0.5  # SiD(1/2) is the RKL member; the official code warms up with SiD(1)
    ratio_logit_clamp: float = 10.0
    ratio_lower: float = 0.1
    ratio_upper: float = 20.0
    ratio_grad_clip: Optional[float] = None  # bound on option B's ratio-gradient coefficients (see common)
    normalize_ratio: bool = True
    ratio_bins: int = 10
    ratio_ema_rate: float = 0.0


@register("uni_instruct", UniInstructOptions)
class UniInstruct(ScoreIdentity):
    """``divergence`` (a :class:`~fdistill.objectives.common.Divergence` or a callable ``psi(r)``) overrides
    the configured name, for divergences defined in Python."""

    def __init__(self, options: UniInstructOptions, schedule,
                 divergence: Divergence | Callable | None = None):
        super().__init__(options, schedule)
        if options.estimator not in common.UI_ESTIMATORS or options.ratio_grad not in common.UI_RATIO_GRADS:
            raise ValueError(f"objective.estimator must be one of {common.UI_ESTIMATORS} and "
                             f"objective.ratio_grad one of {common.UI_RATIO_GRADS}")
        if divergence is None:
            divergence = common.get_divergence(options.divergence, options.alpha)
        elif not isinstance(divergence, Divergence):
            divergence = common.divergence_from_weight(divergence)
        self.divergence = divergence
        self.ratio_normalizer = common.RatioBinNormalizer(
            schedule.t_min, schedule.t_max, options.ratio_bins, options.ratio_ema_rate
        )

    @property
    def uses_ratio(self) -> bool:  # psi = 1 (RKL) needs no density ratio
        return self.divergence.name != "rkl"

    def ratio(self, logits: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``r = clamp(exp(clamp(mean l, +-c)), lo, hi)``, per-bin normalised (attached for option A only),
        and a mask of where the clamps are inactive: elsewhere the clamped estimate has no gradient, so
        neither has option B's ratio-gradient term (unmasked, its cubic growth in ``Delta`` diverges)."""
        o = self.options
        logits = logits.float().mean(1) if logits.dim() > 1 else logits.float()
        r = torch.exp(logits.clamp(-o.ratio_logit_clamp, o.ratio_logit_clamp))
        in_range = ((r > o.ratio_lower) & (r < o.ratio_upper) & (logits.abs() < o.ratio_logit_clamp)).float()
        r = r.clamp(o.ratio_lower, o.ratio_upper)
        if not (o.estimator == "exact" and o.ratio_grad == "attached"):
            r = r.detach()
        if o.normalize_ratio:  # divide by the detached bin mean: a per-bin constant for the gradient
            r = r * (self.ratio_normalizer(r.detach(), t.to(r.device)) / r.detach())
        return r, in_range.detach()

    def in_warmup(self, generator_step: int) -> bool:
        return generator_step < self.options.warmup_generator_steps

    def gan_active(self, generator_step: int) -> bool:
        return super().gan_active(generator_step) and not self.in_warmup(generator_step)

    def score_loss(self, x_g, x0_teacher, x0_fake, t, logits, generator_step):
        o = self.options
        if self.in_warmup(generator_step):
            inner, sq = common.score_identity_terms(x_g, x0_teacher, x0_fake)
            return common.sid_loss(inner, sq, o.warmup_alpha), {}
        r, in_range = torch.ones(len(x_g), device=x_g.device), None
        if self.uses_ratio:
            r, in_range = self.ratio(logits, t)
        snr2 = (self.schedule.alpha(t) / self.schedule.sigma(t)) ** 2
        snr2 = snr2.to(x_g.device, torch.float32)
        per_sample = common.uni_instruct_loss(x_g, x0_teacher, x0_fake, r, self.divergence, snr2,
                                              o.estimator, o.ratio_grad, in_range, o.ratio_grad_clip)
        r = r.detach()
        return per_sample, {"ratio_mean": r.mean(), "ratio_max": r.max(),
                            "alpha_eff": common.alpha_eff(self.divergence, r).mean()}
