"""The student generator: a denoiser evaluated at a fixed time (one step) or a short list of times.

One step (docs/objectives.md §2.2): ``x_g = D_theta(s z, t_0)`` read as an x0-prediction, with ``s`` the std
of ``x_{t_0}`` for unit-variance data, ``sqrt(alpha^2 + sigma^2)`` (1 for VP schedules, as stock diffusers
samplers draw their first input). Few steps with ``t_0 > t_1 > ...``: ``x0_hat = D(x, t_i)``, then
``x <- alpha(t_{i+1}) x0_hat + sigma(t_{i+1}) eps'`` where ``eps'`` is fresh noise ("sde", the multistep
consistency sampler) or the noise implied by ``(x, x0_hat)`` at ``t_i`` ("ode", DDIM-like). The last ``x0_hat``
is the sample. A student of a diffusers teacher does all this with the arithmetic of a stock diffusers scheduler,
so that plain diffusers serves it exactly: ``LCMScheduler`` for VP teachers (:mod:`fdistill.samplers.lcm`, "sde"
only), ``FlowMatchEulerDiscreteScheduler`` for flow-matching ones (:mod:`fdistill.samplers.flow`, "ode" only).

Backward simulation (docs/objectives.md §3.1) trains a few-step student on its own samples: ``k - 1`` steps
without gradient, re-noising as the student samples, then the ``k``-th step with gradient. Its times are the first
``k`` sampling times, or random ones: ``t_0`` kept and each later ``t_i`` drawn uniformly from
``(t_{i+1}, t_i]`` (``t_K = t_min``), on the integer timesteps of a discrete schedule.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from fdistill.networks.denoisers import Denoiser
from fdistill.schedules import Schedule, from_x0, sigma_to_time

RENOISE_MODES = ("sde", "ode")
# sigma/alpha of a one-step student whose teacher predicts epsilon (SiD's initial noise level, sigma_init = 2.5)
EPSILON_STUDENT_NOISE = 2.5


def time_at_noise_level(schedule: Schedule, noise_level: float) -> float:
    """The schedule time where ``sigma/alpha = noise_level`` (EDM's sigma), clamped to the schedule's range and
    rounded to the nearest timestep on a discrete schedule."""
    t = float(sigma_to_time(schedule, noise_level))
    return float(round(t)) if schedule.discrete else t


def default_student_times(teacher: Denoiser) -> list[float]:
    """The one-step time when none is configured: the schedule's last time, where the student's input
    ``sigma z`` carries no data at all; for a teacher that predicts epsilon, the time where ``sigma/alpha = 2.5``
    instead. Reading x0 from epsilon divides the network's error by ``alpha``, which is 0.006 at the last step
    of a linear-beta schedule (a 156x amplification) and 0.37 at that time."""
    if teacher.prediction_type == "epsilon":
        return [time_at_noise_level(teacher.schedule, EPSILON_STUDENT_NOISE)]
    return [float(teacher.schedule.t_max)]


def student_times(teacher: Denoiser, times: list[float] | None = None, noise_level: float | None = None):
    """The student's sampling times: ``times`` when given, else one step at ``noise_level`` (sigma/alpha) when
    given, else :func:`default_student_times`."""
    if times:
        return list(times)
    if noise_level is not None:
        return [time_at_noise_level(teacher.schedule, noise_level)]
    return default_student_times(teacher)


def input_scale(schedule: Schedule, t0: float) -> float:
    """``sqrt(alpha(t_0)^2 + sigma(t_0)^2)`` as a Python float: the student's first input is ``input_scale * z``
    for unit noise ``z``, the std of ``x_{t_0}`` for unit-variance data (1 for VP schedules)."""
    t0 = torch.tensor(t0, dtype=torch.float64)
    return float(torch.sqrt(schedule.alpha(t0) ** 2 + schedule.sigma(t0) ** 2))


def renoise(schedule: Schedule, x: torch.Tensor, x0: torch.Tensor, t: float, t_next: float, mode: str = "sde",
            generator: torch.Generator | None = None) -> torch.Tensor:
    """The input of the next few-step call: ``alpha(t_next) x0 + sigma(t_next) eps`` in float64, cast to ``x``.

    ``x`` is the input at time ``t`` whose x0-prediction is ``x0``. ``eps`` is fresh noise drawn from
    ``generator`` ("sde") or the noise that ``(x, x0)`` imply at ``t`` ("ode"). The noise is drawn on the
    generator's device and moved, so a CPU generator seeds a GPU sampler too.
    """
    if mode == "sde":
        device = generator.device if generator is not None else x.device
        eps = torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype).to(x.device)
    elif mode == "ode":
        eps = from_x0(x0, "eps", x, schedule.alpha(t), schedule.sigma(t)).to(x.dtype)
    else:
        raise ValueError(f"unknown re-noising mode {mode!r}; use one of {RENOISE_MODES}")
    t_next = torch.tensor(t_next, dtype=torch.float64)
    return (schedule.alpha(t_next) * x0.double() + schedule.sigma(t_next) * eps.double()).to(x.dtype)


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
        lo, hi = net.schedule.t_min, net.schedule.t_max
        if not all(lo <= t <= hi for t in self.times):
            raise ValueError(f"sampling times must lie in the schedule's range [{lo:g}, {hi:g}], got {self.times}")
        self.stock = net.stock_sampling()
        if self.stock is not None:
            self.stock.check_times(self.times)

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

    def servable(self) -> Generator:
        """The sampler that evaluation, ``sample.py`` and the export use: this generator, or, for a student trained
        in another time variable (sCM/rCM in TrigFlow), the same weights at the matching timesteps of the teacher's
        own schedule, which a stock diffusers scheduler drives."""
        net, times = self.net.served_as(self.times)
        return self if net is self.net else Generator(net, times)

    def first_input(self, z: torch.Tensor, t0: float) -> torch.Tensor:
        """The input at the first sampling time ``t0`` for unit noise ``z``."""
        return z if self.stock is not None else input_scale(self.schedule, t0) * z

    @property
    def renoise_mode(self) -> str:
        """How this student re-noises between steps when not told: as its stock scheduler does, else "sde"."""
        return self.stock.renoise_mode if self.stock is not None else "sde"

    def step(self, x_t: torch.Tensor, t: float, cond=None) -> torch.Tensor:
        """One denoising step at time ``t`` (the gradient-carrying call)."""
        t_batch = torch.full((x_t.shape[0],), t, dtype=torch.float64, device=x_t.device)
        if self.stock is None:
            return self.net(x_t, t_batch, cond)
        return self.stock.denoise(self.net.network_output(x_t, t_batch, cond), x_t, t)

    def advance(self, x: torch.Tensor, t: float, t_next: float, cond=None, mode: str | None = None,
                generator=None) -> torch.Tensor:
        """The input at ``t_next`` after one step from input ``x`` at ``t``: re-noised fresh ("sde") or along
        the implied noise ("ode"), with the stock scheduler's arithmetic when there is one."""
        mode = mode or self.renoise_mode
        if self.stock is None:
            return renoise(self.schedule, x, self.step(x, t, cond), t, t_next, mode, generator)
        t_batch = torch.full((x.shape[0],), t, dtype=torch.float64, device=x.device)
        return self.stock.advance(self.net.network_output(x, t_batch, cond), x, t, t_next, mode, generator)

    def forward(self, z: torch.Tensor, cond=None) -> torch.Tensor:
        """One-step sample from unit noise ``z``."""
        t0 = self.times[0]
        return self.step(self.first_input(z, t0), t0, cond)

    def sample(self, z, cond=None, steps: int = 1, mode: str | None = None, generator=None) -> torch.Tensor:
        """``steps``-step sample from unit noise ``z``; gradients flow through every call if enabled. ``mode``
        (default :attr:`renoise_mode`) is how it re-noises between steps."""
        if not 1 <= steps <= self.max_steps:
            raise ValueError(f"this student samples with 1..{self.max_steps} steps, not {steps}")
        if mode is not None and mode not in RENOISE_MODES:
            raise ValueError(f"unknown re-noising mode {mode!r}; use one of {RENOISE_MODES}")
        return self.sample_at(z, self.times[:steps], cond, mode, generator)

    def sample_at(self, z, times: list[float], cond=None, mode: str | None = None, generator=None) -> torch.Tensor:
        """A sample from unit noise ``z`` through the decreasing ``times`` (one step each); gradients flow through
        every call if enabled."""
        x = self.first_input(z, times[0])
        for t, t_next in zip(times, times[1:], strict=False):
            x = self.advance(x, t, t_next, cond, mode, generator)
        return self.step(x, times[-1], cond)

    def random_times(self, steps: int, generator=None) -> list[float]:
        """``steps`` times for backward simulation (docs/objectives.md §3.1): ``t_0`` as configured and, for
        ``i >= 1``, ``t_i`` drawn uniformly from ``(t_{i+1}, t_i]``, its stratum down to the next sampling time
        (``t_K = t_min``), so that the times decrease strictly and each stays near the one sampling uses. On a
        discrete schedule the draw is uniform over the stratum's integer timesteps, where diffusers' stock
        scheduler can step."""
        if not 1 <= steps <= self.max_steps:
            raise ValueError(f"this student samples with 1..{self.max_steps} steps, not {steps}")
        discrete = self.schedule.discrete
        if discrete and any(t != int(t) for t in self.times):
            raise ValueError(f"random times on a discrete schedule need integer generator.times, not {self.times}; "
                             "round them or set objective.backward_simulation_times=fixed")
        bounds = [*self.times, self.schedule.t_min]
        device = generator.device if generator is not None else "cpu"
        draws = torch.rand(steps - 1, generator=generator, dtype=torch.float64, device=device).tolist()
        times = [self.times[0]]
        for hi, lo, u in zip(bounds[1:], bounds[2:], draws, strict=False):
            if discrete:  # the integers lo + 1 .. hi, each with probability 1 / (hi - lo)
                times.append(float(hi - math.floor(u * (hi - lo))))
            else:
                times.append(hi - u * (hi - lo))
        return times

    def backward_simulation(self, z: torch.Tensor, cond=None, steps: int = 1, generator=None,
                            random_times: bool = False) -> torch.Tensor:
        """A ``steps``-step sample from unit noise ``z`` (re-noised as the student samples, :attr:`renoise_mode`)
        with gradient through the last step only: DMD2's and rCM's data-free backward simulation
        (docs/objectives.md §3.1, §9). Its times are the first ``steps`` sampling times, or :meth:`random_times`
        with ``random_times``."""
        if steps == 1:
            return self(z, cond)
        times = self.random_times(steps, generator) if random_times else self.times[:steps]
        with torch.no_grad():
            x = self.first_input(z, times[0])
            for t, t_next in zip(times, times[1:], strict=False):
                x = self.advance(x, t, t_next, cond, generator=generator)
        return self.step(x, times[-1], cond)
