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


# ---------------------------------------------------------------------------------------------------
# Score-identity family: SiD, SIM and Uni-Instruct (5, 6, 7), in x0 units, per sample, summed over elements,
# with Delta = x0_q - x0_p:  inner = (x0_p - x0_q).(x0_q - x_g)  and  sq = ||x0_p - x0_q||^2.
# In score units delta = s_q - s_p = (alpha/sigma^2) Delta and c = s_q + eps/sigma = (alpha/sigma^2)
# (x0_q - x_g), so -2 delta.c = (2 alpha^2/sigma^4) inner and ||delta||^2 = (alpha^2/sigma^4) sq: a weight
# 2 lambda(t) alpha^2/sigma^4 turns each loss below into its exact score-unit surrogate. Training uses the
# normaliser loss_scale * sid_normalizer instead (7.2, "in practice").


def _wide(x: torch.Tensor) -> torch.Tensor:
    """float32, or float64 when given float64 (the closed-form tests run in float64)."""
    return x if x.dtype == torch.float64 else x.float()


def student_input_times(schedule: Schedule, times: list[float], init_sigma: float | None) -> list[float]:
    """One-step input time of SiD-type students (2.2): the generic default ``[t_max]`` becomes the time
    whose SNR matches EDM ``sigma = init_sigma`` (2.5 SiD/SIM/UI, 1.0 Diff-Instruct); explicit times stay."""
    if init_sigma is None or list(times) != [schedule.t_max]:
        return list(times)
    from fdistill.schedules import sigma_to_time

    return [float(sigma_to_time(schedule, init_sigma))]


def sid_normalizer(x_g, x0_teacher, clip: float = 1e-5) -> torch.Tensor:
    """SiD/UI per-sample ``1 / max(mean_elem |x_g - x0_p|, clip)``, detached, float32 (section 0)."""
    return 1.0 / (x_g.detach().float() - x0_teacher.detach().float()).abs().flatten(1).mean(1).clamp(min=clip)


def score_identity_terms(x_g, x0_teacher, x0_fake) -> tuple[torch.Tensor, torch.Tensor]:
    """``(inner, sq)`` per sample (at least float32), with gradient through the frozen networks' inputs."""
    diff = _wide(x0_teacher - x0_fake).flatten(1)
    return (diff * _wide(x0_fake - x_g).flatten(1)).sum(1), diff.pow(2).sum(1)


def sid_loss(inner: torch.Tensor, sq: torch.Tensor, alpha: float | torch.Tensor) -> torch.Tensor:
    """SiD (5): ``(x0_p - x0_q).((x0_p - x_g) - alpha (x0_p - x0_q)) = inner + (1 - alpha) sq``, per sample.

    ``alpha = 1/2`` is the exact Fisher-divergence gradient (= Uni-Instruct RKL); ``alpha = 1`` holds the
    sampling distribution fixed (= SIM with the L2 distance); SiD's default 1.2 is neither."""
    return inner + (1 - alpha) * sq


SIM_DISTANCES = ("l2", "pseudo_huber")


def sim_loss(inner: torch.Tensor, sq: torch.Tensor, distance: str = "l2", huber_c: float = 1.0):
    """SIM (6): ``-u(Delta).(x0_q - x_g)`` with ``u = grad d`` kept *attached* (its gradient is half of it).

    Distances act on the x0 difference: ``l2`` is ``d = 1/2 ||Delta||^2``, so ``u = Delta`` and the loss is
    SiD(alpha=1) exactly; ``pseudo_huber`` is ``d = sqrt(||Delta||^2 + c^2) - c``, so
    ``u = Delta / sqrt(sq + c^2)``."""
    if distance == "l2":
        return sid_loss(inner, sq, 1.0)
    if distance == "pseudo_huber":
        return inner / torch.sqrt(sq + huber_c**2)
    raise ValueError(f"unknown SIM distance {distance!r}; use one of {SIM_DISTANCES}")


def alpha_eff(divergence: Divergence, r) -> torch.Tensor:
    """Per-sample effective SiD alpha of Uni-Instruct with ``r`` fixed (7.2): ``1/2 + r psi'/(2 psi)``."""
    return 0.5 + r * divergence.dh(r) / (2 * divergence.h(r))


UI_ESTIMATORS = ("exact", "official")
UI_RATIO_GRADS = ("detached", "attached")


def uni_instruct_terms(x_g, x0_teacher, x0_fake, ratio, divergence: Divergence, snr2, ratio_grad_weight=None,
                       ratio_grad_clip: float | None = None) -> dict[str, torch.Tensor]:
    """The four per-sample terms of the exact Uni-Instruct gradient with a detached ratio (7.2 decomposition).

    * ``sim``    = ``psi(r) inner``: psi-weighted SiD(alpha=1), i.e. Grad(SIM);
    * ``fgm``    = ``1/2 w1(r) sq``, ``w1 = psi - r psi'``: the gradient of ``||delta||^2`` through ``x_t``;
    * ``di_w1``  = ``sg(snr2 r^2 psi''/2 sq Delta).x_g``: the ``-r w1'(r)`` ratio-gradient term;
    * ``di_psi`` = ``sg(-snr2 r psi' inner Delta).x_g``: the ``2 r psi'(r) (delta.c)`` ratio-gradient term.

    The two DI-direction terms are option B's pseudo-gradient ``alpha_t g_DI`` on ``x_g``, from
    ``grad_x log r = -delta``; ``snr2 = alpha_t^2/sigma_t^2`` converts ``sq`` and ``Delta`` to score units.
    ``ratio_grad_weight`` multiplies both per sample (0 where a clamped ratio estimate has no gradient);
    ``ratio_grad_clip`` bounds each coefficient of ``Delta`` to ``+-clip``, i.e. each of these forces on
    ``x_g`` to ``clip`` times the SiD term's explicit force ``|d inner/d x_g| = |Delta|``."""
    inner, sq = score_identity_terms(x_g, x0_teacher, x0_fake)
    r, snr2 = _wide(ratio.detach()), _wide(snr2)
    if ratio_grad_weight is not None:
        snr2 = snr2 * ratio_grad_weight
    psi, dpsi, d2psi = divergence.h(r), divergence.dh(r), divergence.d2h(r)
    delta = _wide(x0_fake - x0_teacher).detach().flatten(1)
    x_flat = _wide(x_g).flatten(1)

    def along_delta(coef):  # sg(coef Delta) . x_g, per sample
        if ratio_grad_clip is not None:
            coef = coef.clamp(-ratio_grad_clip, ratio_grad_clip)
        return ((coef.detach()[:, None] * delta) * x_flat).sum(1)

    return {
        "sim": psi * inner,
        "fgm": 0.5 * (psi - r * dpsi) * sq,
        "di_w1": along_delta(0.5 * snr2 * r**2 * d2psi * sq),
        "di_psi": along_delta(-snr2 * r * dpsi * inner),
    }


def uni_instruct_loss(x_g, x0_teacher, x0_fake, ratio, divergence: Divergence, snr2, estimator: str = "exact",
                      ratio_grad: str = "detached", ratio_grad_weight=None, ratio_grad_clip=None):
    """Per-sample Uni-Instruct loss (7.2), halved so that ``RKL == SiD(alpha=1/2)`` at the same weight.

    * ``exact`` + ``detached`` (option B): the sum of the four :func:`uni_instruct_terms`;
    * ``exact`` + ``attached`` (option A): ``psi(r) inner + 1/2 w1(r) sq`` with ``ratio`` carrying gradient
      through the frozen discriminator's input;
    * ``official``: ``sim + di_w1`` as in the public code (no FGM term, no ``psi'`` term): biased (7.3).
    With ``r`` fixed the ``sim + fgm`` part is ``psi(r) * SiD(alpha_eff(r))`` (:func:`alpha_eff`)."""
    if estimator not in UI_ESTIMATORS or ratio_grad not in UI_RATIO_GRADS:
        raise ValueError(f"estimator must be one of {UI_ESTIMATORS} and ratio_grad one of {UI_RATIO_GRADS}")
    if estimator == "exact" and ratio_grad == "attached":
        inner, sq = score_identity_terms(x_g, x0_teacher, x0_fake)
        r = _wide(ratio)
        return divergence.h(r) * inner + 0.5 * (divergence.h(r) - r * divergence.dh(r)) * sq
    terms = uni_instruct_terms(x_g, x0_teacher, x0_fake, ratio, divergence, snr2, ratio_grad_weight,
                               ratio_grad_clip)
    if estimator == "official":
        return terms["sim"] + terms["di_w1"]
    return terms["sim"] + terms["fgm"] + terms["di_w1"] + terms["di_psi"]


def sida_logits(features: list[torch.Tensor]) -> torch.Tensor:
    """SiDA's discriminator without parameters (2.4): the channel mean of the fake score's (last) feature map,
    one logit per location, ``[B, H*W]`` (``[B, 1]`` for feature vectors)."""
    f = features[-1]
    return f.float().mean(1).reshape(len(f), -1)


def normalized_gan_generator_loss(logits, normalizer, dim: int, logit_clamp: float = 10.0) -> torch.Tensor:
    """UI/SiDA generator GAN term ``mean_i N_i D mean_loc softplus(-clamp(l_i))``: scaled like the SiD loss (a
    sum over the ``D`` elements times the per-sample normaliser ``N_i``), as in the official code (7.4)."""
    per_sample = F.softplus(-logits.float().clamp(-logit_clamp, logit_clamp)).flatten(1).mean(1)
    return finite_mean(per_sample * dim * normalizer)


def finite_mean(per_sample: torch.Tensor) -> torch.Tensor:
    """Mean over the samples whose loss is finite (SiD/UI mask NaN samples, pitfall 7)."""
    ok = torch.isfinite(per_sample)
    return torch.where(ok, per_sample, torch.zeros_like(per_sample)).sum() / ok.sum().clamp(min=1)


def divergence_from_weight(psi: Callable, name: str = "custom") -> Divergence:
    """A :class:`Divergence` from its weight ``psi(r) = r^2 f''(r)`` alone (all Uni-Instruct and f-distill
    need); ``psi'`` and ``psi''`` come from autograd, elementwise. ``f`` is left undefined."""

    def derivative(r, order):
        with torch.enable_grad():
            x = r.detach().clone().requires_grad_(True)
            y = psi(x)
            for _ in range(order):
                if not y.requires_grad:  # psi constant (or linear, for the second derivative)
                    return torch.zeros_like(r)
                y = torch.autograd.grad(y.sum(), x, create_graph=True)[0]
        return y.detach()

    def no_f(r):
        raise NotImplementedError(f"divergence {name!r} was given by its weight psi only")

    return Divergence(name, no_f, psi, lambda r: derivative(r, 1), lambda r: derivative(r, 2))


# ---------------------------------------------------------------------------------------------------
# Few-step students and NaN masking (2.2, pitfall 7), used by rCM.


def zero_nonfinite_samples(x: torch.Tensor) -> torch.Tensor:
    """``x`` with every sample (leading index) that holds a NaN or inf set to zero, as rCM, SiD and UI do."""
    finite = torch.isfinite(x.flatten(1)).all(1)
    return torch.where(per_sample(finite, x).bool(), x, torch.zeros_like(x))


def backward_simulation(student, z: torch.Tensor, cond=None, steps: int = 1, generator=None) -> torch.Tensor:
    """A ``steps``-step student sample (the "sde" sampler of 2.2) from unit noise ``z``, with gradient through
    the last step only: DMD2's and rCM's data-free backward simulation (9, student step 2)."""
    t_last = student.times[steps - 1]
    if steps == 1:
        return student.step(float(student.schedule.sigma(t_last)) * z, t_last, cond)
    with torch.no_grad():
        x0 = student.sample(z, cond, steps - 1, mode="sde", generator=generator)
    eps = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    x_t, _ = diffuse(student.schedule, x0, torch.full((len(x0),), t_last, dtype=torch.float64), eps)
    return student.step(x_t, t_last, cond)
