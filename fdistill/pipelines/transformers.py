"""Diffusion transformers from diffusers read as x0-denoisers, one adapter per transformer class.

Each adapter feeds its transformer exactly what the class's stock pipeline feeds it, so that a student trained here
is served by that pipeline unchanged, and reads the output as x0 through the schedule:

* :class:`SD3TransformerDenoiser` (``SD3Transformer2DModel``, ``StableDiffusion3Pipeline``),
  :class:`FluxTransformerDenoiser` (``FluxTransformer2DModel``, ``FluxPipeline``) and
  :class:`SanaTransformerDenoiser` (``SanaTransformer2DModel``, ``SanaPipeline``): rectified flow on a
  :class:`~fdistill.schedules.FlowMatchSchedule`; the velocity ``v = eps - x0`` gives ``x0 = x_t - sigma v``;
* :class:`PixArtTransformerDenoiser` (``PixArtTransformer2DModel``, ``PixArtAlphaPipeline`` and
  ``PixArtSigmaPipeline``): a discrete VP schedule and an epsilon (or v) prediction, of which a learned-variance
  model's second half of channels is dropped, as the pipeline does;
* :class:`DiTTransformerDenoiser` (``DiTTransformer2DModel``, ``DiTPipeline``): the class-conditional transformer
  on a discrete VP schedule, likewise.

A text condition travels through fdistill as one tensor per prompt (:func:`pack_text_condition`): the text
encoder's hidden states with one more row, the pooled embedding (SD3, Flux) or the attention mask (PixArt, Sana).
Features for discriminator heads are the image tokens after chosen transformer blocks, laid back on their token
grid (``[B, C, H / p, W / p]``) so that the convolutional heads read them. Latents are always ``[B, C, H, W]``;
Flux packs them into 2 x 2 patches inside :meth:`FluxTransformerDenoiser.network_output`, as its pipeline does.

Which adapter serves which pipeline class, how that pipeline encodes prompts and how it is called is the
pipeline's spec (:mod:`fdistill.pipelines.specs`): a new transformer class is one adapter here and one spec there.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from fdistill.networks.denoisers import DiffusersDenoiser
from fdistill.samplers.flow import FlowMatchSampling
from fdistill.samplers.lcm import LCMSampling
from fdistill.schedules import DiscreteVPSchedule, FlowMatchSchedule, Schedule

FLUX_DEFAULT_GUIDANCE = 3.5  # FluxPipeline's default guidance_scale, the embedded guidance of guidance-distilled Flux
PIPELINE_DEFAULT_LATENT_SIZE = 128  # FluxPipeline's default_sample_size: latents of 1024-pixel images


def pack_text_condition(hidden: torch.Tensor, row: torch.Tensor) -> torch.Tensor:
    """One tensor ``[N, L + 1, D]`` for a prompt's hidden states ``[N, L, D]`` and one more vector per prompt
    ``[N, P]`` (``P <= D``: a pooled embedding, or the attention mask of the ``L`` tokens), zero-padded into the
    last row. Every layer passes a text condition around as one tensor (indexed by sample, moved, split into
    micro-batches); :func:`unpack_text_condition` undoes it."""
    if row.shape[-1] > hidden.shape[-1]:
        raise ValueError(f"a vector of {row.shape[-1]} numbers does not fit a row of {hidden.shape[-1]}; the text "
                         "encoder's width must be at least the pooled width (or the prompt length)")
    padded = torch.nn.functional.pad(row.to(hidden), (0, hidden.shape[-1] - row.shape[-1]))
    return torch.cat([hidden, padded[:, None]], dim=1)


def unpack_text_condition(cond: torch.Tensor, row_width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(hidden [N, L, D], row [N, row_width])`` of :func:`pack_text_condition`'s tensor."""
    return cond[:, :-1], cond[:, -1, :row_width]


class TransformerDenoiser(DiffusersDenoiser):
    """A diffusers diffusion transformer (text-to-image, or class-conditional: DiT; text-to-video in
    :mod:`fdistill.pipelines.video`) read as an x0-denoiser on latents of ``sample_shape``.

    ``options`` are the adapter's own settings, passed on to copies (:meth:`copy_network`). Subclasses give
    :meth:`network_output`, :meth:`stock_sampling` and, where they differ from a plain patch-embedding
    transformer's, :meth:`token_patch`, :meth:`default_latent_size` and :meth:`blocks`.
    """

    text_conditioned = True
    conditional = True
    block_kind = "transformer"

    def __init__(self, transformer: nn.Module, schedule: Schedule, sample_shape: tuple[int, ...], **options):
        super().__init__()
        self.transformer, self.schedule, self.sample_shape = transformer, schedule, tuple(sample_shape)
        self.options = options
        self.read_features([self.default_feature_block()])

    @staticmethod
    def token_patch(transformer: nn.Module) -> int:
        """Latent pixels per image token along a side: the patch embedding's ``patch_size``."""
        return transformer.config.patch_size

    @staticmethod
    def default_latent_size(transformer: nn.Module, pipeline_default: int | None) -> int | None:
        """The latent side the pipeline samples at unless told otherwise: the transformer's ``sample_size``."""
        return transformer.config.sample_size

    @staticmethod
    def latent_channels(transformer: nn.Module) -> int:
        return transformer.config.in_channels

    @classmethod
    def settings(cls, transformer: nn.Module, scheduler_config: dict, prediction_type: str | None = None,
                 embedded_guidance: float | None = None, pixel_size: int | None = None) -> dict:
        """The adapter's ``options`` from a teacher's settings; one this class does not read is an error."""
        if embedded_guidance is not None:
            raise ValueError(f"a {type(transformer).__name__} has no guidance embedding; remove "
                             "teacher.embedded_guidance (teacher.guidance_scale is classifier-free guidance)")
        return {}

    @classmethod
    def from_pipeline(cls, transformer: nn.Module, scheduler_config: dict, vae_scale: int,
                      prediction_type: str | None = None, resolution: int | None = None,
                      embedded_guidance: float | None = None, num_frames: int | None = None,
                      frame_scale: int = 1) -> TransformerDenoiser:
        """The adapter of a transformer loaded from its pipeline, on square latents of ``resolution`` pixels
        (default: the pipeline's), with the teacher's settings; a setting that does not fit is a ``ValueError``.
        An image transformer has no frames (``num_frames``, ``frame_scale``: a video VAE's temporal downsampling,
        read by video adapters)."""
        if num_frames is not None:
            raise ValueError(f"teacher.num_frames is read by video teachers; a {type(transformer).__name__} makes "
                             "images, remove it")
        patch = cls.token_patch(transformer)
        if resolution is None:
            latent_size = cls.default_latent_size(transformer, PIPELINE_DEFAULT_LATENT_SIZE)
        elif resolution <= 0 or resolution % (vae_scale * patch):
            raise ValueError(f"teacher.resolution={resolution} must be a positive multiple of {vae_scale * patch} "
                             f"(the VAE's downsampling {vae_scale} times the transformer's patch {patch})")
        else:
            latent_size = resolution // vae_scale
        schedule = transformer_schedule(cls, scheduler_config, (latent_size // patch) ** 2)
        options = cls.settings(transformer, scheduler_config, prediction_type, embedded_guidance,
                               latent_size * vae_scale)
        return cls(transformer, schedule, (cls.latent_channels(transformer), latent_size, latent_size), **options)

    @property
    def network(self) -> nn.Module:
        return self.transformer

    def copy_network(self) -> TransformerDenoiser:
        """A denoiser around a deep copy of the transformer (its own weights and feature hooks): a student's or
        fake score's starting point."""
        return type(self)(copy.deepcopy(self.transformer), self.schedule, self.sample_shape, **self.options)

    def default_feature_block(self) -> str:
        """The middle transformer block (``block.{n // 2}``)."""
        return f"block.{len(self.transformer.transformer_blocks) // 2}"

    def blocks(self) -> dict[str, nn.Module]:
        """``block.0`` .. ``block.{n-1}``, the transformer blocks."""
        return {f"block.{i}": b for i, b in enumerate(self.transformer.transformer_blocks)}

    def feature_of(self, output) -> torch.Tensor:
        """The image tokens of a block's output (joint blocks return ``(text, image)``) on the token grid."""
        tokens = output[-1] if isinstance(output, tuple) else output
        patch = self.token_patch(self.transformer)
        height, width = (side // patch for side in self.sample_shape[-2:])
        return tokens.transpose(1, 2).reshape(len(tokens), -1, height, width)


class FlowTransformerDenoiser(TransformerDenoiser):
    """A rectified-flow transformer: velocity prediction on a :class:`FlowMatchSchedule`, sampled by the stock
    ``FlowMatchEulerDiscreteScheduler`` (:class:`~fdistill.samplers.flow.FlowMatchSampling`)."""

    prediction_type = "flow_prediction"

    @classmethod
    def settings(cls, transformer, scheduler_config, prediction_type=None, embedded_guidance=None, pixel_size=None):
        if prediction_type is not None:
            raise ValueError(f"a flow-matching {type(transformer).__name__} predicts the velocity; remove "
                             "teacher.prediction_type")
        return super().settings(transformer, scheduler_config, None, embedded_guidance)

    def timestep(self, t: torch.Tensor) -> torch.Tensor:
        """The pipeline's float32 ``timestep`` at schedule times ``t``: ``float32(t / N) * N``, as the scheduler
        builds it from its float32 sigmas."""
        n = self.schedule.num_train_timesteps
        return (t.double() / n).float() * n

    def stock_sampling(self):
        return FlowMatchSampling(self.schedule)


class SD3TransformerDenoiser(FlowTransformerDenoiser):
    """``SD3Transformer2DModel``: ``cond`` packs the prompt's hidden states and pooled embedding; the transformer
    gets ``timestep = float32(sigma) * 1000``. Features: ``block.i``."""


    def network_output(self, x_t, t, cond=None) -> torch.Tensor:
        """The transformer's velocity at times ``t``."""
        if cond is None:
            raise ValueError("a text-to-image transformer needs a prompt condition")
        hidden, pooled = unpack_text_condition(cond, self.transformer.config.pooled_projection_dim)
        return self.transformer(hidden_states=x_t, timestep=self.timestep(t).to(x_t.device),
                                encoder_hidden_states=hidden, pooled_projections=pooled).sample


class FluxTransformerDenoiser(FlowTransformerDenoiser):
    """``FluxTransformer2DModel``: latents ``[B, C, H, W]`` are packed into 2 x 2 patches (``[B, HW / 4, 4C]``)
    with their position ids, the transformer gets ``timestep = float32(sigma) * 1000 / 1000`` and, when its config
    has ``guidance_embeds``, the embedded guidance scale ``embedded_guidance`` (the pipeline's ``guidance_scale``;
    true classifier-free guidance is ``teacher.guidance_scale`` as for every teacher). ``cond`` packs the T5
    hidden states and the CLIP pooled embedding. Features: ``block.i`` (joint blocks) and ``single.i`` (single
    blocks)."""


    def __init__(self, transformer, schedule, sample_shape, embedded_guidance: float | None = None):
        if bool(transformer.config.guidance_embeds) != (embedded_guidance is not None):
            raise ValueError("a Flux transformer takes an embedded guidance scale exactly when it has "
                             "guidance_embeds")
        super().__init__(transformer, schedule, sample_shape, embedded_guidance=embedded_guidance)
        self.embedded_guidance = embedded_guidance

    @staticmethod
    def token_patch(transformer: nn.Module) -> int:
        """2: the pipeline packs 2 x 2 latent patches into a token."""
        return 2

    @staticmethod
    def default_latent_size(transformer: nn.Module, pipeline_default: int | None) -> int | None:
        """The pipeline's default (Flux transformers have no ``sample_size``)."""
        return pipeline_default

    @staticmethod
    def latent_channels(transformer: nn.Module) -> int:
        """A quarter of the transformer's input channels, which are 2 x 2 packed latent patches."""
        return transformer.config.in_channels // 4

    @classmethod
    def settings(cls, transformer, scheduler_config, prediction_type=None, embedded_guidance=None, pixel_size=None):
        """``embedded_guidance``: as given, else ``FluxPipeline``'s default ``guidance_scale`` of 3.5 when the
        transformer embeds one."""
        if not transformer.config.guidance_embeds:
            return super().settings(transformer, scheduler_config, prediction_type, embedded_guidance)
        super().settings(transformer, scheduler_config, prediction_type)
        return {"embedded_guidance": FLUX_DEFAULT_GUIDANCE if embedded_guidance is None else embedded_guidance}

    def blocks(self) -> dict[str, nn.Module]:
        """``block.i`` (the joint text-image blocks), then ``single.i`` (the single-stream blocks)."""
        return {**super().blocks(),
                **{f"single.{i}": b for i, b in enumerate(self.transformer.single_transformer_blocks)}}

    def pipeline_call_arguments(self) -> dict:
        """``guidance_scale``: the pipeline's name for the embedded guidance (1 when there is none, unused)."""
        return {"guidance_scale": 1.0 if self.embedded_guidance is None else self.embedded_guidance}

    def pack(self, latents: torch.Tensor) -> torch.Tensor:
        """``FluxPipeline._pack_latents``: ``[B, C, H, W]`` to ``[B, (H/2)(W/2), 4C]``."""
        b, c, h, w = latents.shape
        return latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, h * w // 4, c * 4)

    def unpack(self, tokens: torch.Tensor) -> torch.Tensor:
        """``FluxPipeline._unpack_latents``: back to ``[B, C, H, W]``."""
        c, h, w = self.sample_shape
        return tokens.view(len(tokens), h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(len(tokens), c, h, w)

    def image_ids(self, device, dtype) -> torch.Tensor:
        """``FluxPipeline._prepare_latent_image_ids``: each token's ``(0, row, column)``."""
        h, w = (side // 2 for side in self.sample_shape[-2:])
        ids = torch.zeros(h, w, 3)
        ids[..., 1] += torch.arange(h)[:, None]
        ids[..., 2] += torch.arange(w)[None, :]
        return ids.reshape(h * w, 3).to(device=device, dtype=dtype)

    def network_output(self, x_t, t, cond=None) -> torch.Tensor:
        """The transformer's velocity at times ``t``, unpacked to the latent's shape."""
        if cond is None:
            raise ValueError("a text-to-image transformer needs a prompt condition")
        hidden, pooled = unpack_text_condition(cond, self.transformer.config.pooled_projection_dim)
        guidance = None
        if self.embedded_guidance is not None:
            guidance = torch.full([1], self.embedded_guidance, device=x_t.device, dtype=torch.float32)
            guidance = guidance.expand(len(x_t))
        timestep = self.timestep(t).to(device=x_t.device, dtype=x_t.dtype)
        velocity = self.transformer(
            hidden_states=self.pack(x_t), timestep=timestep / 1000, guidance=guidance, pooled_projections=pooled,
            encoder_hidden_states=hidden, txt_ids=torch.zeros(hidden.shape[1], 3, device=x_t.device, dtype=x_t.dtype),
            img_ids=self.image_ids(x_t.device, x_t.dtype)).sample
        return self.unpack(velocity)


def without_learned_variance(out: torch.Tensor, channels: int) -> torch.Tensor:
    """The prediction of a model whose output may carry a learned variance in a second half of channels."""
    return out[:, :channels] if out.shape[1] == 2 * channels else out


class SanaTransformerDenoiser(FlowTransformerDenoiser):
    """``SanaTransformer2DModel``: ``cond`` packs the Gemma hidden states and their attention mask; the transformer
    gets ``timestep = float32(sigma) * 1000 * timestep_scale``; a learned-variance output keeps its first half of
    channels. Features: ``block.i``."""


    def network_output(self, x_t, t, cond=None) -> torch.Tensor:
        """The transformer's velocity at times ``t``."""
        if cond is None:
            raise ValueError("a text-to-image transformer needs a prompt condition")
        hidden, mask = unpack_text_condition(cond, cond.shape[1] - 1)
        timestep = self.timestep(t).to(device=x_t.device, dtype=x_t.dtype) * self.transformer.config.timestep_scale
        out = self.transformer(x_t, encoder_hidden_states=hidden, encoder_attention_mask=mask, timestep=timestep
                               ).sample
        return without_learned_variance(out.float(), self.sample_shape[0])


class VPTransformerDenoiser(TransformerDenoiser):
    """A transformer on its pipeline's discrete VP schedule, its epsilon (or v) prediction read through the noise
    table, sampled by the stock ``LCMScheduler`` (:class:`~fdistill.samplers.lcm.LCMSampling`)."""

    def __init__(self, transformer, schedule, sample_shape, prediction_type: str = "epsilon", **options):
        super().__init__(transformer, schedule, sample_shape, prediction_type=prediction_type, **options)
        self.prediction_type = prediction_type

    @classmethod
    def settings(cls, transformer, scheduler_config, prediction_type=None, embedded_guidance=None, pixel_size=None):
        """The scheduler's ``prediction_type`` unless ``prediction_type`` overrides it."""
        super().settings(transformer, scheduler_config, None, embedded_guidance)
        return {"prediction_type": prediction_type or scheduler_config.get("prediction_type", "epsilon")}

    def stock_sampling(self):
        return LCMSampling(self.schedule, self.prediction_type)


class PixArtTransformerDenoiser(VPTransformerDenoiser):
    """``PixArtTransformer2DModel`` on a discrete VP schedule: ``cond`` packs the T5 hidden states and their
    attention mask; the transformer gets the schedule's timestep and, when it uses additional conditions
    (PixArt-alpha at 1024), the resolution and aspect ratio; a learned-variance output keeps its first half of
    channels. Sampled by the stock ``LCMScheduler`` (:class:`~fdistill.samplers.lcm.LCMSampling`). Features:
    ``block.i``."""


    @classmethod
    def settings(cls, transformer, scheduler_config, prediction_type=None, embedded_guidance=None, pixel_size=None):
        """The prediction type, and the pixel size of the micro-conditions."""
        return {**super().settings(transformer, scheduler_config, prediction_type, embedded_guidance),
                "pixel_size": pixel_size}

    def __init__(self, transformer, schedule, sample_shape, prediction_type: str = "epsilon",
                 pixel_size: int | None = None):
        super().__init__(transformer, schedule, sample_shape, prediction_type, pixel_size=pixel_size)
        self.pixel_size = pixel_size

    def added_conditions(self, n: int, like: torch.Tensor) -> dict:
        """The pipeline's micro-conditions: the pixel resolution and aspect ratio when the transformer reads them."""
        if not self.transformer.use_additional_conditions:
            return {"resolution": None, "aspect_ratio": None}
        size = float(self.pixel_size)
        return {"resolution": torch.tensor([size, size]).repeat(n, 1).to(like),
                "aspect_ratio": torch.tensor([1.0]).repeat(n, 1).to(like)}

    def network_output(self, x_t, t, cond=None) -> torch.Tensor:
        """The transformer's epsilon (or v) at times ``t``, without a learned variance."""
        if cond is None:
            raise ValueError("a text-to-image transformer needs a prompt condition")
        hidden, mask = unpack_text_condition(cond, cond.shape[1] - 1)
        out = self.transformer(x_t, encoder_hidden_states=hidden, encoder_attention_mask=mask,
                               timestep=t.to(x_t.dtype), added_cond_kwargs=self.added_conditions(len(x_t), hidden)
                               ).sample
        return without_learned_variance(out, self.sample_shape[0])


class DiTTransformerDenoiser(VPTransformerDenoiser):
    """``DiTTransformer2DModel``: class-conditional (``cond`` is ``[B]`` class labels) on a discrete VP schedule,
    epsilon prediction with a learned variance that is dropped, sampled by the stock ``LCMScheduler``. Its label
    table has one more row than classes, the null class of guidance (``DiTPipeline``'s label 1000 for the 1000
    ImageNet classes), so ``num_class_embeds`` counts it as fdistill's UNets do. Features: ``block.i``."""

    text_conditioned = False

    def __init__(self, transformer, schedule, sample_shape, prediction_type: str = "epsilon"):
        super().__init__(transformer, schedule, sample_shape, prediction_type)
        self.num_class_embeds = transformer.config.num_embeds_ada_norm + 1
        for module in transformer.modules():  # labels are taken as given: the null class is asked for explicitly
            if hasattr(module, "token_drop"):  # diffusers' LabelEmbedding, which drops labels in train mode
                module.dropout_prob = 0.0

    def network_output(self, x_t, t, cond=None) -> torch.Tensor:
        """The transformer's epsilon (or v) at times ``t`` for class labels ``cond``."""
        if cond is None:
            raise ValueError("a class-conditional transformer needs class labels (the null class: unconditional)")
        out = self.transformer(x_t, timestep=t.to(x_t.dtype), class_labels=cond).sample
        return without_learned_variance(out, self.sample_shape[0])

    def null_condition(self, cond: torch.Tensor) -> torch.Tensor:
        """The last label, which the transformer's training dropped classes to."""
        return torch.full_like(cond, self.num_class_embeds - 1)


def transformer_schedule(adapter: type[TransformerDenoiser], scheduler_config: dict, image_tokens: int) -> Schedule:
    """The schedule a transformer class trains on, from its pipeline's scheduler config: a
    ``FlowMatchEulerDiscreteScheduler``, or a DPM-Solver on flow sigmas (``use_flow_sigmas``, shifted by
    ``flow_shift``; Sana's), for a flow transformer; the VP noise table otherwise."""
    import diffusers

    scheduler_class = scheduler_config.get("_class_name")
    if not issubclass(adapter, FlowTransformerDenoiser):
        return DiscreteVPSchedule.from_diffusers(diffusers.DDPMScheduler.from_config(scheduler_config))
    if scheduler_class == "FlowMatchEulerDiscreteScheduler":
        scheduler = diffusers.FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)
        return FlowMatchSchedule.from_diffusers(scheduler, image_tokens)
    if scheduler_config.get("use_flow_sigmas") and scheduler_config.get("prediction_type") == "flow_prediction":
        return FlowMatchSchedule(scheduler_config.get("num_train_timesteps", 1000),
                                 scheduler_config.get("flow_shift", 1.0), scheduler_config)
    raise ValueError(f"a flow-matching transformer needs a FlowMatchEulerDiscreteScheduler or a scheduler on flow "
                     f"sigmas (use_flow_sigmas, prediction_type flow_prediction), not {scheduler_class}")
