"""The student generator: a denoiser evaluated at a fixed time (one step) or a short list of times.

One step (ALGORITHMS.md 2.2): ``x_g = D_theta(sigma(t_0) z, t_0)`` read as an x0-prediction. Few steps with
``t_0 > t_1 > ... > t_N = 0``: ``x0_hat = D(x, t_i)``, then ``x <- alpha(t_{i+1}) x0_hat + sigma(t_{i+1}) eps'``
where ``eps'`` is fresh noise ("sde", the multistep consistency sampler) or the noise implied by ``(x, x0_hat)``
at ``t_i`` ("ode", DDIM-like). The last ``x0_hat`` is the sample.
"""

from __future__ import annotations

import torch
from torch import nn

from fdistill.denoisers import Denoiser
from fdistill.schedules import from_x0

RENOISE_MODES = ("sde", "ode")


class Generator(nn.Module):
    """Student generator around a trainable :class:`Denoiser`.

    ``times`` are the sampling times ``t_0 > t_1 > ...`` in the denoiser's schedule; ``times[0]`` is the
    one-step input time. ``sample(z, cond, steps=K)`` uses the first ``K`` of them.
    """

    def __init__(self, net: Denoiser, times: list[float]):
        super().__init__()
        if not times:
            raise ValueError("the generator needs at least one sampling time")
        if any(a <= b for a, b in zip(times, times[1:], strict=False)):
            raise ValueError(f"generator times must decrease strictly, got {times}")
        self.net = net
        self.times = [float(t) for t in times]

    @property
    def schedule(self):
        return self.net.schedule

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return self.net.sample_shape

    @property
    def max_steps(self) -> int:
        return len(self.times)

    def noise(self, n: int, generator=None, device=None) -> torch.Tensor:
        return torch.randn((n, *self.sample_shape), generator=generator, device=device)

    def step(self, x_t: torch.Tensor, t: float, cond=None) -> torch.Tensor:
        """One denoising step at time ``t`` (the gradient-carrying call)."""
        return self.net(x_t, torch.full((x_t.shape[0],), t, dtype=torch.float64, device=x_t.device), cond)

    def forward(self, z: torch.Tensor, cond=None) -> torch.Tensor:
        """One-step sample from unit noise ``z``."""
        t0 = self.times[0]
        return self.step(float(self.schedule.sigma(t0)) * z, t0, cond)

    def sample(self, z, cond=None, steps: int = 1, mode: str = "sde", generator=None) -> torch.Tensor:
        """``steps``-step sample from unit noise ``z``; gradients flow through every call if enabled."""
        if not 1 <= steps <= self.max_steps:
            raise ValueError(f"this student samples with 1..{self.max_steps} steps, not {steps}")
        if mode not in RENOISE_MODES:
            raise ValueError(f"unknown re-noising mode {mode!r}; use one of {RENOISE_MODES}")
        times = self.times[:steps]
        x = float(self.schedule.sigma(times[0])) * z
        for i, t in enumerate(times):
            x0 = self.step(x, t, cond)
            if i + 1 == len(times):
                return x0
            t_next = torch.tensor(times[i + 1], dtype=torch.float64)
            if mode == "sde":
                eps = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            else:
                a, s = self.schedule.alpha(t), self.schedule.sigma(t)
                eps = from_x0(x0, "eps", x, a, s).to(x.dtype)
            x = (self.schedule.alpha(t_next) * x0.double() + self.schedule.sigma(t_next) * eps.double()).to(x.dtype)
        return x0
