"""Build the teacher and the trainable networks of a run from the configuration."""

from __future__ import annotations

import copy

import torch

from fdistill.config import Config, ConfigError
from fdistill.denoisers import Denoiser, GaussianMixtureDenoiser, MLPDenoiser, UNetDenoiser, freeze, ring_mixture
from fdistill.discriminator import discriminator_for
from fdistill.objectives import Networks, Objective
from fdistill.schedules import SCHEDULES, DiscreteVPSchedule

TEACHER_KINDS = ("ring", "unet")


def build_teacher(cfg: Config) -> Denoiser:
    """A frozen teacher: an analytic ring mixture, or a diffusers UNet built from ``teacher.unet``."""
    tc = cfg.teacher
    if tc.kind == "ring":
        if tc.schedule not in SCHEDULES:
            raise ConfigError(f"unknown teacher.schedule {tc.schedule!r}; choose one of {', '.join(SCHEDULES)}")
        try:
            params = ring_mixture(tc.num_modes, tc.radius, tc.std, tc.weights)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        return freeze(GaussianMixtureDenoiser(**params, schedule=SCHEDULES[tc.schedule]()))
    if tc.kind == "unet":
        from diffusers import DDPMScheduler, UNet2DModel

        unet = UNet2DModel(**tc.unet)
        scheduler = DDPMScheduler(num_train_timesteps=1000)
        prediction = tc.prediction_type or "epsilon"
        return freeze(UNetDenoiser(unet, DiscreteVPSchedule.from_diffusers(scheduler), prediction))
    raise ConfigError(f"unknown teacher.kind {tc.kind!r}; choose one of {', '.join(TEACHER_KINDS)}")


def trainable_copy(teacher: Denoiser, cfg: Config) -> Denoiser:
    """A trainable network initialised from the teacher's weights, or an MLP when the teacher is analytic."""
    if isinstance(teacher, GaussianMixtureDenoiser):
        m = cfg.model
        return MLPDenoiser(teacher.sample_shape[0], teacher.schedule, m.hidden, m.depth, m.sigma_data)
    if isinstance(teacher, UNetDenoiser):
        net = UNetDenoiser(copy.deepcopy(teacher.unet), teacher.schedule, teacher.prediction_type)
    else:
        net = copy.deepcopy(teacher)
    net.train()
    return net.requires_grad_(True)


def build_networks(cfg: Config, teacher: Denoiser, objective: Objective) -> Networks:
    """Student (and fake score / discriminator when the objective uses them) for ``teacher``."""
    times = cfg.generator.times or [teacher.schedule.t_max]
    student = objective.build_student(trainable_copy(teacher, cfg), times)
    fake_score = trainable_copy(teacher, cfg) if objective.needs_fake_score else None
    discriminator = None
    if objective.needs_discriminator:
        probe = torch.zeros(2, *teacher.sample_shape)
        t = torch.full((2,), teacher.schedule.t_max, dtype=torch.float64)
        with torch.no_grad():
            _, features = teacher.forward_with_features(probe, t, _probe_condition(cfg, 2))
        discriminator = discriminator_for(features)
    return Networks(teacher=teacher, student=student, fake_score=fake_score, discriminator=discriminator)


def _probe_condition(cfg: Config, n: int):
    classes = cfg.teacher.unet.get("num_class_embeds") if cfg.teacher.kind == "unet" else None
    return torch.zeros(n, dtype=torch.long) if classes else None
