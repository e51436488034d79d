"""DMD / DMD2: distribution matching distillation (Yin et al. 2024, arXiv 2311.18828; DMD2 arXiv 2405.14867).

Integral reverse KL ``int w(t) KL(q_t || p_t) dt`` (docs/objectives.md §3). Its exact gradient at one ``t`` is
``E[(s_q - s_p)^T dx_t/dtheta]``; per sample, on ``x_g``, the DMD pseudo-gradient is

    g_i = w_i (x0_q(x_t) - x0_p(x_t)),    w_i = 1 / (mean |x_g - x0_p| + 1e-6),
    L_G = 1/2 mean (x_g - sg(x_g - g))^2  +  lambda_GAN mean softplus(-l_fake),

where ``x0_p`` is the (possibly guided, §2.5) teacher. ``objective.normalizer: none`` sets ``w_i = 1``: the
per-sample mean runs over the sample's elements, which on low-dimensional data are too few to average out the
fake score's error, and there the normaliser amplifies it on samples already near a mode (§3.2).

The critic step trains the fake score by denoising on detached student samples and, with a GAN, the discriminator
on teacher features of noisy real vs noisy student samples (DMD2's two-time-scale update), its inputs noised at
``discriminator_time_distribution`` when set (else the generator's law); it reads the teacher blocks of
``discriminator_features`` (docs/objectives.md §2.4). Subclasses change only the per-sample weight (f-distill).

A student with ``K > 1`` sampling times ``t_0 > ... > t_{K-1}`` draws ``x_g`` by DMD2's backward simulation
(docs/objectives.md §3.1), in critic and generator steps alike: ``k ~ U{1..K}`` once per training step
(``k = K`` always with ``objective.backward_simulation_steps: last``),

    x^(0) = s z,   x^(i) = alpha(t_i) sg(G(x^(i-1), t_{i-1})) + sigma(t_i) eps_i,   x_g = G(x^(k-1), t_{k-1}),

fresh ``eps_i``, gradient through the last call only; ``objective.backward_simulation_times`` picks the
student's own times (``fixed``) or later times drawn in ``(t_{i+1}, t_i]`` (``random``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import torch

from fdistill.containers import Batch, Networks
from fdistill.networks.denoisers import per_sample
from fdistill.objectives import common
from fdistill.objectives.base import Objective, ObjectiveOptions, register
from fdistill.schedules import TIME_DISTRIBUTIONS, sample_time


def dmd_normalizer(x_g, x0_teacher, eps: float = 1e-6) -> torch.Tensor:
    """DMD's per-sample ``1 / (mean_elem |x_g - x0_p| + eps)``, detached, float32 (§0)."""
    return 1.0 / ((x_g.detach().float() - x0_teacher.detach().float()).abs().flatten(1).mean(1) + eps)


def pseudo_gradient_loss(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``1/2 mean (x - sg(x - g))^2``: its gradient w.r.t. ``x`` is ``g / numel`` (§0)."""
    target = (x - g).detach()
    return 0.5 * (x.float() - target.float()).pow(2).mean()


NORMALIZERS = ("dmd", "none")


def sample_weighted_pseudo_gradient(x_g, x0_fake, x0_teacher, weight=None, normalizer: str = "dmd",
                                    normalizer_eps: float = 1e-6):
    """VSD/DMD pseudo-gradient ``g_i = W_i w_i (x0_q - x0_p)`` with the DMD normaliser ``w_i`` (§3, §4.3 step 5;
    ``w_i = 1`` for ``normalizer="none"``), returned with its loss ``1/2 mean (x_g - sg(x_g - g))^2``.
    ``weight`` is an extra per-sample ``W_i``."""
    if normalizer == "dmd":
        w = dmd_normalizer(x_g, x0_teacher, normalizer_eps)
    else:
        w = torch.ones(len(x_g), device=x_g.device)
    if weight is not None:
        w = w * weight.float()
    g = per_sample(w, x_g) * (x0_fake.detach() - x0_teacher.detach()).to(x_g.dtype)
    return pseudo_gradient_loss(x_g, g), g


@dataclass
class DMDOptions(common.DiscriminatorFeatureOptions, common.BackwardSimulationOptions, ObjectiveOptions):
    name: str = "dmd"
    critic_steps: int = 4
    time_distribution: str = "polynomial"
    time_range: Optional[List[float]] = None  # [lo, hi] restricts uniform time draws
    gan_weight: float = 0.0
    discriminator_weight: float = 1.0
    # times of the discriminator's training inputs (critic step); null: time_distribution, as the generator step
    discriminator_time_distribution: Optional[str] = None
    fake_score_weighting: str = "none"
    # dmd: DMD's per-sample normaliser 1 / mean|x_g - x0_p|; none: the raw x0_q - x0_p (Diff-Instruct's gradient)
    normalizer: str = "dmd"


@register("dmd", DMDOptions)
class DMD(Objective):
    critic_trains = ("fake_score", "discriminator")

    def __init__(self, options: DMDOptions, schedule):
        super().__init__(options, schedule)
        common.check_backward_simulation_options(options)
        common.check_choice(options, "time_distribution", TIME_DISTRIBUTIONS)
        common.check_choice(options, "discriminator_time_distribution", TIME_DISTRIBUTIONS, optional=True)
        common.check_choice(options, "normalizer", NORMALIZERS)

    @property
    def needs_discriminator(self) -> bool:
        return self.options.gan_weight > 0

    @property
    def discriminator_features(self) -> list[str] | None:
        return self.options.discriminator_features

    @property
    def needs_real_data(self) -> bool:
        return self.options.gan_weight > 0

    def kept_passes(self, kind: str) -> tuple[str, ...]:
        gan = ("teacher",) if kind == "generator" and self.options.gan_weight > 0 else ()
        return super().kept_passes(kind) + gan

    def _times(self, n: int, device, distribution: str | None = None) -> torch.Tensor:
        o = self.options
        bounds = {} if o.time_range is None else {"t_lo": o.time_range[0], "t_hi": o.time_range[1]}
        return sample_time(self.schedule, n, distribution or o.time_distribution, **bounds).to(device)

    def critic_loss(self, batch: Batch, nets: Networks, step: int):
        with torch.no_grad():
            x_g = common.student_samples(batch, nets, step, self.options)
        t = self._times(batch.size, x_g.device)
        loss_fake, _, _ = common.denoising_loss(nets.fake_score, x_g, t, batch.cond, self.options.fake_score_weighting)
        logs = {"fake_score": loss_fake.detach()}
        loss = loss_fake
        if self.needs_discriminator:
            law = self.options.discriminator_time_distribution
            t_fake = t if law is None else self._times(batch.size, x_g.device, law)
            t_real = self._times(batch.size, x_g.device, law)
            with torch.no_grad():
                x_fake_t = common.diffuse(self.schedule, x_g, t_fake)[0]
                feat_fake = nets.teacher.features(x_fake_t, t_fake, batch.cond)
                x_real_t = common.diffuse(self.schedule, batch.real, t_real)[0]
                feat_real = nets.teacher.features(x_real_t, t_real, batch.cond)
            logits_real, logits_fake = nets.discriminator(feat_real), nets.discriminator(feat_fake)
            loss_disc = common.gan_discriminator_loss(logits_real, logits_fake)
            loss = loss + self.options.discriminator_weight * loss_disc
            logs |= {"discriminator": loss_disc.detach(), **common.discriminator_accuracy(logits_real, logits_fake)}
        return loss, logs

    def sample_weight(self, logits, t) -> tuple[torch.Tensor | None, dict]:
        """Extra per-sample weight on the DMD pseudo-gradient (``None`` for DMD itself) and its diagnostics."""
        return None, {}

    def generator_loss(self, batch: Batch, nets: Networks, step: int):
        x_g = common.student_samples(batch, nets, step, self.options)
        t = self._times(batch.size, x_g.device)
        x_t, _ = common.diffuse(self.schedule, x_g, t)
        # Only the GAN term backpropagates through the teacher's features, and so needs its input gradient.
        gan = self.options.gan_weight > 0
        with torch.set_grad_enabled(gan and torch.is_grad_enabled()):
            x0_teacher, features = nets.teacher.forward_with_features(x_t if gan else x_t.detach(), t, batch.cond)
        with torch.no_grad():
            x0_fake = nets.fake_score(x_t.detach(), t, batch.cond)
        logits = nets.discriminator(features) if self.needs_discriminator else None
        weight, weight_logs = self.sample_weight(logits, t)
        loss, _ = sample_weighted_pseudo_gradient(x_g, x0_fake, x0_teacher, weight, self.options.normalizer)
        logs = {"vsd": loss.detach(), **weight_logs}
        if logits is not None:
            loss, logs = common.add_gan_term(loss, logs, common.gan_generator_loss(logits), self.options.gan_weight)
        return loss, logs
