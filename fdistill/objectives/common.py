"""Loss terms that two or more objectives share (docs/objectives.md §0, §2.3, §2.4, §3.1, §4.2, §4.3, §5-§7).

What only one objective uses lives in that objective's file. Normalisers, weights and density ratios are
computed in float32 and detached; time coefficients in float64.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Callable, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from fdistill.containers import Batch, Networks
from fdistill.networks.denoisers import Denoiser, per_sample
from fdistill.networks.generator import time_at_noise_level
from fdistill.schedules import Schedule


def diffuse(schedule: Schedule, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor | None = None):
    """``x_t = alpha_t x0 + sigma_t eps`` with fresh ``eps`` unless given; returns ``(x_t, eps)``."""
    eps = torch.randn_like(x0) if eps is None else eps
    return schedule.diffuse(x0, t, eps), eps


def fake_score_weight(schedule: Schedule, t: torch.Tensor, weighting: str, sigma_data: float = 0.5):
    """Per-sample weight of the x0-space denoising loss (§2.3): ``none`` (FastGen), ``edm`` (SiD/UI/DI,
    ``1/c_out^2``) or ``dmd2`` (``alpha^2/sigma^2 + 1/sigma_d^2``)."""
    alpha, sigma = schedule.alpha(t), schedule.sigma(t)
    if weighting == "none":
        return torch.ones_like(alpha)
    if weighting == "edm":
        return (alpha**2 * sigma_data**2 + sigma**2) / (sigma * sigma_data) ** 2
    if weighting == "dmd2":
        return alpha**2 / sigma**2 + 1 / sigma_data**2
    raise ValueError(f"unknown fake-score weighting {weighting!r}; use none, edm or dmd2")


def denoising_loss(net: Denoiser, x0, t, cond=None, weighting: str = "none"):
    """Denoising score matching on (detached) samples, ``mean_i lambda(t_i) mean_elem (D(x_t) - x0)^2`` (§2.3),
    the fake score's loss. Returns ``(loss, eps, features)``: the noise drawn for ``x_t`` and the network's
    features, which a discriminator sharing the fake score reads."""
    x0 = x0.detach()
    x_t, eps = diffuse(net.schedule, x0, t)
    x0_hat, features = net.forward_with_features(x_t, t, cond)
    err = (x0_hat - x0).float().pow(2).flatten(1).mean(1)
    return (fake_score_weight(net.schedule, t, weighting).float().to(err.device) * err).mean(), eps, features


# ---------------------------------------------------------------------------------------------------
# The student's samples: one step, or DMD2's backward simulation for a few-step student (§3.1).

BACKWARD_SIMULATION_TIMES = ("fixed", "random")
BACKWARD_SIMULATION_STEPS = ("every", "last")


@dataclass
class BackwardSimulationOptions:
    """Backward simulation of a student with ``K > 1`` sampling times (§3.1).

    ``backward_simulation_times``: ``fixed`` (default) the student's own times, exactly those its sampler uses;
    ``random`` keeps ``t_0`` and draws each later time in its stratum ``(t_{i+1}, t_i]`` every call, which trains
    the student between its sampling times too.

    ``backward_simulation_steps``: ``every`` (default) simulates ``k`` steps with ``k`` over ``1..K`` (DMD2's
    uniform draw, rCM's cycle), so the fake score tracks the mixture of the student's 1- to K-step laws; ``last``
    always simulates all ``K``, so it tracks the K-step sampler's own law and the loss is that sampler's."""

    backward_simulation_times: str = "fixed"
    backward_simulation_steps: str = "every"


def check_choice(options, key: str, choices, optional: bool = False) -> None:
    """A one-line ``ValueError`` when ``objective.<key>`` is not one of ``choices`` (or null, if ``optional``)."""
    value = getattr(options, key)
    if value not in choices and not (optional and value is None):
        raise ValueError(f"objective.{key}={value!r} is unknown; use one of {', '.join(choices)}")


def check_backward_simulation_options(options: BackwardSimulationOptions) -> None:
    """A one-line ``ValueError`` for an unknown ``backward_simulation_times`` or ``backward_simulation_steps``."""
    if options.backward_simulation_times not in BACKWARD_SIMULATION_TIMES:
        raise ValueError(f"objective.backward_simulation_times must be fixed or random, "
                         f"not {options.backward_simulation_times!r}")
    if options.backward_simulation_steps not in BACKWARD_SIMULATION_STEPS:
        raise ValueError(f"objective.backward_simulation_steps must be every or last, "
                         f"not {options.backward_simulation_steps!r}")


def simulation_steps(options: BackwardSimulationOptions, max_steps: int, drawn: int) -> int:
    """The step count of a backward simulation: all ``max_steps`` with ``backward_simulation_steps: last``, else
    ``drawn``, the objective's own draw over ``1..K`` (DMD2's uniform one, rCM's cycle)."""
    return max_steps if options.backward_simulation_steps == "last" else drawn


def uniform_simulation_steps(step: int, max_steps: int) -> int:
    """DMD2's number of student steps ``k`` for training step ``step``: uniform on ``1..K``, one draw per step.
    The draw is a hash of ``step`` alone, so every micro-batch and process of a step simulates the same ``k``
    (DMD2 broadcasts its draw to all GPUs, so none waits for a longer simulation), resuming repeats it, and
    torch's RNG is left untouched (a one-time student draws exactly what it drew without backward simulation)."""
    digest = hashlib.blake2b(f"backward_simulation/{step}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % max_steps + 1


def cyclic_simulation_steps(count: int, max_steps: int) -> int:
    """rCM's number of student steps ``k = (count mod K) + 1`` for its ``count``-th update of a kind."""
    return count % max_steps + 1


def backward_simulation_samples(batch: Batch, nets: Networks, steps: int, times: str = "fixed") -> torch.Tensor:
    """``x_g`` from fresh unit noise: the student's ``steps``-step sample with gradient through the last step only
    (a plain one-step sample for ``steps = 1``), at its ``fixed`` or ``random`` times (§3.1)."""
    student = nets.student
    z = student.noise(batch.size, device=nets.device)
    return student.backward_simulation(z, batch.cond, steps, random_times=times == "random")


def student_samples(batch: Batch, nets: Networks, step: int, options: BackwardSimulationOptions) -> torch.Tensor:
    """``x_g`` of training step ``step`` in the score-distillation objectives, critic and generator steps alike:
    a backward simulation of ``k = uniform_simulation_steps(step, K)`` steps (DMD2, §3.1), or of all ``K`` with
    ``backward_simulation_steps: last``."""
    max_steps = nets.student.max_steps
    steps = simulation_steps(options, max_steps, uniform_simulation_steps(step, max_steps))
    return backward_simulation_samples(batch, nets, steps, options.backward_simulation_times)


@dataclass
class DiscriminatorFeatureOptions:
    """Which of a UNet teacher's blocks the discriminator heads read (§2.4): ``down.i``, ``mid`` or ``up.i``, one
    head each; ``None`` keeps the teacher's default blocks. Analytic teachers have one fixed feature vector."""

    discriminator_features: Optional[List[str]] = None


def gan_generator_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """Non-saturating generator loss ``mean softplus(-l_fake)``."""
    return F.softplus(-logits_fake.float()).mean()


def gan_discriminator_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """``mean softplus(l_fake) + mean softplus(-l_real)``: real (teacher/data) is the positive class, so the
    optimal logit is ``log p_t / q_t`` (§2.4)."""
    return F.softplus(logits_fake.float()).mean() + F.softplus(-logits_real.float()).mean()


def discriminator_accuracy(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> dict[str, torch.Tensor]:
    """How often the discriminator is right, on real and on generated inputs (0.5 each: it sits at chance)."""
    return {"disc_acc_real": (logits_real.detach() > 0).float().mean(),
            "disc_acc_fake": (logits_fake.detach() < 0).float().mean()}


def add_gan_term(loss: torch.Tensor, logs: dict, gan_loss: torch.Tensor, weight: float):
    """The generator step's GAN tail: ``loss + weight * gan_loss``, with the GAN term logged as ``gan``."""
    return loss + weight * gan_loss, {**logs, "gan": gan_loss.detach()}


# ---------------------------------------------------------------------------------------------------
# f-divergences, r = p/q (teacher over student), D_f(p||q) = E_q[f(r)], h(r) = r^2 f''(r) (§4.2).


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


@dataclass
class RatioOptions:
    """How a discriminator logit ``l`` becomes the density ratio ``r = p_t/q_t`` (§4.3):
    ``r = clamp(exp(clamp(mean_heads l, +-ratio_logit_clamp)), ratio_lower, ratio_upper)``, then, with
    ``normalize_ratio``, divided by its running mean in ``ratio_bins`` time bins (EMA rate ``ratio_ema_rate``)."""

    ratio_logit_clamp: float = 10.0
    ratio_lower: float = 0.1
    ratio_upper: float = 20.0
    ratio_bins: int = 10
    ratio_ema_rate: float = 0.0
    normalize_ratio: bool = True


def density_ratio(logits: torch.Tensor, options: RatioOptions, keep_grad: bool = False):
    """``(r, in_range)`` per sample, float32 (§4.3 step 2). ``r`` is detached unless ``keep_grad``;
    ``in_range`` (detached) is 1 where no clamp is active, i.e. where the estimate has a gradient at all."""
    o = options
    logits = logits.float() if keep_grad else logits.detach().float()
    logits = logits.mean(1) if logits.dim() > 1 else logits
    r = torch.exp(logits.clamp(-o.ratio_logit_clamp, o.ratio_logit_clamp))
    in_range = (r > o.ratio_lower) & (r < o.ratio_upper) & (logits.abs() < o.ratio_logit_clamp)
    return r.clamp(o.ratio_lower, o.ratio_upper), in_range.float()


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum over processes when running distributed (a no-op in one process)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        x = x.clone()
        torch.distributed.all_reduce(x)
    return x


class RatioBinNormalizer(nn.Module):
    """Per-time-bin EMA normalisation of density ratios (FastGen; §4.3 step 3).

    ``bins_b <- rho bins_b + (1 - rho) mean(r | t in bin b)`` for the bins present in the batch, then
    ``r_i <- r_i / (bins_{b_i} + 1e-6)`` with the updated bins. The bins are a persistent buffer and only ever
    see detached ratios; a ratio that carries gradient keeps it, divided by its (constant) bin mean.
    """

    def __init__(self, t_min: float, t_max: float, num_bins: int = 10, ema_rate: float = 0.0):
        super().__init__()
        self.t_min, self.t_max, self.ema_rate = t_min, t_max, ema_rate
        self.register_buffer("bins", torch.ones(num_bins))

    @classmethod
    def for_options(cls, options: RatioOptions, schedule: Schedule) -> RatioBinNormalizer:
        return cls(schedule.t_min, schedule.t_max, options.ratio_bins, options.ratio_ema_rate)

    def bin_index(self, t: torch.Tensor) -> torch.Tensor:
        width = (self.t_max - self.t_min) / len(self.bins)
        return ((t.double() - self.t_min) / width).floor().clamp(0, len(self.bins) - 1).long()

    def forward(self, ratio: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if ratio.requires_grad:
            detached = ratio.detach()
            return ratio * (self(detached, t) / detached)
        idx = self.bin_index(t).to(ratio.device)
        count = torch.zeros_like(self.bins).index_add_(0, idx, torch.ones_like(ratio))
        total = torch.zeros_like(self.bins).index_add_(0, idx, ratio.float())
        count, total = all_reduce_sum(count), all_reduce_sum(total)
        present = count > 0
        mean = total / (count + 1e-6)
        updated = self.ema_rate * self.bins + (1 - self.ema_rate) * mean
        self.bins.copy_(torch.where(present, updated, self.bins))
        return ratio / (self.bins[idx] + 1e-6)


# ---------------------------------------------------------------------------------------------------
# Score-identity family: SiD, SIM and Uni-Instruct (§5, §6, §7), in x0 units, per sample, summed over elements,
# with Delta = x0_q - x0_p:  inner = (x0_p - x0_q).(x0_q - x_g)  and  sq = ||x0_p - x0_q||^2.
# In score units delta = s_q - s_p = (alpha/sigma^2) Delta and c = s_q + eps/sigma = (alpha/sigma^2)
# (x0_q - x_g), so -2 delta.c = (2 alpha^2/sigma^4) inner and ||delta||^2 = (alpha^2/sigma^4) sq: a weight
# 2 lambda(t) alpha^2/sigma^4 turns each loss below into its exact score-unit surrogate. Training uses the
# normaliser loss_scale * sid_normalizer instead (§7.2, "in practice").


def at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """float32, or float64 when given float64 (the closed-form tests run in float64)."""
    return x if x.dtype == torch.float64 else x.float()


def student_input_times(schedule: Schedule, times: list[float], init_sigma: float | None) -> list[float]:
    """One-step input time of SiD-type students (§2.2): the generic default ``[t_max]`` becomes the time
    whose SNR matches EDM ``sigma = init_sigma`` (2.5 SiD/SIM/UI, 1.0 Diff-Instruct), rounded to a timestep on a
    discrete schedule; explicit times stay."""
    if init_sigma is None or list(times) != [schedule.t_max]:
        return list(times)
    return [time_at_noise_level(schedule, init_sigma)]


def score_identity_terms(x_g, x0_teacher, x0_fake) -> tuple[torch.Tensor, torch.Tensor]:
    """``(inner, sq)`` per sample (at least float32), with gradient through the frozen networks' inputs."""
    diff = at_least_float32(x0_teacher - x0_fake).flatten(1)
    return (diff * at_least_float32(x0_fake - x_g).flatten(1)).sum(1), diff.pow(2).sum(1)


def sid_loss(inner: torch.Tensor, sq: torch.Tensor, alpha: float | torch.Tensor) -> torch.Tensor:
    """SiD (5): ``(x0_p - x0_q).((x0_p - x_g) - alpha (x0_p - x0_q)) = inner + (1 - alpha) sq``, per sample.

    ``alpha = 1/2`` is the exact Fisher-divergence gradient (= Uni-Instruct RKL); ``alpha = 1`` holds the
    sampling distribution fixed (= SIM with the L2 distance); SiD's default 1.2 is neither."""
    return inner + (1 - alpha) * sq


def finite_mean(per_sample: torch.Tensor) -> torch.Tensor:
    """Mean over the samples whose loss is finite (SiD/UI mask NaN samples, §12 item 7)."""
    ok = torch.isfinite(per_sample)
    return torch.where(ok, per_sample, torch.zeros_like(per_sample)).sum() / ok.sum().clamp(min=1)


# ---------------------------------------------------------------------------------------------------
# NaN masking (§12 item 7), used by sCM and rCM.


def zero_nonfinite_samples(x: torch.Tensor) -> torch.Tensor:
    """``x`` with every sample (leading index) that holds a NaN or inf set to zero, as rCM, SiD and UI do."""
    finite = torch.isfinite(x.flatten(1)).all(1)
    return torch.where(per_sample(finite, x).bool(), x, torch.zeros_like(x))


