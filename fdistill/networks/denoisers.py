"""Denoisers: every network in a distillation run predicts x0 from ``(x_t, t, cond)``.

``Denoiser.forward`` returns the x0-prediction; ``forward_with_features`` also returns the intermediate
features that discriminator heads read (docs/objectives.md §2.4). Adapters:

* :class:`UNetDenoiser` for diffusers ``UNet2DModel`` / ``UNet2DConditionModel`` (epsilon, v_prediction or
  sample), with features taken from chosen blocks (``down.i``, ``mid``, ``up.i``) by forward hooks;
* the diffusion transformers of :mod:`fdistill.pipelines.transformers` (SD3, Flux, PixArt), built on
  :class:`DiffusersDenoiser` as the UNet adapter is;
* :class:`GaussianMixtureDenoiser`, the exact posterior mean ``E[x0 | x_t]`` of a diagonal Gaussian mixture
  under any schedule: an analytic teacher with exact scores, log-densities and samples;
* :class:`MLPDenoiser`, a small EDM-preconditioned MLP for low-dimensional data (toy student / fake score).
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from fdistill.samplers.lcm import LCMSampling
from fdistill.schedules import DiscreteVPSchedule, Schedule, broadcast_to, to_x0

DIFFUSERS_PREDICTION = {"epsilon": "eps", "v_prediction": "v", "sample": "x0", "flow_prediction": "velocity"}
# The UNet blocks whose outputs a teacher-feature discriminator reads unless told otherwise (docs/objectives.md §2.4)
DEFAULT_FEATURE_BLOCKS = ("mid",)


def unet_blocks(unet: nn.Module) -> dict[str, nn.Module]:
    """A diffusers UNet's blocks by name: ``down.0 .. down.{n-1}``, ``mid``, ``up.0 .. up.{n-1}`` (in call order)."""
    return {**{f"down.{i}": b for i, b in enumerate(unet.down_blocks)}, "mid": unet.mid_block,
            **{f"up.{i}": b for i, b in enumerate(unet.up_blocks)}}


class Denoiser(nn.Module):
    """x0-prediction ``D(x_t, t, cond)`` under ``self.schedule``; ``t`` is a ``[B]`` tensor of schedule times.

    ``prediction_type`` is what the network itself outputs, in diffusers' names (``sample`` is x0);
    ``num_class_embeds`` the class embeddings of a class-conditional network (``None`` otherwise);
    ``conditional`` whether it takes a condition at all, and so whether it can be guided (§2.5).
    """

    schedule: Schedule
    sample_shape: tuple[int, ...]
    prediction_type = "sample"
    num_class_embeds: int | None = None
    conditional = False
    adapter: str | None = None  # the LoRA adapter of a shared base this network runs with (None: a full network)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond=None) -> torch.Tensor:
        return self.forward_with_features(x_t, t, cond)[0]

    def forward_with_features(self, x_t, t, cond=None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        raise NotImplementedError

    def features(self, x_t, t, cond=None) -> list[torch.Tensor]:
        """The features of :meth:`forward_with_features` alone (networks with blocks stop the pass at the last
        feature block when no gradient is recorded)."""
        return self.forward_with_features(x_t, t, cond)[1]

    def noise_level_features(self, t: torch.Tensor) -> torch.Tensor:
        """``c_noise = log(sigma/alpha)/4`` per sample (EDM's noise conditioning, any schedule), float32."""
        return (torch.log(self.schedule.sigma(t) / self.schedule.alpha(t)) / 4).float()

    def stock_sampling(self):
        """The diffusers scheduler arithmetic a student of this network samples with (:mod:`fdistill.samplers.lcm`),
        or ``None`` when it samples with fdistill's own (:class:`fdistill.networks.generator.Generator`)."""
        return None

    def served_as(self, times: list[float]) -> tuple[Denoiser, list[float]]:
        """The network and sampling times that sample like this one at ``times`` and that a stock diffusers
        scheduler can drive when any can: the network itself, unless it wraps one in another time variable."""
        return self, list(times)

    def read_features(self, blocks: list[str]) -> None:
        """Make :meth:`forward_with_features` return the outputs of these named blocks (networks with blocks)."""
        raise ValueError(f"{type(self).__name__} has one fixed feature vector and no blocks to choose; "
                         "remove objective.discriminator_features")

    def null_condition(self, cond):
        """The unconditional input of classifier-free guidance for a batch of conditions ``cond``."""
        raise ValueError(f"{type(self).__name__} takes no condition, so it has no unconditional input to guide with")


def x0_from_network_output(out: torch.Tensor, prediction_type: str, x_t: torch.Tensor, schedule: Schedule,
                           t: torch.Tensor) -> torch.Tensor:
    """Read a diffusers model's output (``prediction_type`` in diffusers' names) at per-sample times ``t`` as x0,
    in float64, cast to ``x_t``'s dtype."""
    alpha, sigma = schedule.coefficients(t, x_t)
    return to_x0(out, DIFFUSERS_PREDICTION[prediction_type], x_t, alpha, sigma).to(x_t.dtype)


class _FeaturesReady(Exception):
    """Raised by the last feature block's hook to end a features-only pass."""


class DiffusersDenoiser(Denoiser):
    """A diffusers model (``network``) read as an x0-denoiser: its raw output (:meth:`network_output`, of
    ``prediction_type``) converted to x0, and the outputs of named blocks (:meth:`blocks`) kept by forward hooks as
    the features of :meth:`forward_with_features`."""

    block_kind = "model"  # how errors name the blocks
    _features: dict[str, torch.Tensor] | None = None  # a dict only while forward_with_features runs
    _stop_at_features = False  # whether the pass ends once every feature block has run (features)

    @property
    def network(self) -> nn.Module:
        """The diffusers model inside (what LoRA adapts and the export saves)."""
        raise NotImplementedError

    def network_output(self, x_t, t, cond=None) -> torch.Tensor:
        raise NotImplementedError

    def blocks(self) -> dict[str, nn.Module]:
        """The model's blocks whose outputs can be features, by name, in call order."""
        raise NotImplementedError

    def pipeline_call_arguments(self) -> dict:
        """Keyword arguments of the stock pipeline's call that make it feed this network what this denoiser does,
        beyond prompt, size, steps and the pipeline class's own fixed arguments (Flux's embedded guidance)."""
        return {}

    def feature_of(self, output) -> torch.Tensor:
        """A block's output as a feature tensor."""
        return output[0] if isinstance(output, tuple) else output

    def read_features(self, blocks: list[str] | tuple[str, ...]) -> None:
        """Return the outputs of ``blocks`` as the features of :meth:`forward_with_features`, in the order given."""
        known = self.blocks()
        unknown = [name for name in blocks if name not in known]
        if unknown:
            raise ValueError(f"unknown {self.block_kind} block {unknown[0]!r}; this {self.block_kind} has "
                             f"{', '.join(known)}")
        if not blocks:
            raise ValueError(f"give at least one {self.block_kind} block to read features from, e.g. "
                             f"[{next(iter(known))}]")
        # A deep-copied model carries its source denoiser's hooks, which would feed that denoiser's features.
        for module in known.values():
            module._forward_hooks.clear()
        for name in blocks:
            known[name].register_forward_hook(self._capture_as(name))
        self.feature_blocks = list(blocks)

    def _capture_as(self, name: str):
        """The forward hook that keeps a block's output as feature ``name`` (a closure: deep copies of the model
        share it rather than copying this denoiser)."""
        def capture(_module, _inputs, output):
            if self._features is not None:
                self._features[name] = self.feature_of(output)
                if self._stop_at_features and len(self._features) == len(self.feature_blocks):
                    raise _FeaturesReady
        return capture

    def features(self, x_t, t, cond=None) -> list[torch.Tensor]:
        """The feature blocks' outputs; without gradient recording, the pass ends at the last of them (a
        discriminator reading a UNet's ``mid`` block skips its whole up path)."""
        if torch.is_grad_enabled():
            return super().features(x_t, t, cond)
        t = torch.as_tensor(t, device=x_t.device).reshape(-1).expand(x_t.shape[0])
        self._features, self._stop_at_features = {}, True
        try:
            self.network_output(x_t, t, cond)
        except _FeaturesReady:
            pass
        finally:
            features, self._features, self._stop_at_features = self._features, None, False
        return [features[name] for name in self.feature_blocks]

    def keep_weights_in(self, dtype: torch.dtype) -> None:
        """Cast the frozen model's weights to ``dtype`` and, on every call, its floating inputs of two or more
        dimensions (latents, embeddings) too; times and other per-sample scalars keep their precision, so that a
        timestep such as 999 is not rounded to bfloat16's 1000."""
        if dtype == torch.float32:
            return
        model = self.network
        nn.Module.to(model, dtype)  # diffusers' own `to` warns on every cast; its fp32 modules are restored below
        for name in getattr(model, "_keep_in_fp32_modules", None) or []:
            for module_name, module in model.named_modules():
                if name in module_name.split("."):
                    module.float()

        def cast(value):
            if isinstance(value, dict):
                return {k: cast(v) for k, v in value.items()}
            if isinstance(value, (tuple, list)):
                return type(value)(cast(v) for v in value)
            if torch.is_tensor(value) and value.is_floating_point() and value.dim() >= 2:
                return value.to(dtype)
            return value

        model.register_forward_pre_hook(lambda _module, args, kwargs: (cast(args), cast(kwargs)), with_kwargs=True)

    def forward_with_features(self, x_t, t, cond=None):
        t = torch.as_tensor(t, device=x_t.device).reshape(-1).expand(x_t.shape[0])
        self._features = {}
        try:
            out = self.network_output(x_t, t, cond)
            features = [self._features[name] for name in self.feature_blocks]
        finally:
            self._features = None
        return x0_from_network_output(out, self.prediction_type, x_t, self.schedule, t), features


class UNetDenoiser(DiffusersDenoiser):
    """A diffusers UNet read as an x0-denoiser; the schedule is the UNet's own (usually discrete VP).

    ``cond`` is ``class_labels`` for a class-conditional ``UNet2DModel`` and ``encoder_hidden_states`` for a
    ``UNet2DConditionModel``. ``prediction_type`` is the diffusers name (epsilon, v_prediction, sample).
    """

    block_kind = "UNet"

    def __init__(self, unet: nn.Module, schedule: Schedule, prediction_type: str = "epsilon"):
        super().__init__()
        if prediction_type not in DIFFUSERS_PREDICTION:
            raise ValueError(
                f"unsupported prediction_type {prediction_type!r}; use one of {sorted(DIFFUSERS_PREDICTION)}"
            )
        self.unet, self.schedule, self.prediction_type = unet, schedule, prediction_type
        cfg = unet.config
        self.sample_shape = (cfg.in_channels, cfg.sample_size, cfg.sample_size)
        self.text_conditioned = getattr(cfg, "cross_attention_dim", None) is not None
        self.num_class_embeds = getattr(cfg, "num_class_embeds", None)
        self.conditional = self.text_conditioned or self.num_class_embeds is not None
        self.read_features(DEFAULT_FEATURE_BLOCKS)

    @classmethod
    def from_pipeline(cls, unet: nn.Module, scheduler_config: dict, vae_scale: int, prediction_type: str | None = None,
                      resolution: int | None = None, embedded_guidance: float | None = None,
                      num_frames: int | None = None, frame_scale: int = 1) -> UNetDenoiser:
        """The adapter of a UNet loaded with its pipeline's scheduler config: the scheduler's noise table as a
        :class:`DiscreteVPSchedule` and its ``prediction_type`` unless ``prediction_type`` overrides it. A UNet
        samples images at its configured size, and has no embedded guidance."""
        from diffusers import DDPMScheduler

        for key, value in (("resolution", resolution), ("embedded_guidance", embedded_guidance),
                           ("num_frames", num_frames)):
            if value is not None:
                raise ValueError(f"teacher.{key} is not read by a {type(unet).__name__} teacher; remove it")
        scheduler = DDPMScheduler.from_config(scheduler_config)
        return cls(unet, DiscreteVPSchedule.from_diffusers(scheduler),
                   prediction_type or scheduler.config.prediction_type)

    def blocks(self) -> dict[str, nn.Module]:
        """``down.i``, ``mid``, ``up.i`` (a down block's output is taken after downsampling)."""
        return unet_blocks(self.unet)

    @property
    def network(self) -> nn.Module:
        return self.unet

    def copy_network(self) -> UNetDenoiser:
        """A denoiser around a deep copy of the UNet (its own weights and feature hooks): a student's or fake
        score's starting point."""
        return UNetDenoiser(copy.deepcopy(self.unet), self.schedule, self.prediction_type)

    def network_output(self, x_t, t, cond=None) -> torch.Tensor:
        """The UNet's raw output (epsilon, v or x0, as ``prediction_type`` says) at times ``t``."""
        timestep = t.to(x_t.dtype)
        if self.text_conditioned:
            return self.unet(x_t, timestep, encoder_hidden_states=cond).sample
        return self.unet(x_t, timestep, class_labels=cond).sample

    def stock_sampling(self):
        if getattr(self.schedule, "scheduler_config", None) is None:
            return None
        return LCMSampling(self.schedule, self.prediction_type)

    def null_condition(self, cond: torch.Tensor) -> torch.Tensor:
        """The last class index of a class-conditional UNet: the label its training dropped classes to. A text
        UNet's unconditional input is an (empty or negative) prompt's embedding, which the guidance wrapper is
        given by whoever embeds the prompts."""
        if self.num_class_embeds is None:
            return super().null_condition(cond)
        return torch.full_like(cond, self.num_class_embeds - 1)


class GaussianMixtureDenoiser(Denoiser):
    """Exact ``E[x0 | x_t]`` of ``sum_k w_k N(mu_k, diag(var_k))`` diffused by ``schedule`` (float64 inside).

    Component ``k`` diffuses to ``N(alpha mu_k, alpha^2 var_k + sigma^2)``; its posterior mean is
    ``mu_k + alpha var_k / (alpha^2 var_k + sigma^2) (x_t - alpha mu_k)``, mixed by the responsibilities.
    Gradients flow through ``x_t``, so it can stand in for a frozen teacher in every objective.
    """

    def __init__(self, weights, means, variances, schedule: Schedule):
        super().__init__()
        w = torch.as_tensor(weights, dtype=torch.float64)
        self.register_buffer("weights", w / w.sum())
        self.register_buffer("means", torch.as_tensor(means, dtype=torch.float64))
        var = torch.as_tensor(variances, dtype=torch.float64)
        self.register_buffer("variances", var.expand_as(self.means).clone())
        self.schedule = schedule
        self.sample_shape = (self.means.shape[1],)

    @property
    def num_modes(self) -> int:
        return len(self.weights)

    def _component_terms(self, x_t, t):
        alpha, sigma = self.schedule.coefficients(t, x_t)  # [B, 1]
        x = x_t.double()[:, None, :]  # [B, 1, D]
        a, s2 = alpha[:, :, None], (sigma**2)[:, :, None]
        var_t = a**2 * self.variances + s2  # [B, K, D]
        diff = x - a * self.means
        log_comp = torch.log(self.weights) - 0.5 * ((diff**2 / var_t) + torch.log(2 * math.pi * var_t)).sum(-1)
        return a, var_t, diff, log_comp  # log_comp: [B, K]

    def log_prob(self, x_t, t) -> torch.Tensor:
        """``log p_t(x_t)`` in float64."""
        return torch.logsumexp(self._component_terms(x_t, t)[3], dim=1)

    def score(self, x_t, t) -> torch.Tensor:
        """``grad_x log p_t(x_t)`` in float64."""
        _, var_t, diff, log_comp = self._component_terms(x_t, t)
        resp = torch.softmax(log_comp, dim=1)[:, :, None]
        return (resp * (-diff / var_t)).sum(1)

    def forward_with_features(self, x_t, t, cond=None):
        a, var_t, diff, log_comp = self._component_terms(x_t, t)
        resp = torch.softmax(log_comp, dim=1)[:, :, None]
        post_mean = self.means + a * self.variances / var_t * diff
        x0 = (resp * post_mean).sum(1).to(x_t.dtype)
        return x0, [torch.cat([x_t, self.noise_level_features(t)[:, None].to(x_t)], dim=1)]

    def sample(self, n: int, generator=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact samples and their mode indices."""
        modes = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        eps = torch.randn(n, self.means.shape[1], generator=generator, dtype=torch.float64)
        x = self.means[modes] + self.variances[modes].sqrt() * eps
        return x.float(), modes


def gaussian_mixture(means, stds, weights=None) -> dict:
    """Parameters of ``sum_k w_k N(mu_k, diag(s_k^2))`` for :class:`GaussianMixtureDenoiser`: ``means`` is
    K x D; ``stds`` one number, K numbers (one per mode) or K x D (one per mode and coordinate); ``weights`` K
    numbers (default equal; the denoiser normalises them)."""
    means = torch.as_tensor(means, dtype=torch.float64)
    stds = torch.as_tensor(stds, dtype=torch.float64)
    num_modes = len(means)
    weights = (torch.full((num_modes,), 1.0 / num_modes, dtype=torch.float64) if weights is None
               else torch.as_tensor(weights, dtype=torch.float64))
    if weights.shape != (num_modes,):
        raise ValueError(f"the mixture has {num_modes} modes but {weights.numel()} weights were given")
    per_mode = stds[:, None] if stds.dim() == 1 else stds
    try:
        variances = (per_mode**2).expand_as(means).clone()
    except RuntimeError:
        raise ValueError(f"stds of shape {tuple(stds.shape)} do not fit {num_modes} means of {means.shape[1]} "
                         "coordinates; give one number, one per mode or one per mode and coordinate") from None
    return {"weights": weights, "means": means, "variances": variances}


def ring_mixture(num_modes=8, radius=2.0, std=0.1, weights=None) -> dict:
    """Parameters of a 2-D ring of Gaussians (angles ``2 pi k / K``), for :class:`GaussianMixtureDenoiser`."""
    angles = torch.arange(num_modes, dtype=torch.float64) * 2 * math.pi / num_modes
    means = radius * torch.stack([torch.cos(angles), torch.sin(angles)], dim=1)
    return gaussian_mixture(means, std, weights)


class MLPDenoiser(Denoiser):
    """EDM-preconditioned MLP (Karras et al. 2022, eq. 7, written for any ``alpha, sigma``).

    ``D(x) = c_skip x + c_out F([c_in x, c_noise])`` with ``c_in = 1/sqrt(alpha^2 s_d^2 + sigma^2)``,
    ``c_skip = alpha s_d^2 c_in^2``, ``c_out = sigma s_d c_in`` and ``c_noise = log(sigma/alpha)/4``:
    unit-variance input and target at every noise level.
    """

    def __init__(self, dim: int, schedule: Schedule, hidden: int = 128, depth: int = 3, sigma_data: float = 1.0):
        super().__init__()
        self.schedule, self.sigma_data, self.sample_shape = schedule, sigma_data, (dim,)
        layers, width = [], dim + 1
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.SiLU()]
            width = hidden
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(hidden, dim)

    def forward_with_features(self, x_t, t, cond=None):
        t = torch.as_tensor(t, device=x_t.device).reshape(-1).expand(x_t.shape[0])
        alpha, sigma = self.schedule.coefficients(t, x_t)
        sd = self.sigma_data
        c_in = 1 / torch.sqrt(alpha**2 * sd**2 + sigma**2)
        c_skip, c_out = alpha * sd**2 * c_in**2, sigma * sd * c_in
        h = self.body(torch.cat([(c_in * x_t).to(x_t.dtype), self.noise_level_features(t)[:, None].to(x_t)], 1))
        x0 = c_skip * x_t.double() + c_out * self.head(h).double()
        return x0.to(x_t.dtype), [h]


def freeze(module: nn.Module) -> nn.Module:
    """Frozen network: eval mode, no parameter gradients (gradients may still flow through its input)."""
    module.eval()
    module.requires_grad_(False)
    return module


def per_sample(coef: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Shorthand used by objectives: a ``[B]`` coefficient broadcast against ``like``."""
    return broadcast_to(coef, like).to(like.dtype)
