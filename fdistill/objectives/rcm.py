"""rCM: score-regularised continuous-time consistency (Zheng et al. 2025, arXiv 2510.08431;
docs/objectives.md §9).

rCM = sCM (forward divergence, on data) + DMD (reverse KL, on the student's own samples) as a long-skip
regulariser. Student step, ``L = scm_weight L_sCM + dmd_weight L_DMD`` (100 and 1 in the paper's code):

* ``L_sCM = sum_elem (F_theta - F^- - g_hat)^2`` with rCM's warm-up form of the tangent,
  ``g = -cos t sqrt(1 - r^2 sin^2 t) (sigma_d F^- - dx/dt) - (r cos t sin t x_t + sigma_d v)``,
  ``g_hat = g / (||g||_2 + 0.1)``, no prior and no adaptive weighting (:meth:`SCM.consistency_target`);
* ``L_DMD = sum_elem (x_g - sg(x_g - grad))^2``, ``grad = (x0_q - x0_p) / max(mean|x_g - x0_p|, c)``
  (``c = 1e-5``), on ``x_g`` from a backward simulation of ``N = (k mod K) + 1`` student steps (``N = K`` with
  ``backward_simulation_steps: last``; gradient through the last one only; ``K`` the student's number of times;
  docs/objectives.md §3.1) re-noised at ``t ~ p_D`` (RF shift 5, or ``dmd_time_distribution``); only after the
  tangent warm-up. ``dmd_normalizer: none`` drops the per-sample normaliser (``grad = x0_q - x0_p``). The simulation
  runs at the student's times (``backward_simulation_times: fixed``) or with its later times drawn in
  ``(t_{i+1}, t_i]`` (``random``; rCM's code draws them from ``p_D``, each capped by the time before).

Critic step: the fake score's flow-matching loss ``sum_elem (x_g - x0_q(x_t, t))^2 / sin^2 t`` on detached
backward-simulated samples. During the first ``tangent_warmup`` steps every step is a (pure sCM) student
step; afterwards one step in ``student_update_freq`` is a student step and the others are critic steps.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fdistill.containers import Batch, Networks
from fdistill.networks.denoisers import per_sample
from fdistill.networks.trigflow import TrigFlowDenoiser
from fdistill.objectives import common
from fdistill.objectives.base import register
from fdistill.objectives.dmd import NORMALIZERS
from fdistill.objectives.scm import SCM, ConsistencyOptions
from fdistill.schedules import TIME_DISTRIBUTIONS, sample_time


@dataclass
class RCMOptions(common.BackwardSimulationOptions, ConsistencyOptions):
    name: str = "rcm"
    p_mean: float = 0.7  # p_G of the sCM term (Wan 1.3B)
    tangent_warmup: int = 1000  # pure-sCM steps; also the warm-up of the tangent
    tangent_form: str = "rcm"
    tangent_norm: str = "l2"
    scm_weight: float = 100.0
    dmd_weight: float = 1.0
    student_update_freq: int = 5  # after warm-up: 1 student step, then freq - 1 critic steps
    # p_D, the times of the DMD term and the fake score: shift is RF time s = shift u / (1 + (shift - 1) u),
    # u ~ U[0, 1); any law of docs/objectives.md §1.4
    dmd_time_distribution: str = "shift"
    dmd_time_shift: float = 5.0
    # dmd: DMD's per-sample normaliser 1 / max(mean|x_g - x0_p|, dmd_normalizer_clip); none: 1
    dmd_normalizer: str = "dmd"
    dmd_normalizer_clip: float = 1e-5


@register("rcm", RCMOptions)
class RCM(SCM):
    critic_trains = ("fake_score",)
    needs_fake_score = True

    def __init__(self, options: RCMOptions, schedule):
        super().__init__(options, schedule)
        common.check_backward_simulation_options(options)
        common.check_choice(options, "dmd_time_distribution", TIME_DISTRIBUTIONS)
        common.check_choice(options, "dmd_normalizer", NORMALIZERS)

    def student_updates_before(self, step: int) -> int:
        """How many student steps precede ``step`` (rCM's "effective iteration")."""
        warmup, freq = self.options.tangent_warmup, self.options.student_update_freq
        return step if step <= warmup else warmup + -(-(step - warmup) // freq)

    def step_kind(self, step: int) -> str:
        after = step - self.options.tangent_warmup
        return "generator" if after < 0 or after % self.options.student_update_freq == 0 else "critic"

    def _dmd_times(self, net: TrigFlowDenoiser, n: int, device) -> torch.Tensor:
        o = self.options
        t = sample_time(net.schedule, n, o.dmd_time_distribution, shift=o.dmd_time_shift)
        return net.clamp_time(t).to(device)

    def _student_samples(self, batch: Batch, nets: Networks, simulation_index: int) -> torch.Tensor:
        max_steps = nets.student.max_steps
        cycle = common.cyclic_simulation_steps(simulation_index, max_steps)
        steps = common.simulation_steps(self.options, max_steps, cycle)
        return common.backward_simulation_samples(batch, nets, steps, self.options.backward_simulation_times)

    def _renoise(self, net: TrigFlowDenoiser, x_g: torch.Tensor):
        t = self._dmd_times(net, len(x_g), x_g.device)
        x_t, _ = common.diffuse(net.schedule, x_g.detach(), t)
        return x_t, t

    def dmd_loss(self, batch: Batch, nets: Networks, step: int) -> torch.Tensor:
        """``mean_batch sum_elem (x_g - sg(x_g - grad))^2`` with rCM's clipped DMD normaliser or none (float64)."""
        o = self.options
        x_g = self._student_samples(batch, nets, self.student_updates_before(step))
        teacher = TrigFlowDenoiser(nets.teacher, o.sigma_data)
        x_t, t = self._renoise(teacher, x_g)
        with torch.no_grad():
            x0_teacher = teacher(x_t, t, batch.cond).double()
            x0_fake = TrigFlowDenoiser(nets.fake_score, o.sigma_data)(x_t, t, batch.cond).double()
            grad = x0_fake - x0_teacher
            if o.dmd_normalizer == "dmd":
                scale = (x_g.detach().double() - x0_teacher).abs().flatten(1).mean(1)
                grad = per_sample(1 / scale.clamp(min=o.dmd_normalizer_clip), grad) * grad
            grad = common.zero_nonfinite_samples(grad)
        return (x_g.double() - (x_g.detach().double() - grad)).pow(2).flatten(1).sum(1).mean()

    def kept_passes(self, kind: str) -> tuple[str, ...]:
        return ("student", "student") if kind == "generator" else super().kept_passes(kind)  # sCM's and DMD's

    def generator_loss(self, batch: Batch, nets: Networks, step: int):
        _, F_theta, target, tangent_rms = self.consistency_target(batch, nets, step)
        loss_scm = (F_theta.double() - target).pow(2).flatten(1).sum(1).mean()
        logs = {"scm": loss_scm.detach(), "tangent_rms": tangent_rms}
        loss = self.options.scm_weight * loss_scm
        if step >= self.options.tangent_warmup:
            loss_dmd = self.dmd_loss(batch, nets, step)
            loss = loss + self.options.dmd_weight * loss_dmd
            logs["dmd"] = loss_dmd.detach()
        return loss, logs

    def critic_loss(self, batch: Batch, nets: Networks, step: int):
        with torch.no_grad():
            x_g = self._student_samples(batch, nets, step - self.student_updates_before(step))
        fake_score = TrigFlowDenoiser(nets.fake_score, self.options.sigma_data)
        x_t, t = self._renoise(fake_score, x_g)
        error = (fake_score(x_t, t, batch.cond).double() - x_g.double()).pow(2).flatten(1).sum(1)
        loss = (error / torch.sin(t) ** 2).mean()
        return loss, {"fake_score": loss.detach()}
