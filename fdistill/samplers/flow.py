"""The one- and few-step sampler of students of flow-matching teachers: the arithmetic of diffusers' stock
``FlowMatchEulerDiscreteScheduler``, so that a stock pipeline (``StableDiffusion3Pipeline``, ``FluxPipeline``)
serves the exported student and reproduces fdistill's samples bit for bit.

The student's sampling times ``t_i`` are the scheduler's ``sigmas = t_i / 1000`` (passed to the pipeline as
``sigmas=[...]``; the exported scheduler has ``shift = 1``, so they are used as given):

* the first input is unit noise ``z``;
* the transformer receives ``timestep = float32(sigma) * 1000`` and returns a velocity ``v``;
* each step is Euler's, ``x <- x + (sigma_next - sigma) v`` in float32. From the last time ``sigma_next = 0``, so the
  step lands on ``x - sigma v``, the student's x0. Between steps it moves to ``(1 - sigma_next) x0 +
  sigma_next eps_hat`` with the noise ``eps_hat`` that ``(x, x0)`` imply: fdistill's "ode" re-noising.

Stock flow pipelines do not hand their generator to the scheduler, so a stochastic (fresh-noise) few-step sampler
could not be reproduced from a seed; these students therefore re-noise deterministically.
"""

from __future__ import annotations

import numpy as np
import torch

from fdistill.schedules import FlowMatchSchedule


class FlowMatchSampling:
    """Euler steps of ``FlowMatchEulerDiscreteScheduler`` for a velocity network on ``schedule``."""

    renoise_mode = "ode"

    def __init__(self, schedule: FlowMatchSchedule):
        self.num_train_timesteps = schedule.num_train_timesteps

    def sigma(self, t: float) -> torch.Tensor:
        """The scheduler's float32 sigma of time ``t``, as ``set_timesteps(sigmas=[t / 1000])`` stores it."""
        return torch.from_numpy(np.array([t / self.num_train_timesteps]).astype(np.float32))[0]

    def check_times(self, times: list[float]) -> None:
        """Every time in the schedule's range (the generator's check) is a sigma the scheduler steps from: the
        transformer sees the same ``timestep`` in fdistill (``FlowTransformerDenoiser.timestep``) as in the pipeline."""

    def denoise(self, model_output: torch.Tensor, sample: torch.Tensor, t: float) -> torch.Tensor:
        """The last step from ``t`` to ``sigma = 0``: ``sample - sigma v``, the x0 the student predicts."""
        return self.advance(model_output, sample, t, None)

    def advance(self, model_output, sample, t: float, t_next: float | None, mode: str = "ode", generator=None):
        """The scheduler's step from ``t`` to ``t_next`` (``None``: to ``sigma = 0``)."""
        if mode != "ode":
            raise ValueError(f"a student of a flow-matching teacher steps with the stock Euler scheduler, which "
                             f"re-noises deterministically (renoise ode), not {mode}")
        sigma = self.sigma(t)
        sigma_next = torch.zeros((), dtype=torch.float32) if t_next is None else self.sigma(t_next)
        prev = sample.to(torch.float32) + (sigma_next - sigma) * model_output
        return prev.to(model_output.dtype)

    def scheduler(self):
        """A stock ``FlowMatchEulerDiscreteScheduler`` with this arithmetic: the teacher's ``num_train_timesteps``,
        no shift (the student's times are passed as they are) and deterministic steps."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=self.num_train_timesteps, shift=1.0,
                                               use_dynamic_shifting=False, stochastic_sampling=False)
