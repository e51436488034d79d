"""sCM: continuous-time consistency models in TrigFlow (Lu & Song 2024, arXiv 2410.11081;
docs/objectives.md §8).

With ``x_t = cos t x0 + sin t z``, ``z ~ N(0, sigma_d^2)``, the student ``f = cos t x_t - sin t sigma_d F``
(``F = F_theta``, ``F^- = sg(F_theta)``) follows the continuous-time consistency gradient, with the JVP
rearrangement, ``-(w(t) / (e^{logvar(t)} D)) g^T dF_theta/dtheta`` along the tangent

    g = -cos^2 t (sigma_d F^- - dx_t/dt) - r (cos t sin t x_t + sigma_d v),   v = cos t sin t dF^-/dt,

``dx_t/dt = cos t z - sin t x0`` (sCT) or ``sigma_d F_teacher(x_t, t)`` of the (possibly guided, §2.5) teacher
(sCD), the JVP ``v`` taken with tangents ``(cos t sin t dx_t/dt, cos t sin t)``, warm-up
``r = min(1, step / tangent_warmup)`` and the normalisation ``g <- g / (||g|| + c)``. The loss, in float64, is
the adaptively weighted form

    L = w(t) / (e^{logvar(t)} D) ||F_theta - F^- - g||^2 + logvar(t),   w(t) = 1 / (sigma_d tan t),

where the prior ``w`` and the learned ``logvar`` can each be switched off (then ``w = 1``, ``logvar = 0``).

rCM (``rcm.py``) reuses :meth:`SCM.consistency_target` with its own warm-up form of the tangent.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fdistill.containers import Batch, Networks
from fdistill.networks.denoisers import Denoiser, per_sample
from fdistill.networks.generator import Generator
from fdistill.networks.jvp import ReplayRNG, time_jvp
from fdistill.networks.trigflow import LogVarianceHead, TrigFlowDenoiser
from fdistill.objectives import common
from fdistill.objectives.base import Objective, register
from fdistill.schedules import from_x0, sample_time


def scm_tangent(F_minus, dxdt, x_t, v, t, sigma_data: float, warmup_ratio: float):
    """sCM tangent ``-cos^2 t (s_d F^- - dx/dt) - r (cos t sin t x_t + s_d v)``, float64, ``t`` ``[B]``."""
    cos, sin = per_sample(torch.cos(t), F_minus.double()), per_sample(torch.sin(t), F_minus.double())
    return -cos**2 * (sigma_data * F_minus - dxdt) - warmup_ratio * (cos * sin * x_t + sigma_data * v)


def rcm_tangent(F_minus, dxdt, x_t, v, t, sigma_data: float, warmup_ratio: float):
    """rCM's warm-up form ``-cos t sqrt(1 - r^2 sin^2 t) (s_d F^- - dx/dt) - (r cos t sin t x_t + s_d v)``;
    equal to :func:`scm_tangent` at ``r = 1`` (rCM writes it for ``s_d = 1``)."""
    cos, sin = per_sample(torch.cos(t), F_minus.double()), per_sample(torch.sin(t), F_minus.double())
    damping = cos * torch.sqrt(1 - warmup_ratio**2 * sin**2)
    return -damping * (sigma_data * F_minus - dxdt) - (warmup_ratio * cos * sin * x_t + sigma_data * v)


TANGENTS = {"scm": scm_tangent, "rcm": rcm_tangent}


def normalize_tangent(g: torch.Tensor, norm: str = "l2", const: float = 0.1) -> torch.Tensor:
    """``g / (||g|| + c)`` per sample, with the L2 norm (sCM paper, rCM) or the RMS norm (FastGen)."""
    if norm not in ("l2", "rms"):
        raise ValueError(f"unknown tangent norm {norm!r}; use l2 or rms")
    size = g.flatten(1).norm(dim=1)
    size = size / g[0].numel() ** 0.5 if norm == "rms" else size
    return g / (per_sample(size, g) + const)


@dataclass
class ConsistencyOptions:
    """Options shared by sCM and rCM. Times are TrigFlow times: ``sigma_EDM = sigma_data tan t``."""

    name: str = "scm"
    mode: str = "distillation"  # distillation (sCD: teacher dx/dt) | training (sCT: dx/dt from x0 and z)
    sigma_data: float = 1.0
    p_mean: float = -0.8  # consistency times: ln sigma_EDM ~ N(p_mean, p_std^2), t = atan(sigma / sigma_d)
    p_std: float = 1.6
    tangent_warmup: int = 10000
    tangent_form: str = "scm"  # scm | rcm (warm-up form; identical after warm-up)
    tangent_norm: str = "rms"  # rms (FastGen) | l2 (sCM paper, rCM)
    tangent_norm_const: float = 0.1
    jvp: str = "exact"  # exact (forward-mode AD) | finite_difference
    # Finite-difference time step relative to t (FastGen: 1e-3, right for EDM's smooth c_noise). A diffusers
    # UNet on 0..999 timesteps needs about 3e-5: its sinusoidal embedding oscillates at one radian per step.
    fd_step: float = 1e-3


@dataclass
class SCMOptions(ConsistencyOptions):
    prior_weighting: bool = True  # w(t) = 1 / (sigma_d tan t)
    adaptive_weighting: bool = True  # learned logvar(t)


@register("scm", SCMOptions)
class SCM(Objective):
    critic_trains = ()
    needs_fake_score = False
    needs_real_data = True

    def __init__(self, options: ConsistencyOptions, schedule):
        super().__init__(options, schedule)
        if options.mode not in ("distillation", "training"):
            raise ValueError(f"unknown objective.mode {options.mode!r}; use distillation or training")
        if options.tangent_form not in TANGENTS:
            raise ValueError(f"unknown objective.tangent_form {options.tangent_form!r}; use scm or rcm")
        uses_logvar = getattr(options, "adaptive_weighting", False)
        self.logvar = LogVarianceHead(options.sigma_data) if uses_logvar else None

    def step_kind(self, step: int) -> str:
        return "generator"

    def build_student(self, net: Denoiser, times: list[float]) -> Generator:
        """The student in TrigFlow: ``generator.times`` are TrigFlow times in ``(0, pi/2)``."""
        if not all(0 < t < math.pi / 2 for t in times):
            raise ValueError(f"{self.name} needs generator.times in TrigFlow units in (0, pi/2); got {times}")
        return Generator(TrigFlowDenoiser(net, self.options.sigma_data), times)

    def generator_parameters(self):
        return list(self.logvar.parameters()) if self.logvar is not None else []

    def warmup_ratio(self, step: int) -> float:
        return min(1.0, step / self.options.tangent_warmup) if self.options.tangent_warmup > 0 else 1.0

    def consistency_target(self, batch: Batch, nets: Networks, step: int):
        """``(t, F_theta, F^- + g_normalized, rms of g)`` on a batch of data; only ``F_theta`` has gradient.
        The raw tangent's RMS is logged: it shrinks as the student becomes self-consistent."""
        o, student = self.options, nets.student.net
        x0 = batch.real
        t = student.clamp_time(sample_time(student.schedule, batch.size, "lognormal", p_mean=o.p_mean,
                                           p_std=o.p_std)).to(x0.device)
        cos, sin = per_sample(torch.cos(t), x0.double()), per_sample(torch.sin(t), x0.double())
        z = o.sigma_data * torch.randn_like(x0).double()
        x_t = (cos * x0.double() + sin * z).to(x0.dtype)
        with torch.no_grad():
            if o.mode == "training":
                dxdt = cos * z - sin * x0.double()
            else:
                x0_teacher = TrigFlowDenoiser(nets.teacher, o.sigma_data)(x_t, t, batch.cond)
                dxdt = o.sigma_data * from_x0(x0_teacher, "trigflow", x_t, cos, o.sigma_data * sin)
        replay = ReplayRNG(x0.device)
        with replay():
            F_theta = student.velocity(x_t, t, batch.cond)
        v = time_jvp(lambda x, s: student.velocity(x, s, batch.cond), x_t, t, cos * sin * dxdt,
                     torch.cos(t) * torch.sin(t), o.jvp, o.fd_step, module=student, rng=replay)
        F_minus = F_theta.detach().double()
        tangent = TANGENTS[o.tangent_form](F_minus, dxdt, x_t.double(), v.double(), t, o.sigma_data,
                                           self.warmup_ratio(step))
        tangent = common.zero_nonfinite_samples(tangent)
        target = F_minus + normalize_tangent(tangent, o.tangent_norm, o.tangent_norm_const)
        return t, F_theta, target, tangent.pow(2).mean().sqrt()

    def generator_loss(self, batch: Batch, nets: Networks, step: int):
        t, F_theta, target, tangent_rms = self.consistency_target(batch, nets, step)
        error = (F_theta.double() - target).flatten(1).pow(2).mean(1)
        weight = 1 / (self.options.sigma_data * torch.tan(t)) if self.options.prior_weighting else 1.0
        logvar = self.logvar(t) if self.logvar is not None else torch.zeros_like(t)
        loss = (weight * torch.exp(-logvar) * error + logvar).mean()
        return loss, {"scm": loss.detach(), "tangent_rms": tangent_rms}
