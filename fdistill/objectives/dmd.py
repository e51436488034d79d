"""DMD / DMD2: distribution matching distillation (Yin et al. 2024, arXiv 2311.18828; DMD2 arXiv 2405.14867).

Integral reverse KL ``int w(t) KL(q_t || p_t) dt`` (ALGORITHMS.md 3). Its exact gradient at one ``t`` is
``E[(s_q - s_p)^T dx_t/dtheta]``; per sample, on ``x_g``, the DMD pseudo-gradient is

    g_i = w_i (x0_q(x_t) - x0_p^cfg(x_t)),    w_i = 1 / (mean |x_g - x0_p^cfg| + 1e-6),
    L_G = 1/2 mean (x_g - sg(x_g - g))^2  +  lambda_GAN mean softplus(-l_fake).

The critic step trains the fake score by denoising on detached student samples and, with a GAN, the
discriminator on teacher features of noisy real vs noisy student samples (DMD2's two-time-scale update).
Subclasses change only the per-sample weight (f-distill).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import torch

from fdistill.objectives import common
from fdistill.objectives.base import Batch, Networks, Objective, ObjectiveOptions, register


@dataclass
class DMDOptions(ObjectiveOptions):
    name: str = "dmd"
    critic_steps: int = 4
    time_distribution: str = "polynomial"
    time_range: Optional[List[float]] = None
    gan_weight: float = 0.0
    discriminator_weight: float = 1.0
    fake_score_weighting: str = "none"
    guidance_scale: float = 1.0


@register("dmd", DMDOptions)
class DMD(Objective):
    critic_trains = ("fake_score", "discriminator")

    @property
    def needs_discriminator(self) -> bool:
        return self.options.gan_weight > 0

    @property
    def needs_real_data(self) -> bool:
        return self.options.gan_weight > 0

    def _times(self, schedule, n, device):
        return common.draw_times(schedule, n, self.options.time_distribution, self.options.time_range, device)

    def critic_loss(self, batch: Batch, nets: Networks, step: int):
        with torch.no_grad():
            x_g = nets.student(nets.student.noise(batch.size, device=_device(nets)), batch.cond)
        schedule = nets.teacher.schedule
        t = self._times(schedule, batch.size, x_g.device)
        loss_fake = common.denoising_loss(nets.fake_score, x_g, t, batch.cond, self.options.fake_score_weighting)
        logs = {"fake_score": loss_fake.detach()}
        loss = loss_fake
        if self.needs_discriminator:
            t_real = self._times(schedule, batch.size, x_g.device)
            with torch.no_grad():
                _, feat_fake = nets.teacher.forward_with_features(common.diffuse(schedule, x_g, t)[0], t, batch.cond)
                x_real_t = common.diffuse(schedule, batch.real, t_real)[0]
                _, feat_real = nets.teacher.forward_with_features(x_real_t, t_real, batch.cond)
            loss_disc = common.gan_discriminator_loss(nets.discriminator(feat_real), nets.discriminator(feat_fake))
            loss = loss + self.options.discriminator_weight * loss_disc
            logs["discriminator"] = loss_disc.detach()
        return loss, logs

    def sample_weight(self, logits, t) -> torch.Tensor | None:
        """Extra per-sample weight on the DMD pseudo-gradient; ``None`` for DMD itself."""
        return None

    def generator_loss(self, batch: Batch, nets: Networks, step: int):
        x_g = nets.student(nets.student.noise(batch.size, device=_device(nets)), batch.cond)
        schedule = nets.teacher.schedule
        t = self._times(schedule, batch.size, x_g.device)
        x_t, _ = common.diffuse(schedule, x_g, t)
        # The teacher sees x_t with its input gradient kept: the GAN term backpropagates through its features.
        x0_teacher, features = common.guided_x0(
            nets.teacher, x_t, t, batch.cond, self.options.guidance_scale, with_features=True
        )
        with torch.no_grad():
            x0_fake = nets.fake_score(x_t.detach(), t, batch.cond)
        logits = nets.discriminator(features) if self.needs_discriminator else None
        weight = self.sample_weight(logits, t)
        loss_vsd, _ = common.sample_weighted_pseudo_gradient(x_g, x0_fake, x0_teacher, weight)
        logs = {"vsd": loss_vsd.detach()}
        loss = loss_vsd
        if logits is not None:
            loss_gan = common.gan_generator_loss(logits)
            loss = loss + self.options.gan_weight * loss_gan
            logs["gan"] = loss_gan.detach()
        return loss, logs


def _device(nets: Networks) -> torch.device:
    return next(nets.student.parameters()).device
