"""Uni-Instruct (Wang et al. 2025, arXiv 2505.20755): distillation by the expanded f-divergence.

Objective (docs/objectives.md §7.1; ``r = p_t/q_t`` teacher over student, ``psi(r) = r^2 f''(r)``):

    D_UI(theta) = int lambda(t) E_{x_t ~ q_theta,t}[ psi(r(x_t)) ||delta(x_t)||^2 ] dt,   delta = s_q - s_p.

Exact tractable loss (§7.2); all networks frozen, gradient through ``x_t`` and the explicit ``x_g``:

    L_UI = lambda(t) [ w1(r) ||delta||^2 - 2 psi(r) delta.c ],   w1 = psi - r psi',   c = s_q + eps/sigma,

implemented in x0 units and halved (:func:`uni_instruct_loss`), so that with ``r``
fixed it is ``psi(r) * SiD(alpha_eff(r))``, ``alpha_eff(r) = 1/2 + r psi'(r) / (2 psi(r))``. Hence **RKL
(psi = 1) is exactly SiD(alpha = 1/2)**; at ``r = 1`` FKL is SiD(1) = SIM-L2, JS and Jeffreys SiD(3/4),
Pearson SiD(3/2).

* ``ratio_grad: attached`` (option A, default): ``r = exp(l(x_t))`` keeps its gradient through the frozen
  discriminator: exact wherever the discriminator's log-ratio is, and no larger than what it learned.
* ``ratio_grad: detached`` (option B): ``r`` from the discriminator is detached and the gradient
  through ``r`` is added as the pseudo-gradient ``r [2 psi'(r) (delta.c) + r psi''(r) ||delta||^2] delta`` on
  ``x_t``, from ``grad_x log r = s_p - s_q = -delta``: no gradient through the discriminator's input, but the
  networks' error in ``delta`` is multiplied by ``alpha^2/sigma^2``, which diverges on images (§7.2); the
  analytic ring configs use it.
* ``estimator: official``: the public code's estimator, ``psi(r) Grad(SIM)`` plus the ``-r w1'(r)`` DI term,
  without the ``w1`` (FGM) and ``psi'`` terms. It is biased: on the 1-D check of docs/objectives.md §13.7
  (gradient w.r.t. the student's (mean, std), exact ratio) it gives FKL (0.143, -0.738) for the true
  (0.143, -1.104), JS (-0.009, -0.297) for (-0.039, -0.358), Jeffreys (0.154, -1.463) for (-0.017, -1.733)
  and Pearson (2.632, -4.523) for (2.432, -6.320); for RKL it is SiD(alpha = 1). The code's other quirks (the
  ratio from the BCE value, ``||Delta||`` for ``||Delta||^2``, dropping ``alpha^2/sigma^2``) are not
  reproduced.

``lambda(t) alpha^2/sigma^4`` is replaced by SiD's normaliser times 100. The ratio is ``exp(clamp(l, +-10))``
clamped to [0.1, 20] and optionally normalised per time bin (§4.3). Warm-up: the first
``warmup_generator_steps`` generator steps are plain SiD(``warmup_alpha``) without the GAN term, as the
official code does before 200k images. A student with several sampling times draws ``x_g`` by SiD's backward
simulation (docs/objectives.md §3.1; :mod:`.sid`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from fdistill.objectives import common
from fdistill.objectives.base import register
from fdistill.objectives.common import Divergence
from fdistill.objectives.sid import ScoreIdentity, ScoreIdentityOptions


def alpha_eff(divergence: Divergence, r) -> torch.Tensor:
    """Per-sample effective SiD alpha of Uni-Instruct with ``r`` fixed (§7.2): ``1/2 + r psi'/(2 psi)``."""
    return 0.5 + r * divergence.dh(r) / (2 * divergence.h(r))


UI_ESTIMATORS = ("exact", "official")
UI_RATIO_GRADS = ("detached", "attached")


def uni_instruct_terms(x_g, x0_teacher, x0_fake, ratio, divergence: Divergence, snr2, ratio_grad_weight=None,
                       ratio_grad_clip: float | None = None) -> dict[str, torch.Tensor]:
    """The four per-sample terms of the exact Uni-Instruct gradient with a detached ratio (§7.2 decomposition).

    * ``sim``    = ``psi(r) inner``: psi-weighted SiD(alpha=1), i.e. Grad(SIM);
    * ``fgm``    = ``1/2 w1(r) sq``, ``w1 = psi - r psi'``: the gradient of ``||delta||^2`` through ``x_t``;
    * ``di_w1``  = ``sg(snr2 r^2 psi''/2 sq Delta).x_g``: the ``-r w1'(r)`` ratio-gradient term;
    * ``di_psi`` = ``sg(-snr2 r psi' inner Delta).x_g``: the ``2 r psi'(r) (delta.c)`` ratio-gradient term.

    The two DI-direction terms are option B's pseudo-gradient ``alpha_t g_DI`` on ``x_g``, from
    ``grad_x log r = -delta``; ``snr2 = alpha_t^2/sigma_t^2`` converts ``sq`` and ``Delta`` to score units.
    ``ratio_grad_weight`` multiplies both per sample (0 where a clamped ratio estimate has no gradient);
    ``ratio_grad_clip`` bounds each coefficient of ``Delta`` to ``+-clip``, i.e. each of these forces on
    ``x_g`` to ``clip`` times the SiD term's explicit force ``|d inner/d x_g| = |Delta|``."""
    inner, sq = common.score_identity_terms(x_g, x0_teacher, x0_fake)
    r, snr2 = common.at_least_float32(ratio.detach()), common.at_least_float32(snr2)
    if ratio_grad_weight is not None:
        snr2 = snr2 * ratio_grad_weight
    psi, dpsi, d2psi = divergence.h(r), divergence.dh(r), divergence.d2h(r)
    delta = common.at_least_float32(x0_fake - x0_teacher).detach().flatten(1)
    x_flat = common.at_least_float32(x_g).flatten(1)

    def along_delta(coef):  # sg(coef Delta) . x_g, per sample
        if ratio_grad_clip is not None:
            coef = coef.clamp(-ratio_grad_clip, ratio_grad_clip)
        return ((coef.detach()[:, None] * delta) * x_flat).sum(1)

    return {
        "sim": psi * inner,
        "fgm": 0.5 * (psi - r * dpsi) * sq,
        "di_w1": along_delta(0.5 * snr2 * r**2 * d2psi * sq),
        "di_psi": along_delta(-snr2 * r * dpsi * inner),
    }


def uni_instruct_loss(x_g, x0_teacher, x0_fake, ratio, divergence: Divergence, snr2, estimator: str = "exact",
                      ratio_grad: str = "detached", ratio_grad_weight=None, ratio_grad_clip=None):
    """Per-sample Uni-Instruct loss (§7.2), halved so that ``RKL == SiD(alpha=1/2)`` at the same weight.

    * ``exact`` + ``detached`` (option B): the sum of the four :func:`uni_instruct_terms`;
    * ``exact`` + ``attached`` (option A): ``psi(r) inner + 1/2 w1(r) sq`` with ``ratio`` carrying gradient
      through the frozen discriminator's input;
    * ``official``: ``sim + di_w1`` as in the public code (no FGM term, no ``psi'`` term): biased (§7.3).
    With ``r`` fixed the ``sim + fgm`` part is ``psi(r) * SiD(alpha_eff(r))`` (:func:`alpha_eff`)."""
    if estimator not in UI_ESTIMATORS or ratio_grad not in UI_RATIO_GRADS:
        raise ValueError(f"estimator must be one of {UI_ESTIMATORS} and ratio_grad one of {UI_RATIO_GRADS}")
    if estimator == "exact" and ratio_grad == "attached":
        inner, sq = common.score_identity_terms(x_g, x0_teacher, x0_fake)
        r = common.at_least_float32(ratio)
        return divergence.h(r) * inner + 0.5 * (divergence.h(r) - r * divergence.dh(r)) * sq
    terms = uni_instruct_terms(x_g, x0_teacher, x0_fake, ratio, divergence, snr2, ratio_grad_weight,
                               ratio_grad_clip)
    if estimator == "official":
        return terms["sim"] + terms["di_w1"]
    return terms["sim"] + terms["fgm"] + terms["di_w1"] + terms["di_psi"]


def divergence_from_weight(psi: Callable, name: str = "custom") -> Divergence:
    """A :class:`Divergence` from its weight ``psi(r) = r^2 f''(r)`` alone (all Uni-Instruct and f-distill
    need); ``psi'`` and ``psi''`` come from autograd, elementwise. ``f`` is left undefined."""

    def derivative(r, order):
        with torch.enable_grad():
            x = r.detach().clone().requires_grad_(True)
            y = psi(x)
            for _ in range(order):
                if not y.requires_grad:  # psi constant (or linear, for the second derivative)
                    return torch.zeros_like(r)
                y = torch.autograd.grad(y.sum(), x, create_graph=True)[0]
        return y.detach()

    def no_f(r):
        raise NotImplementedError(f"divergence {name!r} was given by its weight psi only")

    return Divergence(name, no_f, psi, lambda r: derivative(r, 1), lambda r: derivative(r, 2))


@dataclass
class UniInstructOptions(common.RatioOptions, ScoreIdentityOptions):
    name: str = "uni_instruct"
    divergence: str = "js"  # rkl, fkl (kl), js, jeffreys (jf), pearson (chi2), sf, sh, neyman, alpha
    alpha: float = 0.5  # parameter of divergence=alpha
    estimator: str = "exact"  # exact | official
    ratio_grad: str = "attached"  # attached (option A) | detached (option B)
    gan_weight: float = 0.01
    warmup_generator_steps: int = 0
    warmup_alpha: float = 0.5  # SiD(1/2) is the RKL member; the official code warms up with SiD(1)
    ratio_grad_clip: Optional[float] = None  # bound on option B's ratio-gradient coefficients


@register("uni_instruct", UniInstructOptions)
class UniInstruct(ScoreIdentity):
    """``divergence`` (a :class:`~fdistill.objectives.common.Divergence` or a callable ``psi(r)``) overrides
    the configured name, for divergences defined in Python."""

    def __init__(self, options: UniInstructOptions, schedule,
                 divergence: Divergence | Callable | None = None):
        super().__init__(options, schedule)
        if options.estimator not in UI_ESTIMATORS or options.ratio_grad not in UI_RATIO_GRADS:
            raise ValueError(f"objective.estimator must be one of {UI_ESTIMATORS} and "
                             f"objective.ratio_grad one of {UI_RATIO_GRADS}")
        if options.ratio_grad_clip is not None and options.estimator == "exact" and options.ratio_grad == "attached":
            raise ValueError("objective.ratio_grad_clip bounds the ratio-gradient terms of ratio_grad: detached; "
                             "with attached the gradient comes through the discriminator: remove the clip")
        if divergence is None:
            divergence = common.get_divergence(options.divergence, options.alpha)
        elif not isinstance(divergence, Divergence):
            divergence = divergence_from_weight(divergence)
        self.divergence = divergence
        self.ratio_normalizer = common.RatioBinNormalizer.for_options(options, schedule)

    @property
    def uses_ratio(self) -> bool:  # psi = 1 (RKL) needs no density ratio
        return self.divergence.name != "rkl"

    def ratio(self, logits: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``r = clamp(exp(clamp(mean l, +-c)), lo, hi)``, per-bin normalised (attached for option A only),
        and a mask of where the clamps are inactive: elsewhere the clamped estimate has no gradient, so
        neither has option B's ratio-gradient term (unmasked, its cubic growth in ``Delta`` diverges)."""
        o = self.options
        r, in_range = common.density_ratio(logits, o, keep_grad=o.estimator == "exact" and o.ratio_grad == "attached")
        if o.normalize_ratio:  # divided by the detached bin mean: a per-bin constant for the gradient
            r = self.ratio_normalizer(r, t.to(r.device))
        return r, in_range

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
        per_sample = uni_instruct_loss(x_g, x0_teacher, x0_fake, r, self.divergence, snr2,
                                       o.estimator, o.ratio_grad, in_range, o.ratio_grad_clip)
        r = r.detach()
        return per_sample, {"ratio_mean": r.mean(), "ratio_max": r.max(),
                            "alpha_eff": alpha_eff(self.divergence, r).mean()}
