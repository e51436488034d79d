"""Diff-Instruct (Luo et al. 2023, arXiv 2305.18455): integral-KL distillation with the pathwise gradient.

Objective ``int w(t) KL(q_t || p_t) dt`` (docs/objectives.md §3), the same as DMD's and the reverse-KL member of
Uni-Instruct (psi = 1, §7.1); what differs is the estimator. The exact gradient at one ``t`` is
``E[(alpha_t^2/sigma_t^2) (x0_q - x0_p)^T dx_g/dtheta]``; Diff-Instruct drops ``alpha^2/sigma^2`` (a
score-space weight ``w(t) = sigma^2/alpha^2``) and uses no normaliser:

    L_DI = mean_i sum_elem sg(x0_q(x_t) - x0_p(x_t)) . x_g,     ln sigma ~ N(-1.2, 1.2^2),

with ``x_g = G(1.0 z)`` (the student's input sigma in the CIFAR command). So it is DMD (:mod:`.dmd`) without
the per-sample normaliser: the critic step (fake-score DSM, here with EDM lognormal times and EDM weighting,
1:1 alternation) is DMD's, and so are the optional GAN term and, for a student with several sampling times, the
backward simulation that draws ``x_g`` (docs/objectives.md §3.1).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from fdistill.containers import Batch, Networks
from fdistill.networks.generator import Generator
from fdistill.objectives import common
from fdistill.objectives.base import register
from fdistill.objectives.dmd import DMD, DMDOptions


@dataclass
class DiffInstructOptions(DMDOptions):
    name: str = "diff_instruct"
    critic_steps: int = 1
    time_distribution: str = "lognormal"
    fake_score_weighting: str = "edm"
    init_sigma: Optional[float] = 1.0  # student input sigma (SNR-matched); explicit generator.times win
    normalizer: str = "none"  # fixed: the estimator has no normaliser


@register("diff_instruct", DiffInstructOptions)
class DiffInstruct(DMD):
    def __init__(self, options: DiffInstructOptions, schedule):
        super().__init__(options, schedule)
        if options.normalizer != "none":
            raise ValueError("Diff-Instruct has no normaliser; for DMD's, use objective.name=dmd")

    def build_student(self, net, times):
        return Generator(net, common.student_input_times(self.schedule, times, self.options.init_sigma))

    def generator_loss(self, batch: Batch, nets: Networks, step: int):
        x_g = common.student_samples(batch, nets, step, self.options)
        t = self._times(batch.size, x_g.device)
        x_t, _ = common.diffuse(self.schedule, x_g, t)
        gan = self.needs_discriminator
        # Only the GAN term needs the gradient through the teacher's input.
        with torch.set_grad_enabled(gan and torch.is_grad_enabled()):
            x0_teacher, features = nets.teacher.forward_with_features(x_t if gan else x_t.detach(), t, batch.cond)
        with torch.no_grad():
            x0_fake = nets.fake_score(x_t.detach(), t, batch.cond)
        g = (x0_fake - x0_teacher).detach().float().flatten(1)
        loss = common.finite_mean((g * x_g.float().flatten(1)).sum(1))
        logs = {"di": loss.detach()}
        if gan:
            gan_loss = common.gan_generator_loss(nets.discriminator(features))
            loss, logs = common.add_gan_term(loss, logs, gan_loss, self.options.gan_weight)
        return loss, logs
