"""Multi-step teacher samplers: Euler and Heun on the probability-flow ODE, written on x0-predictions.

In the variables ``y = x / alpha`` and ``s = sigma / alpha`` every schedule becomes EDM's, where the ODE is
``dy/ds = (y - x0_hat) / s`` (Karras et al. 2022, arXiv 2206.00364, Alg. 1-2). Euler in ``s`` is DDIM;
Heun adds a second-order correction on every step but the last. Steps follow EDM's rho = 7 grid in ``s``.
"""

from __future__ import annotations

import torch

from fdistill.schedules import Schedule, karras_sigmas

SAMPLERS = ("euler", "heun")


def sampling_times(schedule: Schedule, steps: int, rho: float = 7.0) -> torch.Tensor:
    """``steps`` decreasing schedule times with EDM's rho-spacing of ``sigma/alpha`` between the ends."""
    s_hi = float(schedule.sigma(schedule.t_max) / schedule.alpha(schedule.t_max))
    s_lo = float(schedule.sigma(schedule.t_min) / schedule.alpha(schedule.t_min))
    s = karras_sigmas(steps, max(s_lo, 1e-4), s_hi, rho).flip(0) if steps > 1 else torch.tensor([s_hi])
    return schedule.t_from_snr(1.0 / s).clamp(schedule.t_min, schedule.t_max)


@torch.no_grad()
def sample_ode(teacher, z: torch.Tensor, steps: int = 32, method: str = "heun", cond=None):
    """Sample from unit noise ``z`` with ``teacher``, an x0-denoiser (``teacher(x_t, t, cond)`` and its
    ``schedule``); returns ``(x0, nfe)``. Integrates in float64 between evaluations."""
    if method not in SAMPLERS:
        raise ValueError(f"unknown sampler {method!r}; use one of {SAMPLERS}")
    sched = teacher.schedule
    times = sampling_times(sched, steps)
    scale = (sched.sigma(times) / sched.alpha(times)).tolist() + [0.0]
    y = z.double() * scale[0]
    nfe = 0

    def slope(y, i):
        nonlocal nfe
        nfe += 1
        t = times[i].repeat(len(y))
        a = float(sched.alpha(times[i]))
        x0 = teacher((a * y).to(z.dtype), t, cond).double()
        return (y - x0) / scale[i], x0

    for i in range(steps):
        d, x0 = slope(y, i)
        if scale[i + 1] == 0.0:
            return x0.to(z.dtype), nfe
        y_next = y + (scale[i + 1] - scale[i]) * d
        if method == "heun":
            d_next, _ = slope(y_next, i + 1)
            y_next = y + (scale[i + 1] - scale[i]) * 0.5 * (d + d_next)
        y = y_next
    return y.to(z.dtype), nfe
