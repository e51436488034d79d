"""SiD: Score identity Distillation (Zhou et al. 2024, arXiv 2404.04057); SiDA adds a GAN (arXiv 2410.14919).

Generator loss per sample (docs/objectives.md §5). ``f_phi = x0_p(x_t)`` (teacher) and ``f_psi = x0_q(x_t)`` (fake
score) are frozen networks whose *inputs* carry gradient; ``x_t = alpha x_g + sigma eps`` with sigma from the
t_max = 800 law and ``x_g = G(2.5 z)``:

    L_SiD(alpha) = 100 (f_phi - f_psi).((f_phi - x_g) - alpha (f_phi - f_psi)) / sg(max(mean|x_g - f_phi|, c))

with ``c = 1e-5``. ``objective.normalizer: none`` replaces the normaliser by 1 and
``objective.generator_time_distribution`` replaces SiD's time law (docs/objectives.md §3.2: on 2-D data the
normaliser and SiD's law blur the modes). ``alpha = 1/2`` is the exact gradient of the Fisher divergence
``E_q||s_q - s_p||^2`` (= Uni-Instruct RKL), ``alpha = 1`` holds the sampling distribution fixed (= SIM-L2);
SiD's default 1.2 is empirical.

:class:`ScoreIdentity` is the base of SiD, SIM and Uni-Instruct. They share the critic step (fake-score DSM
with EDM lognormal times and EDM weighting, plus the discriminator BCE when there is one), the generator
forward pass and the GAN term; each implements only :meth:`ScoreIdentity.score_loss`. The discriminator is
``shared`` (SiDA: the logit map is the channel mean of the fake score's features, BCE per location) or
``separate`` (a head on the teacher's features, §2.4). As in the official code the GAN generator term is scaled
like the score loss, ``D N_i softplus(-l_i)`` with ``N_i`` the normaliser and ``D`` the sample size.

A student with ``K > 1`` sampling times draws ``x_g`` by DMD2's backward simulation (docs/objectives.md §3.1), in
critic and generator steps alike: ``k ~ U{1..K}`` per training step (``k = K`` with
``backward_simulation_steps: last``), ``k - 1`` steps of its sampler without gradient from ``x^(0) = s z`` (fresh
noise at each re-noising), then ``x_g = G(x^(k-1), t_{k-1})`` with gradient; the loss above reaches the student
through that last call only. ``objective.backward_simulation_times`` picks
the student's own times (``fixed``) or later times drawn in ``(t_{i+1}, t_i]`` (``random``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from fdistill.containers import Batch, Networks
from fdistill.networks.generator import Generator
from fdistill.objectives import common
from fdistill.objectives.base import Objective, ObjectiveOptions, register
from fdistill.schedules import TIME_DISTRIBUTIONS, sample_time

DISCRIMINATORS = ("shared", "separate")
NORMALIZERS = ("sid", "none")


def sid_normalizer(x_g, x0_teacher, clip: float = 1e-5) -> torch.Tensor:
    """SiD/UI per-sample ``1 / max(mean_elem |x_g - x0_p|, clip)``, detached, float32 (§0)."""
    return 1.0 / (x_g.detach().float() - x0_teacher.detach().float()).abs().flatten(1).mean(1).clamp(min=clip)


def sida_logits(features: list[torch.Tensor]) -> torch.Tensor:
    """SiDA's discriminator without parameters (§2.4): the channel mean of the fake score's (last) feature map,
    one logit per location, ``[B, H*W]`` (``[B, 1]`` for feature vectors)."""
    f = features[-1]
    return f.float().mean(1).reshape(len(f), -1)


def normalized_gan_generator_loss(logits, normalizer, dim: int, logit_clamp: float = 10.0) -> torch.Tensor:
    """UI/SiDA generator GAN term ``mean_i N_i D mean_loc softplus(-clamp(l_i))``: scaled like the SiD loss (a
    sum over the ``D`` elements times the per-sample normaliser ``N_i``), as in the official code (§7.4)."""
    per_sample = F.softplus(-logits.float().clamp(-logit_clamp, logit_clamp)).flatten(1).mean(1)
    return common.finite_mean(per_sample * dim * normalizer)


@dataclass
class ScoreIdentityOptions(common.DiscriminatorFeatureOptions, common.BackwardSimulationOptions,
                           ObjectiveOptions):
    name: str = "sid"
    critic_steps: int = 1
    init_sigma: Optional[float] = 2.5  # student input sigma (SNR-matched); explicit generator.times win
    generator_t_max: float = 800.0  # SiD time law: u ~ U[0, t_max/1000] on the Karras grid
    generator_time_distribution: str = "sid"  # the student loss's times: SiD's law, or any of §1.4's
    critic_time_distribution: str = "lognormal"
    fake_score_weighting: str = "edm"
    loss_scale: float = 100.0
    normalizer: str = "sid"  # sid: 1 / max(mean|x_g - x0_p|, clip) per sample | none: 1 (docs/objectives.md §3.2)
    normalizer_clip: float = 1e-5
    critic_warmup_steps: int = 0  # critic-only steps before the first generator step
    gan_weight: float = 0.0
    gan_logit_clamp: float = 10.0
    discriminator: str = "shared"
    discriminator_weight: float = 1.0


class ScoreIdentity(Objective):
    critic_trains = ("fake_score", "discriminator")
    uses_ratio = False  # Uni-Instruct: the discriminator also estimates r = p/q

    def __init__(self, options: ScoreIdentityOptions, schedule):
        super().__init__(options, schedule)
        common.check_choice(options, "discriminator", DISCRIMINATORS)
        common.check_choice(options, "normalizer", NORMALIZERS)
        for key in ("generator_time_distribution", "critic_time_distribution"):
            common.check_choice(options, key, TIME_DISTRIBUTIONS)
        common.check_backward_simulation_options(options)
        if options.discriminator_features is not None and options.discriminator != "separate":
            raise ValueError("objective.discriminator_features is read by the separate discriminator only (the "
                             "shared one reads the fake score's last block); remove it or set "
                             "objective.discriminator=separate")

    @property
    def discriminator_features(self) -> list[str] | None:
        return self.options.discriminator_features

    @property
    def uses_discriminator(self) -> bool:
        return self.options.gan_weight > 0 or self.uses_ratio

    @property
    def needs_discriminator(self) -> bool:
        return self.uses_discriminator and self.options.discriminator == "separate"

    @property
    def needs_real_data(self) -> bool:
        return self.uses_discriminator

    def build_student(self, net, times):
        return Generator(net, common.student_input_times(self.schedule, times, self.options.init_sigma))

    def kept_passes(self, kind: str) -> tuple[str, ...]:
        if kind == "generator":  # the gradient flows through the teacher's and the fake score's input
            return ("student", "teacher", "fake_score")
        shared = self.uses_discriminator and self.options.discriminator == "shared"
        return ("fake_score",) * (2 if shared else 1)

    def step_kind(self, step: int) -> str:
        warmup = self.options.critic_warmup_steps
        return "critic" if step < warmup else super().step_kind(step - warmup)

    def generator_step(self, step: int) -> int:
        """How many generator steps came before training step ``step``."""
        return max(step - self.options.critic_warmup_steps, 0) // (self.options.critic_steps + 1)

    def times(self, kind: str, n: int, device) -> torch.Tensor:
        return sample_time(self.schedule, n, kind, t_max=self.options.generator_t_max).to(device)

    def logits(self, nets: Networks, teacher_features, fake_features) -> torch.Tensor:
        """Logits ``[B, L]``; ``log p_t/q_t`` at the optimum (real = teacher/data is the positive class)."""
        if self.options.discriminator == "shared":
            return sida_logits(fake_features)
        return nets.discriminator(teacher_features)

    def critic_loss(self, batch: Batch, nets: Networks, step: int):
        o, schedule = self.options, self.schedule
        with torch.no_grad():
            x_g = common.student_samples(batch, nets, step, o)
        t = self.times(o.critic_time_distribution, batch.size, x_g.device)
        loss, eps, feat_fake = common.denoising_loss(nets.fake_score, x_g, t, batch.cond, o.fake_score_weighting)
        logs = {"fake_score": loss.detach()}
        if self.uses_discriminator:  # real samples at the same t and noise, as the UI code does
            x_real_t = schedule.diffuse(batch.real.to(x_g), t, eps)
            if o.discriminator == "shared":
                feat_real = nets.fake_score.forward_with_features(x_real_t, t, batch.cond)[1]
            else:
                with torch.no_grad():
                    feat_real = nets.teacher.features(x_real_t, t, batch.cond)
                    x_t = schedule.diffuse(x_g, t, eps)  # the fake score's input, rebuilt from its noise
                    feat_fake = nets.teacher.features(x_t, t, batch.cond)
            logits_real, logits_fake = (self.logits(nets, f, f) for f in (feat_real, feat_fake))
            loss_disc = common.gan_discriminator_loss(logits_real, logits_fake)
            loss = loss + o.discriminator_weight * loss_disc
            logs |= {"discriminator": loss_disc.detach(), **common.discriminator_accuracy(logits_real, logits_fake)}
        return loss, logs

    def gan_active(self, generator_step: int) -> bool:
        return self.options.gan_weight > 0

    def score_loss(self, x_g, x0_teacher, x0_fake, t, logits, generator_step) -> tuple[torch.Tensor, dict]:
        """Per-sample score-identity loss ``[B]`` before the normaliser, and extra logs."""
        raise NotImplementedError

    def generator_loss(self, batch: Batch, nets: Networks, step: int):
        o = self.options
        x_g = common.student_samples(batch, nets, step, o)
        t = self.times(o.generator_time_distribution, batch.size, x_g.device)
        x_t, _ = common.diffuse(self.schedule, x_g, t)
        # Teacher and fake score are frozen, but the gradient must flow through their input (§12 item 8).
        x0_teacher, feat_teacher = nets.teacher.forward_with_features(x_t, t, batch.cond)
        x0_fake, feat_fake = nets.fake_score.forward_with_features(x_t, t, batch.cond)
        logits = self.logits(nets, feat_teacher, feat_fake) if self.uses_discriminator else None
        normalizer = (sid_normalizer(x_g, x0_teacher, o.normalizer_clip) if o.normalizer == "sid" else
                      torch.ones(len(x_g), device=x_g.device))
        gen_step = self.generator_step(step)
        per_sample, logs = self.score_loss(x_g, x0_teacher, x0_fake, t, logits, gen_step)
        loss = common.finite_mean(o.loss_scale * normalizer * per_sample)
        logs = {self.name: loss.detach(), **logs}
        if logits is not None and self.gan_active(gen_step):
            gan_loss = normalized_gan_generator_loss(logits, normalizer, x_g[0].numel(), o.gan_logit_clamp)
            loss, logs = common.add_gan_term(loss, logs, gan_loss, o.gan_weight)
        return loss, logs


@dataclass
class SiDOptions(ScoreIdentityOptions):
    name: str = "sid"
    alpha: float = 1.2


@register("sid", SiDOptions)
class SiD(ScoreIdentity):
    def score_loss(self, x_g, x0_teacher, x0_fake, t, logits, generator_step):
        inner, sq = common.score_identity_terms(x_g, x0_teacher, x0_fake)
        return common.sid_loss(inner, sq, self.options.alpha), {}

