"""UNet adapters for pipelines whose UNet takes more than the plain :class:`~fdistill.networks.denoisers.UNetDenoiser`
feeds it.

:class:`SDXLUNetDenoiser` (``StableDiffusionXLPipeline``) feeds SDXL's ``UNet2DConditionModel`` its
``added_cond_kwargs`` exactly as the stock pipeline builds them, so a student trained here is served by that
pipeline unchanged.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from fdistill.networks.denoisers import UNetDenoiser
from fdistill.pipelines.transformers import unpack_text_condition
from fdistill.schedules import DiscreteVPSchedule, Schedule

MICRO_CONDITIONS = 6  # SDXL's time_ids: original (height, width), crop (top, left), target (height, width)


class SDXLUNetDenoiser(UNetDenoiser):
    """SDXL's UNet (``addition_embed_type="text_time"``) read as an x0-denoiser on a discrete VP schedule.

    ``cond`` packs (:func:`~fdistill.pipelines.transformers.pack_text_condition`) the prompt's hidden states, both
    text encoders' penultimate layers side by side (``[N, 77, 768 + 1280]`` for SDXL), and the second encoder's
    pooled projection (``[N, 1280]``). The UNet gets them as ``encoder_hidden_states`` and
    ``added_cond_kwargs["text_embeds"]``, and ``added_cond_kwargs["time_ids"]`` is the pipeline's default
    micro-conditioning ``(H, W, 0, 0, H, W)``: original size, top-left crop and target size, all the image's
    ``H = W = latent side x vae_scale`` pixels. Features: the UNet's ``down.i``, ``mid``, ``up.i``.
    """

    def __init__(self, unet: nn.Module, schedule: Schedule, prediction_type: str = "epsilon",
                 latent_size: int | None = None, vae_scale: int = 8):
        super().__init__(unet, schedule, prediction_type)
        self.vae_scale = vae_scale
        if latent_size is not None:
            self.sample_shape = (unet.config.in_channels, latent_size, latent_size)
        self.pooled_width = (unet.config.projection_class_embeddings_input_dim
                             - MICRO_CONDITIONS * unet.config.addition_time_embed_dim)

    @classmethod
    def from_pipeline(cls, unet: nn.Module, scheduler_config: dict, vae_scale: int, prediction_type: str | None = None,
                      resolution: int | None = None, embedded_guidance: float | None = None,
                      num_frames: int | None = None, frame_scale: int = 1) -> SDXLUNetDenoiser:
        """The adapter on the scheduler's noise table (its ``prediction_type`` unless overridden), at
        ``resolution`` pixels (default: the UNet's ``sample_size`` latents, 1024 pixels for SDXL)."""
        from diffusers import DDPMScheduler

        if embedded_guidance is not None:
            raise ValueError("SDXL's UNet has no guidance embedding; remove teacher.embedded_guidance "
                             "(teacher.guidance_scale is classifier-free guidance)")
        if num_frames is not None:
            raise ValueError("teacher.num_frames is read by video teachers; SDXL makes images, remove it")
        multiple = vae_scale * 2 ** (len(unet.config.block_out_channels) - 1)
        if resolution is not None and (resolution <= 0 or resolution % multiple):
            raise ValueError(f"teacher.resolution={resolution} must be a positive multiple of {multiple} (the VAE's "
                             f"downsampling {vae_scale} times the UNet's {multiple // vae_scale})")
        scheduler = DDPMScheduler.from_config(scheduler_config)
        latent_size = None if resolution is None else resolution // vae_scale
        return cls(unet, DiscreteVPSchedule.from_diffusers(scheduler),
                   prediction_type or scheduler.config.prediction_type, latent_size, vae_scale)

    def copy_network(self) -> SDXLUNetDenoiser:
        """A denoiser around a deep copy of the UNet, at the same size: a student's or fake score's start."""
        return SDXLUNetDenoiser(copy.deepcopy(self.unet), self.schedule, self.prediction_type,
                                self.sample_shape[-1], self.vae_scale)

    def time_ids(self, n: int, like: torch.Tensor) -> torch.Tensor:
        """``[n, 6]`` micro-conditions in ``like``'s dtype, as ``StableDiffusionXLPipeline._get_add_time_ids``."""
        pixels = self.sample_shape[-1] * self.vae_scale
        sizes = [pixels, pixels, 0, 0, pixels, pixels]
        return torch.tensor([sizes], dtype=like.dtype).to(like.device).repeat(n, 1)

    def network_output(self, x_t, t, cond=None) -> torch.Tensor:
        """The UNet's raw output (epsilon, v or x0) at times ``t`` for the packed prompt conditions ``cond``."""
        if cond is None:
            raise ValueError("SDXL's UNet needs a prompt condition")
        hidden, pooled = unpack_text_condition(cond, self.pooled_width)
        added = {"text_embeds": pooled, "time_ids": self.time_ids(len(x_t), hidden)}
        return self.unet(x_t, t.to(x_t.dtype), encoder_hidden_states=hidden, added_cond_kwargs=added).sample
