"""Classifier-free guidance as a wrapper around any conditional denoiser (docs/objectives.md §2.5).

Ho & Salimans (2022, arXiv 2207.12598): ``x0 = x0_u + w (x0_c - x0_u)``, with ``x0_c`` the prediction under the
condition and ``x0_u`` under the unconditional input (the null class, or an empty or negative prompt). ``w = 1``
is the conditional model, ``w = 0`` the unconditional one. This ``w`` is the ``guidance_scale`` of diffusers'
pipelines and of DMD2's code; Ho & Salimans' paper writes ``(1 + w') x0_c - w' x0_u``, so its ``w'`` is ``w - 1``.
An optional interval ``[t_lo, t_hi]`` of schedule times guides only there and keeps the
conditional prediction elsewhere (Kynkaanniemi et al. 2024, arXiv 2404.07724).

Only the frozen teacher is ever wrapped: every objective and the teacher's multi-step sampler read it through
the wrapper; the student and the fake score are copies of the unwrapped network and are never guided.
"""

from __future__ import annotations

from typing import Callable

import torch

from fdistill.networks.denoisers import Denoiser, per_sample


class GuidedDenoiser(Denoiser):
    """``net`` with classifier-free guidance of scale ``scale``. ``unconditional(cond)`` gives the unconditional
    input for a batch of conditions (default: ``net.null_condition``). Features for discriminator heads come from
    the conditional pass."""

    def __init__(self, net: Denoiser, scale: float, interval: tuple[float, float] | None = None,
                 unconditional: Callable | None = None):
        super().__init__()
        if not net.conditional:
            raise ValueError(f"guidance needs a conditional network; {type(net).__name__} takes no condition")
        if interval is not None and not interval[0] <= interval[1]:
            raise ValueError(f"the guidance interval must be [t_lo, t_hi] with t_lo <= t_hi, got {list(interval)}")
        self.net, self.scale, self.interval = net, float(scale), interval
        self.unconditional = unconditional or net.null_condition
        self.schedule, self.sample_shape = net.schedule, net.sample_shape
        self.prediction_type, self.num_class_embeds, self.conditional = net.prediction_type, net.num_class_embeds, True

    def forward_with_features(self, x_t, t, cond=None):
        x0, features = self.net.forward_with_features(x_t, t, cond)
        if cond is None or self.scale == 1.0:
            return x0, features
        x0_u = self.net(x_t, t, self.unconditional(cond))
        guided = x0_u + self.scale * (x0 - x0_u)
        if self.interval is not None:
            t = torch.as_tensor(t, device=x_t.device).reshape(-1).expand(x_t.shape[0])
            inside = (t >= self.interval[0]) & (t <= self.interval[1])
            guided = torch.where(per_sample(inside, x0).bool(), guided, x0)
        return guided, features

    def features(self, x_t, t, cond=None):
        return self.net.features(x_t, t, cond)  # those of the conditional pass, as forward_with_features gives

    def null_condition(self, cond):
        return self.unconditional(cond)
