"""TrigFlow view of any denoiser, for continuous-time consistency models (sCM, rCM).

TrigFlow (Lu & Song 2024, arXiv 2410.11081, eq. 2) diffuses ``x_t = cos t x0 + sin t z`` with
``z ~ N(0, sigma_d^2 I)``, ``t in [0, pi/2]``, and parameterises the consistency function as

    f(x_t, t) = cos t x_t - sin t sigma_d F(x_t, t),      sigma_d F ~ dx_t/dt = cos t z - sin t x0.

:class:`TrigFlowDenoiser` lets a network trained under any schedule (VP, EDM, rectified flow) answer at
TrigFlow times: the teacher time with the same signal-to-noise ratio ``cos t / (sigma_d sin t)`` is found in
float64 and the input rescaled, ``x_inner = x_trig sqrt(alpha^2 + (sigma/sigma_d)^2)`` (docs/objectives.md §1.1,
"SNR matching"). TrigFlow times are clamped to the part of ``(0, pi/2)`` the inner schedule covers, so that
e.g. an EDM network trained up to sigma = 80 is never asked about sigma = 1e16 (§12 item 6).
:class:`LogVarianceHead` is sCM's adaptive weight ``logvar(t)`` (arXiv 2410.11081, eq. 9).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from fdistill.networks.denoisers import Denoiser, per_sample
from fdistill.schedules import TrigFlowSchedule, from_x0, matched_time

TIME_MARGIN = 1e-4  # keep t away from 0 and pi/2, where sin t or cos t vanish (FastGen's clamp)


class TrigFlowDenoiser(Denoiser):
    """``net`` evaluated at TrigFlow times: ``forward`` gives its x0-prediction, :meth:`velocity` gives ``F``.

    Time conversion and input scaling are float64 and differentiable in ``t``, so JVPs in ``(x_t, t)``
    (sCM's ``dF/dt``) go through them. The wrapper owns no parameters of its own.
    """

    def __init__(self, net: Denoiser, sigma_data: float = 1.0):
        super().__init__()
        self.net, self.sigma_data = net, sigma_data
        self.schedule = TrigFlowSchedule(sigma_data=sigma_data)
        self.sample_shape = net.sample_shape
        self.num_class_embeds, self.conditional = net.num_class_embeds, net.conditional
        inner = net.schedule
        snr_ends = (inner.alpha(s) / inner.sigma(s) for s in (inner.t_min, inner.t_max))
        lo, hi = (float(self.schedule.t_from_snr(snr)) for snr in snr_ends)
        self.t_lo, self.t_hi = max(lo, TIME_MARGIN), min(hi, math.pi / 2 - TIME_MARGIN)

    def clamp_time(self, t) -> torch.Tensor:
        """TrigFlow times restricted to the range the inner network was trained on (float64)."""
        return torch.as_tensor(t, dtype=torch.float64).clamp(self.t_lo, self.t_hi)

    def inner_input(self, x_t: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x_inner, t_inner)``: the same point of the diffusion in the inner network's schedule."""
        t_inner, scale = matched_time(self.schedule, t, self.net.schedule)
        return (per_sample(scale, x_t.double()) * x_t.double()).to(x_t.dtype), t_inner

    def forward_with_features(self, x_t, t, cond=None):
        t = self.clamp_time(torch.as_tensor(t, device=x_t.device).reshape(-1).expand(x_t.shape[0]))
        x_inner, t_inner = self.inner_input(x_t, t)
        return self.net.forward_with_features(x_inner, t_inner, cond)

    def velocity(self, x_t: torch.Tensor, t: torch.Tensor, cond=None) -> torch.Tensor:
        """TrigFlow ``F = (cos t x_t - x0_hat) / (sigma_d sin t)`` (docs/objectives.md §1.3), in ``x_t``'s dtype."""
        t = self.clamp_time(torch.as_tensor(t, device=x_t.device).reshape(-1).expand(x_t.shape[0]))
        x_inner, t_inner = self.inner_input(x_t, t)
        x0 = self.net(x_inner, t_inner, cond)
        alpha, sigma = self.schedule.coefficients(t, x_t)
        return from_x0(x0, "trigflow", x_t, alpha, sigma).to(x_t.dtype)

    def served_as(self, times: list[float]) -> tuple[Denoiser, list[float]]:
        """A consistency student at TrigFlow time ``t`` is the inner network at the SNR-matched inner time, read
        on the inner schedule: when a stock scheduler can drive the inner network, that network at those times
        (rounded to timesteps on a discrete schedule) samples like this one and is what plain diffusers serves."""
        if self.net.stock_sampling() is None:
            return self, list(times)
        t = self.clamp_time(torch.tensor(times, dtype=torch.float64))
        inner = matched_time(self.schedule, t, self.net.schedule)[0]
        inner = inner.round() if self.net.schedule.discrete else inner
        return self.net, [float(s) for s in inner]

    def null_condition(self, cond):
        """The inner network's unconditional input (for classifier-free guidance)."""
        return self.net.null_condition(cond)


class LogVarianceHead(nn.Module):
    """sCM's learned ``logvar(t)``: linear in ``c_noise = log(sigma_d tan t) / 4`` and its Fourier features.

    FastGen reads it off the network's own time embedding; a separate head works for any denoiser. The linear
    ``c_noise`` feature lets it represent the prior weighting's ``log w(t) = -4 c_noise`` exactly. It starts
    at zero and is trained with the student (``Objective.generator_parameters``).
    """

    def __init__(self, sigma_data: float = 1.0, num_frequencies: int = 8):
        super().__init__()
        self.sigma_data = sigma_data
        self.register_buffer("frequencies", math.pi * 2.0 ** torch.arange(-2, num_frequencies - 2).float())
        self.linear = nn.Linear(2 * num_frequencies + 1, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        """``logvar`` per sample ``[B]`` (float64) for TrigFlow times ``t`` ``[B]``."""
        c_noise = (torch.log(self.sigma_data * torch.tan(t.double())) / 4).float()
        angles = c_noise[:, None].to(self.frequencies.device) * self.frequencies
        features = torch.cat([c_noise[:, None].to(angles), angles.cos(), angles.sin()], dim=1)
        return self.linear(features)[:, 0].double()
