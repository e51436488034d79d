"""Loss terms shared by the objectives (ALGORITHMS.md 0, 2.3, 2.4, 3, 4.2, 4.3).

Normalisers, weights and density ratios are computed in float32 and detached; time coefficients in float64.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from fdistill.denoisers import Denoiser, per_sample
from fdistill.schedules import Schedule, sample_time


def draw_times(schedule: Schedule, n: int, distribution: str, time_range=None, device=None) -> torch.Tensor:
    """Times for a batch; ``time_range = [lo, hi]`` restricts ``uniform`` draws."""
    kw = {} if time_range is None else {"t_lo": time_range[0], "t_hi": time_range[1]}
    return sample_time(schedule, n, distribution, **kw).to(device)


def diffuse(schedule: Schedule, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor | None = None):
    """``x_t = alpha_t x0 + sigma_t eps`` with fresh ``eps`` unless given; returns ``(x_t, eps)``."""
    eps = torch.randn_like(x0) if eps is None else eps
    return schedule.diffuse(x0, t, eps), eps


def guided_x0(teacher: Denoiser, x_t, t, cond, guidance_scale: float = 1.0, with_features: bool = False):
    """Teacher x0-prediction with classifier-free guidance ``x_u + w (x_c - x_u)`` (teacher only, 1.3).

    Features (for discriminator heads) come from the conditional pass.
    """
    x0, features = teacher.forward_with_features(x_t, t, cond)
    if guidance_scale != 1.0 and cond is not None:
        x0_uncond = teacher(x_t, t, teacher.null_condition(cond))
        x0 = x0_uncond + guidance_scale * (x0 - x0_uncond)
    return (x0, features) if with_features else x0


def fake_score_weight(schedule: Schedule, t: torch.Tensor, weighting: str, sigma_data: float = 0.5):
    """Per-sample weight of the x0-space denoising loss (2.3): ``none`` (FastGen), ``edm`` (SiD/UI/DI,
    ``1/c_out^2``) or ``dmd2`` (``alpha^2/sigma^2 + 1/sigma_d^2``)."""
    alpha, sigma = schedule.alpha(t), schedule.sigma(t)
    if weighting == "none":
        return torch.ones_like(alpha)
    if weighting == "edm":
        return (alpha**2 * sigma_data**2 + sigma**2) / (sigma * sigma_data) ** 2
    if weighting == "dmd2":
        return alpha**2 / sigma**2 + 1 / sigma_data**2
    raise ValueError(f"unknown fake-score weighting {weighting!r}; use none, edm or dmd2")


def denoising_loss(net: Denoiser, x0, t, cond=None, weighting: str = "none") -> torch.Tensor:
    """Denoising score matching on (detached) samples: ``mean_i lambda(t_i) mean_elem (D(x_t) - x0)^2``."""
    x0 = x0.detach()
    x_t, _ = diffuse(net.schedule, x0, t)
    err = (net(x_t, t, cond) - x0).float().pow(2).flatten(1).mean(1)
    return (fake_score_weight(net.schedule, t, weighting).float().to(err.device) * err).mean()


def dmd_normalizer(x_g, x0_teacher, eps: float = 1e-6) -> torch.Tensor:
    """DMD's per-sample ``1 / (mean_elem |x_g - x0_p| + eps)``, detached, float32 (section 0)."""
    return 1.0 / ((x_g.detach().float() - x0_teacher.detach().float()).abs().flatten(1).mean(1) + eps)


def pseudo_gradient_loss(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``1/2 mean (x - sg(x - g))^2``: its gradient w.r.t. ``x`` is ``g / numel`` (section 0)."""
    target = (x - g).detach()
    return 0.5 * (x.float() - target.float()).pow(2).mean()


def gan_generator_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """Non-saturating generator loss ``mean softplus(-l_fake)``."""
    return F.softplus(-logits_fake.float()).mean()


def gan_discriminator_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """``mean softplus(l_fake) + mean softplus(-l_real)``: real (teacher/data) is the positive class, so the
    optimal logit is ``log p_t / q_t`` (2.4)."""
    return F.softplus(logits_fake.float()).mean() + F.softplus(-logits_real.float()).mean()


# ---------------------------------------------------------------------------------------------------
# f-divergences, r = p/q (teacher over student), D_f(p||q) = E_q[f(r)], h(r) = r^2 f''(r) (4.2).


@dataclass(frozen=True)
class Divergence:
    """``f`` and the weight ``h = psi = r^2 f''`` with its first two derivatives (Uni-Instruct needs them)."""

    name: str
    f: Callable
    h: Callable
    dh: Callable
    d2h: Callable


def _alpha_divergence(a: float) -> Divergence:
    return Divergence(
        f"alpha{a:g}",
        lambda r: (r**a - a * r - (1 - a)) / (a * (a - 1)),
        lambda r: r**a,
        lambda r: a * r ** (a - 1),
        lambda r: a * (a - 1) * r ** (a - 2),
    )


def _ones(r):
    return torch.ones_like(r) if torch.is_tensor(r) else 1.0 + 0.0 * r


DIVERGENCES: dict[str, Divergence] = {
    d.name: d
    for d in [
        Divergence("rkl", lambda r: -torch.log(r), _ones, lambda r: 0 * r, lambda r: 0 * r),
        Divergence(
            "sf",
            lambda r: (r + 1) * torch.log((r + 1) / (2 * r)),
            lambda r: 1 / (1 + r),
            lambda r: -1 / (1 + r) ** 2,
            lambda r: 2 / (1 + r) ** 3,
        ),
        Divergence(
            "js",
            lambda r: r * torch.log(r) - (r + 1) * torch.log((r + 1) / 2),
            lambda r: r / (1 + r),
            lambda r: 1 / (1 + r) ** 2,
            lambda r: -2 / (1 + r) ** 3,
        ),
        Divergence(
            "sh",
            lambda r: (torch.sqrt(r) - 1) ** 2,
            lambda r: 0.5 * torch.sqrt(r),
            lambda r: 0.25 / torch.sqrt(r),
            lambda r: -0.125 * r**-1.5,
        ),
        Divergence("kl", lambda r: r * torch.log(r), lambda r: r, _ones, lambda r: 0 * r),
        Divergence("jf", lambda r: (r - 1) * torch.log(r), lambda r: r + 1, _ones, lambda r: 0 * r),
        Divergence("pearson", lambda r: (r - 1) ** 2, lambda r: 2 * r**2, lambda r: 4 * r, lambda r: 4 + 0 * r),
        Divergence(
            "neyman", lambda r: (1 - r) ** 2 / r, lambda r: 2 / r, lambda r: -2 / r**2, lambda r: 4 / r**3
        ),
    ]
}
DIVERGENCE_ALIASES = {"fkl": "kl", "jeffreys": "jf", "chi2": "pearson"}


def get_divergence(name: str, alpha: float = 0.5) -> Divergence:
    """Look up a divergence by name (``alpha`` uses ``alpha``; aliases fkl, jeffreys, chi2)."""
    if name == "alpha":
        return _alpha_divergence(alpha)
    key = DIVERGENCE_ALIASES.get(name, name)
    if key not in DIVERGENCES:
        choices = sorted(DIVERGENCES) + ["alpha"] + sorted(DIVERGENCE_ALIASES)
        raise ValueError(f"unknown divergence {name!r}; choose one of {', '.join(choices)}")
    return DIVERGENCES[key]


def density_ratio(logits, logit_clamp: float = 10.0, lower: float = 0.1, upper: float = 20.0) -> torch.Tensor:
    """``r = clamp(exp(clamp(mean_heads(l), +-logit_clamp)), lower, upper)``, detached float32 (4.3 step 2)."""
    logits = logits.detach().float()
    logits = logits.mean(1) if logits.dim() > 1 else logits
    return torch.exp(logits.clamp(-logit_clamp, logit_clamp)).clamp(lower, upper)


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum over processes when running distributed (a no-op in one process)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        x = x.clone()
        torch.distributed.all_reduce(x)
    return x


def normalize_to_mean_one(h: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``h / (global mean h + eps)`` over the global batch (4.3 step 4)."""
    total = all_reduce_sum(torch.stack([h.sum(), torch.tensor(float(h.numel()), device=h.device)]))
    return h / (total[0] / total[1] + eps)


class RatioBinNormalizer(nn.Module):
    """Per-time-bin EMA normalisation of density ratios (FastGen, 4.3 step 3).

    ``bins_b <- rho bins_b + (1 - rho) mean(r | t in bin b)`` for the bins present in the batch, then
    ``r_i <- r_i / (bins_{b_i} + 1e-6)`` with the updated bins. The bins are a persistent buffer.
    """

    def __init__(self, t_min: float, t_max: float, num_bins: int = 10, ema_rate: float = 0.0):
        super().__init__()
        self.t_min, self.t_max, self.ema_rate = t_min, t_max, ema_rate
        self.register_buffer("bins", torch.ones(num_bins))

    def bin_index(self, t: torch.Tensor) -> torch.Tensor:
        width = (self.t_max - self.t_min) / len(self.bins)
        return ((t.double() - self.t_min) / width).floor().clamp(0, len(self.bins) - 1).long()

    def forward(self, ratio: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        idx = self.bin_index(t).to(ratio.device)
        count = torch.zeros_like(self.bins).index_add_(0, idx, torch.ones_like(ratio))
        total = torch.zeros_like(self.bins).index_add_(0, idx, ratio.float())
        count, total = all_reduce_sum(count), all_reduce_sum(total)
        present = count > 0
        mean = total / (count + 1e-6)
        updated = self.ema_rate * self.bins + (1 - self.ema_rate) * mean
        self.bins.copy_(torch.where(present, updated, self.bins))
        return ratio / (self.bins[idx] + 1e-6)


def sample_weighted_pseudo_gradient(x_g, x0_fake, x0_teacher, weight=None, normalizer_eps: float = 1e-6):
    """VSD/DMD pseudo-gradient ``g_i = W_i w_i (x0_q - x0_p)`` with the DMD normaliser ``w_i`` (3, 4.3 step 5),
    returned with its loss ``1/2 mean (x_g - sg(x_g - g))^2``. ``weight`` is an extra per-sample ``W_i``."""
    w = dmd_normalizer(x_g, x0_teacher, normalizer_eps)
    if weight is not None:
        w = w * weight.float()
    g = per_sample(w, x_g) * (x0_fake.detach() - x0_teacher.detach()).to(x_g.dtype)
    return pseudo_gradient_loss(x_g, g), g
