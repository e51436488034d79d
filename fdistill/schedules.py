"""Noise schedules ``x_t = alpha(t) x_0 + sigma(t) eps`` and conversions between parameterisations.

Every network in fdistill speaks x0-predictions; this module turns eps / v / flow / score / TrigFlow-F
predictions into x0 and back, given ``(x_t, alpha_t, sigma_t)``. Schedule arithmetic is done in float64
(docs/objectives.md §1.3, §12 item 6) and cast back to the tensor's dtype by the callers that need it.

Schedules (docs/objectives.md §1.1): continuous VP (linear beta), discrete VP from a diffusers scheduler's
``alphas_cumprod``, EDM/VE, rectified flow, rectified flow in a diffusers flow-matching scheduler's timesteps, and
TrigFlow. Each can find the time with a given signal-to-noise
ratio ``alpha/sigma`` ("SNR matching"), which is how a TrigFlow student wraps any teacher.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

PREDICTION_KINDS = ("x0", "eps", "v", "flow", "velocity", "score", "trigflow")


def _f64(t) -> torch.Tensor:
    return torch.as_tensor(t, dtype=torch.float64)


def broadcast_to(coef: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reshape a per-sample coefficient ``[B]`` so that it broadcasts against ``like`` ``[B, ...]``."""
    coef = torch.as_tensor(coef, device=like.device)
    return coef.reshape(coef.shape + (1,) * (like.dim() - coef.dim()))


class Schedule:
    """A forward process ``x_t = alpha(t) x_0 + sigma(t) eps``; ``t`` in ``[t_min, t_max]``.

    Subclasses implement ``alpha``, ``sigma`` and ``t_from_snr`` (inverse of ``alpha/sigma``), all in float64.
    ``dalpha`` / ``dsigma`` (time derivatives) default to a central finite difference.
    """

    name = "schedule"
    t_min: float
    t_max: float
    discrete = False  # whether the network's natural times are integers (a diffusers scheduler's timesteps)

    def alpha(self, t) -> torch.Tensor:
        raise NotImplementedError

    def sigma(self, t) -> torch.Tensor:
        raise NotImplementedError

    def t_from_snr(self, snr) -> torch.Tensor:
        """The time whose ``alpha/sigma`` equals ``snr`` (float64)."""
        raise NotImplementedError

    def dalpha(self, t) -> torch.Tensor:
        t = _f64(t)
        h = 1e-6 * (self.t_max - self.t_min)
        return (self.alpha(t + h) - self.alpha(t - h)) / (2 * h)

    def dsigma(self, t) -> torch.Tensor:
        t = _f64(t)
        h = 1e-6 * (self.t_max - self.t_min)
        return (self.sigma(t + h) - self.sigma(t - h)) / (2 * h)

    def coefficients(self, t, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(alpha_t, sigma_t)`` in float64, shaped to broadcast against ``like``."""
        t = _f64(t)
        return broadcast_to(self.alpha(t), like), broadcast_to(self.sigma(t), like)

    def diffuse(self, x0: torch.Tensor, t, eps: torch.Tensor) -> torch.Tensor:
        alpha, sigma = self.coefficients(t, x0)
        return (alpha * x0.double() + sigma * eps.double()).to(x0.dtype)


@dataclass
class VPSchedule(Schedule):
    """Continuous VP (DDPM/score-SDE) with linear beta: ``alpha = exp(-0.5 int beta)``, ``sigma = sqrt(1-alpha^2)``."""

    beta_min: float = 0.1
    beta_max: float = 20.0
    t_min: float = 1e-3
    t_max: float = 1.0
    name = "vp"

    def _log_alpha(self, t):
        t = _f64(t)
        return -0.25 * t**2 * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min

    def alpha(self, t):
        return torch.exp(self._log_alpha(t))

    def sigma(self, t):
        return torch.sqrt(-torch.expm1(2 * self._log_alpha(t)))

    def t_from_snr(self, snr):
        # alpha^2 = snr^2 / (1 + snr^2)  ->  log alpha = -0.5 log(1 + snr^-2); solve the quadratic in t.
        log_alpha = -0.5 * torch.log1p(_f64(snr) ** -2)
        a, b = 0.25 * (self.beta_max - self.beta_min), 0.5 * self.beta_min
        return (-b + torch.sqrt(b * b - 4 * a * log_alpha)) / (2 * a)


class DiscreteVPSchedule(Schedule):
    """VP schedule of a diffusers DDPM-type scheduler, from its ``alphas_cumprod``.

    Time is the scheduler's timestep index ``t in [0, N-1]`` (what the UNet receives); non-integer times
    interpolate ``log alpha_bar`` linearly so that continuous-time objectives (sCM) can use it too. Built from a
    diffusers scheduler, it keeps that scheduler's config and float32 table, from which students are served
    (``fdistill.samplers.lcm``).
    """

    name = "discrete_vp"
    discrete = True

    def __init__(self, alphas_cumprod, scheduler_config: dict | None = None):
        self.alphas_cumprod = torch.as_tensor(alphas_cumprod).clone()
        self.log_alpha_bar = torch.log(_f64(alphas_cumprod))
        self.t_min, self.t_max = 0.0, float(len(self.log_alpha_bar) - 1)
        self.scheduler_config = scheduler_config

    @classmethod
    def from_diffusers(cls, scheduler) -> "DiscreteVPSchedule":
        # without diffusers' private keys: "_use_default_values" would make another scheduler class built from
        # this config fall back to its own defaults for every key the source scheduler left at its default
        return cls(scheduler.alphas_cumprod, {k: v for k, v in scheduler.config.items() if not k.startswith("_")})

    def _log_alpha_bar(self, t):
        t = _f64(t).clamp(self.t_min, self.t_max)
        lo = t.floor().clamp(max=self.t_max - 1).long()
        frac = t - lo
        table = self.log_alpha_bar.to(t.device)
        return table[lo] * (1 - frac) + table[lo + 1] * frac

    def alpha(self, t):
        return torch.exp(0.5 * self._log_alpha_bar(t))

    def sigma(self, t):
        return torch.sqrt(-torch.expm1(self._log_alpha_bar(t)))

    def t_from_snr(self, snr):
        snr = _f64(snr)
        target = -torch.log1p(snr**-2)  # log alpha_bar, decreasing in t
        table = self.log_alpha_bar.to(snr.device)
        idx = torch.searchsorted(-table, -target.reshape(-1)).clamp(1, len(table) - 1)
        lo, hi = table[idx - 1], table[idx]
        frac = ((target.reshape(-1) - lo) / (hi - lo)).clamp(0, 1)
        return ((idx - 1).double() + frac).reshape(target.shape)


@dataclass
class EDMSchedule(Schedule):
    """EDM / VE: ``alpha = 1``, ``sigma = t`` (Karras et al. 2022, arXiv 2206.00364)."""

    t_min: float = 0.002
    t_max: float = 80.0
    sigma_data: float = 0.5
    name = "edm"

    def alpha(self, t):
        return torch.ones_like(_f64(t))

    def sigma(self, t):
        return _f64(t).clone()

    def dalpha(self, t):
        return torch.zeros_like(_f64(t))

    def dsigma(self, t):
        return torch.ones_like(_f64(t))

    def t_from_snr(self, snr):
        return 1.0 / _f64(snr)


@dataclass
class RectifiedFlowSchedule(Schedule):
    """Rectified flow: ``alpha = 1 - t``, ``sigma = t``; the velocity target is ``eps - x0``."""

    t_min: float = 0.0
    t_max: float = 0.999
    name = "rf"

    def alpha(self, t):
        return 1 - _f64(t)

    def sigma(self, t):
        return _f64(t).clone()

    def dalpha(self, t):
        return -torch.ones_like(_f64(t))

    def dsigma(self, t):
        return torch.ones_like(_f64(t))

    def t_from_snr(self, snr):
        return 1.0 / (1.0 + _f64(snr))


class FlowMatchSchedule(Schedule):
    """Rectified flow in the time units of diffusers' ``FlowMatchEulerDiscreteScheduler``: ``t = 1000 sigma``,
    ``alpha = 1 - sigma``, ``sigma = t / 1000`` (``num_train_timesteps`` in general), which is what its transformer
    receives as ``timestep``. The network predicts the velocity ``eps - x0``. The scheduler's timestep ``shift``
    changes which times a sampler visits, not the process, and is kept for the time law that follows it
    (:func:`sample_time`'s ``shift``). ``t_max`` stops at ``sigma = 0.999``, where ``sigma/alpha`` is still finite,
    as for :class:`RectifiedFlowSchedule`.
    """

    name = "flow_match"

    def __init__(self, num_train_timesteps: int = 1000, shift: float = 1.0, scheduler_config: dict | None = None):
        self.num_train_timesteps, self.shift = num_train_timesteps, shift
        self.t_min, self.t_max = 0.0, 0.999 * num_train_timesteps
        self.scheduler_config = scheduler_config

    @classmethod
    def from_diffusers(cls, scheduler, image_tokens: int | None = None) -> "FlowMatchSchedule":
        """The schedule of a ``FlowMatchEulerDiscreteScheduler``. A scheduler with ``use_dynamic_shifting`` shifts
        by ``exp(mu)``, with ``mu`` interpolated linearly in the number of image tokens between ``base_shift`` at
        ``base_image_seq_len`` and ``max_shift`` at ``max_image_seq_len`` (what Flux and SD3 pipelines compute
        from the resolution they sample at, ``image_tokens``): its exponential ``time_shift`` is the plain shift
        ``k sigma / (1 + (k - 1) sigma)`` with ``k = exp(mu)``."""
        config = {k: v for k, v in scheduler.config.items() if not k.startswith("_")}
        shift = config.get("shift", 1.0)
        if config.get("use_dynamic_shifting"):
            if config.get("time_shift_type", "exponential") != "exponential":
                raise ValueError(f"a scheduler with time_shift_type={config['time_shift_type']!r} is not a "
                                 "timestep shift; fdistill reads exponential dynamic shifting")
            if image_tokens is None:
                raise ValueError("a scheduler with use_dynamic_shifting needs the number of image tokens")
            base, top = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
            low, high = config.get("base_shift", 0.5), config.get("max_shift", 1.15)
            shift = math.exp(low + (high - low) * (image_tokens - base) / (top - base))
        return cls(config["num_train_timesteps"], shift, config)

    def alpha(self, t):
        return 1 - _f64(t) / self.num_train_timesteps

    def sigma(self, t):
        return _f64(t) / self.num_train_timesteps

    def dalpha(self, t):
        return torch.full_like(_f64(t), -1.0 / self.num_train_timesteps)

    def dsigma(self, t):
        return torch.full_like(_f64(t), 1.0 / self.num_train_timesteps)

    def t_from_snr(self, snr):
        return self.num_train_timesteps / (1.0 + _f64(snr))


@dataclass
class TrigFlowSchedule(Schedule):
    """TrigFlow (Lu & Song 2024, arXiv 2410.11081): ``x_t = cos t x0 + sin t sigma_d eps``, ``t in [0, pi/2]``."""

    sigma_data: float = 0.5
    t_min: float = 0.0
    t_max: float = math.pi / 2
    name = "trigflow"

    def alpha(self, t):
        return torch.cos(_f64(t))

    def sigma(self, t):
        return self.sigma_data * torch.sin(_f64(t))

    def dalpha(self, t):
        return -torch.sin(_f64(t))

    def dsigma(self, t):
        return self.sigma_data * torch.cos(_f64(t))

    def t_from_snr(self, snr):
        return torch.atan2(torch.ones_like(_f64(snr)), _f64(snr) * self.sigma_data)


def matched_time(source: Schedule, t, target: Schedule) -> tuple[torch.Tensor, torch.Tensor]:
    """Time on ``target`` with the same SNR as ``t`` on ``source``, and the input scale between them.

    Returns ``(t_target, scale)`` with ``x_target = scale * x_source`` (docs/objectives.md §1.1):
    ``scale = alpha_target / alpha_source = sigma_target / sigma_source``.
    """
    t = _f64(t)
    snr = source.alpha(t) / source.sigma(t)
    t_target = target.t_from_snr(snr)
    return t_target, target.sigma(t_target) / source.sigma(t)


SCHEDULES = {
    "vp": VPSchedule,
    "edm": EDMSchedule,
    "rf": RectifiedFlowSchedule,
    "trigflow": TrigFlowSchedule,
}


# ---------------------------------------------------------------------------------------------------
# Conversions (docs/objectives.md §1.3). ``alpha``/``sigma`` are float64 and broadcast against ``x_t``.
# ``dalpha``/``dsigma`` are only needed for the general flow parameterisation.


def to_x0(pred, kind, x_t, alpha, sigma, dalpha=None, dsigma=None) -> torch.Tensor:
    """Convert a network prediction of the given ``kind`` into an x0-prediction (float64)."""
    p, x = pred.double(), x_t.double()
    if kind == "x0":
        return p
    if kind == "eps":
        return (x - sigma * p) / alpha
    if kind == "v":  # v = alpha eps - sigma x0, needs alpha^2 + sigma^2 = 1
        return alpha * x - sigma * p
    if kind == "flow":  # u = alpha' x0 + sigma' eps
        ratio = dsigma / sigma
        return (ratio * x - p) / (ratio * alpha - dalpha)
    if kind == "velocity":  # rectified flow (alpha = 1 - sigma) only: v = eps - x0, so x0 = x_t - sigma v
        return x - sigma * p
    if kind == "score":
        return (x + sigma**2 * p) / alpha
    if kind == "trigflow":  # TrigFlow schedule only: x0 = cos t x_t - sigma_d sin t F
        return alpha * x - sigma * p
    raise ValueError(f"unknown prediction kind {kind!r}; choose one of {PREDICTION_KINDS}")


def from_x0(x0, kind, x_t, alpha, sigma, dalpha=None, dsigma=None) -> torch.Tensor:
    """Convert an x0-prediction into the given ``kind`` (float64); the inverse of :func:`to_x0`."""
    x0, x = x0.double(), x_t.double()
    if kind == "x0":
        return x0
    eps = (x - alpha * x0) / sigma
    if kind == "eps":
        return eps
    if kind == "v":
        return alpha * eps - sigma * x0
    if kind == "flow":
        return dalpha * x0 + dsigma * eps
    if kind == "velocity":
        return eps - x0
    if kind == "score":
        return -eps / sigma
    if kind == "trigflow":  # F = (cos t x_t - x0) / (sigma_d sin t)
        return (alpha * x - x0) / sigma
    raise ValueError(f"unknown prediction kind {kind!r}; choose one of {PREDICTION_KINDS}")


# ---------------------------------------------------------------------------------------------------
# Time samplers (docs/objectives.md §1.4). All return float64 times of the given schedule.


def karras_sigmas(n: int = 1000, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0):
    """Ascending Karras grid ``sigma_k = (smin^(1/rho) + k/(n-1) (smax^(1/rho) - smin^(1/rho)))^rho``."""
    k = torch.arange(n, dtype=torch.float64)
    return (sigma_min ** (1 / rho) + k / (n - 1) * (sigma_max ** (1 / rho) - sigma_min ** (1 / rho))) ** rho


def sigma_to_time(schedule: Schedule, sigma_edm) -> torch.Tensor:
    """The time of ``schedule`` whose SNR equals that of EDM noise level ``sigma_edm`` (``alpha/sigma = 1/s``)."""
    return schedule.t_from_snr(1.0 / _f64(sigma_edm)).clamp(schedule.t_min, schedule.t_max)


TIME_DISTRIBUTIONS = ("uniform", "lognormal", "polynomial", "sid", "shift")


def sample_time(schedule: Schedule, n: int, kind: str = "uniform", generator=None, **kw) -> torch.Tensor:
    """Draw ``n`` times of ``schedule`` from one of the distributions of docs/objectives.md §1.4.

    kinds: ``uniform`` (in ``[t_lo, t_hi]`` of the schedule, defaults its range), ``lognormal``
    (``ln sigma_EDM ~ N(p_mean, p_std^2)``, default EDM (-1.2, 1.2)), ``polynomial`` (uniform integer on
    the Karras grid, ``k in [k_lo, k_hi]``), ``sid`` (SiD's t_max = 800 Karras law, ``u ~ U[0, t_max/1000]``),
    ``shift`` (rCM's ``s = shift u / (1 + (shift-1) u)`` RF time; by default the shift of a flow-matching
    teacher's scheduler, which is how its sampler spaces its times, else rCM's 5).
    """
    u = torch.rand(n, generator=generator, dtype=torch.float64)
    if kind == "uniform":
        lo, hi = kw.get("t_lo", schedule.t_min), kw.get("t_hi", schedule.t_max)
        return lo + (hi - lo) * u
    if kind == "lognormal":
        z = torch.randn(n, generator=generator, dtype=torch.float64)
        sigma = torch.exp(kw.get("p_mean", -1.2) + kw.get("p_std", 1.2) * z)
        return sigma_to_time(schedule, sigma)
    if kind == "polynomial":
        grid = karras_sigmas(1000, kw.get("sigma_min", 0.002), kw.get("sigma_max", 80.0))
        lo, hi = kw.get("k_lo", 2), kw.get("k_hi", 998)
        k = torch.randint(lo, hi + 1, (n,), generator=generator)
        return sigma_to_time(schedule, grid[k])
    if kind == "sid":
        smin, smax, rho = kw.get("sigma_min", 0.002), kw.get("sigma_max", 80.0), 7.0
        v = u * kw.get("t_max", 800) / 1000
        sigma = (smax ** (1 / rho) + (1 - v) * (smin ** (1 / rho) - smax ** (1 / rho))) ** rho
        return sigma_to_time(schedule, sigma)
    if kind == "shift":
        shift = kw.get("shift", getattr(schedule, "shift", 5.0))
        s = shift * u / (1 + (shift - 1) * u)
        return sigma_to_time(schedule, s / (1 - s).clamp(min=1e-6))
    raise ValueError(f"unknown time distribution {kind!r}; use one of {', '.join(TIME_DISTRIBUTIONS)}")
