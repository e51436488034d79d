"""Video diffusion transformers from diffusers read as x0-denoisers on latents ``[B, C, F, H, W]``.

:class:`WanTransformerDenoiser` (``WanTransformer3DModel``, ``WanPipeline``: Wan2.1 text-to-video) is a
rectified-flow transformer like those of :mod:`fdistill.pipelines.transformers`, on the same
:class:`~fdistill.schedules.FlowMatchSchedule` and sampled by the same stock Euler arithmetic; what differs is the
latent's frame axis, kept from the VAE to the transformer and through every objective (which treat a sample as one
tensor of any shape), and the size of a video, which the pipeline is told (``height``, ``width``, ``num_frames``).

Which adapter serves which pipeline class and how that pipeline encodes prompts is the pipeline's spec
(:mod:`fdistill.pipelines.specs`).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from fdistill.pipelines.transformers import FlowTransformerDenoiser, transformer_schedule
from fdistill.schedules import Schedule

# WanPipeline.__call__'s defaults: 480 x 832 pixels and 81 frames (5 s at 16 frames per second)
PIPELINE_HEIGHT, PIPELINE_WIDTH, PIPELINE_FRAMES = 480, 832, 81
PIPELINE_SIZE_MULTIPLE = 16  # WanPipeline refuses a height or width that is not a multiple of 16


class WanTransformerDenoiser(FlowTransformerDenoiser):
    """``WanTransformer3DModel`` on video latents ``[B, C, F, H, W]``, called as ``WanPipeline`` calls it:
    ``hidden_states`` the latents, ``timestep = float32(sigma) * 1000`` per sample and ``encoder_hidden_states`` the
    condition, which is the UMT5 hidden states exactly as ``WanPipeline.encode_prompt`` returns them (``[N, L, D]``,
    zero after each prompt's tokens; the pipeline passes no attention mask, so neither does this). The output is
    the velocity ``eps - x0``.

    ``video_shape`` is the pixel video ``(num_frames, height, width)`` that the latents decode to, which the
    stock pipeline is called with (:meth:`pipeline_call_arguments`). Features: ``block.i``, the video tokens after
    transformer block ``i`` laid back on their token grid ``[B, D, F / p_t, H / p_h, W / p_w]``.
    """

    def __init__(self, transformer: nn.Module, schedule: Schedule, sample_shape: tuple[int, ...],
                 video_shape: tuple[int, int, int]):
        super().__init__(transformer, schedule, sample_shape, video_shape=tuple(video_shape))
        self.video_shape = tuple(video_shape)

    @classmethod
    def from_pipeline(cls, transformer: nn.Module, scheduler_config: dict, vae_scale: int,
                      prediction_type: str | None = None, resolution: int | None = None,
                      embedded_guidance: float | None = None, num_frames: int | None = None,
                      frame_scale: int = 1) -> WanTransformerDenoiser:
        """The adapter at the pipeline's default video (480 x 832 pixels, 81 frames), or at square frames of
        ``resolution`` pixels and ``num_frames`` frames: ``(num_frames - 1) // frame_scale + 1`` latent frames, as
        ``WanPipeline.prepare_latents`` counts them for a VAE that compresses ``frame_scale`` frames into one (all
        but the first). A size the pipeline would change or refuse is a ``ValueError``."""
        patch_frames, patch_height, patch_width = transformer.config.patch_size
        height, width = (PIPELINE_HEIGHT, PIPELINE_WIDTH) if resolution is None else (resolution, resolution)
        multiple = math.lcm(PIPELINE_SIZE_MULTIPLE, vae_scale * patch_height, vae_scale * patch_width)
        if resolution is not None and (resolution <= 0 or resolution % multiple):
            raise ValueError(f"teacher.resolution={resolution} must be a positive multiple of {multiple} (WanPipeline "
                             f"takes multiples of {PIPELINE_SIZE_MULTIPLE}, and of the VAE's downsampling "
                             f"{vae_scale} times the transformer's patch {patch_height})")
        frames = PIPELINE_FRAMES if num_frames is None else num_frames
        latent_frames = (frames - 1) // frame_scale + 1
        if frames <= 0 or (frames - 1) % frame_scale or latent_frames % patch_frames:
            raise ValueError(f"teacher.num_frames={frames} must be 1 more than a multiple of {frame_scale} (the "
                             f"VAE's temporal downsampling; WanPipeline rounds other counts), giving a multiple of "
                             f"{patch_frames} latent frames (the transformer's temporal patch)")
        sample_shape = (transformer.config.in_channels, latent_frames, height // vae_scale, width // vae_scale)
        tokens = latent_frames // patch_frames * (sample_shape[2] // patch_height) * (sample_shape[3] // patch_width)
        schedule = transformer_schedule(cls, scheduler_config, tokens)
        cls.settings(transformer, scheduler_config, prediction_type, embedded_guidance)  # refuses any: Wan has none
        return cls(transformer, schedule, sample_shape, (frames, height, width))

    def default_feature_block(self) -> str:
        """The middle transformer block (``block.{n // 2}``)."""
        return f"block.{len(self.transformer.blocks) // 2}"

    def blocks(self) -> dict[str, nn.Module]:
        """``block.0`` .. ``block.{n-1}``, the transformer blocks (self-attention over all frames' tokens,
        cross-attention to the text)."""
        return {f"block.{i}": block for i, block in enumerate(self.transformer.blocks)}

    def feature_of(self, output: torch.Tensor) -> torch.Tensor:
        """A block's video tokens ``[B, F' H' W', D]`` on their token grid ``[B, D, F', H', W']``."""
        patches = self.transformer.config.patch_size
        grid = [side // patch for side, patch in zip(self.sample_shape[1:], patches, strict=True)]
        return output.transpose(1, 2).reshape(len(output), -1, *grid)

    def pipeline_call_arguments(self) -> dict:
        """The video's size: ``num_frames``, ``height`` and ``width`` (the pipeline's defaults are not the
        teacher's unless it was loaded at them)."""
        frames, height, width = self.video_shape
        return {"num_frames": frames, "height": height, "width": width}

    def network_output(self, x_t, t, cond=None) -> torch.Tensor:
        """The transformer's velocity at times ``t``."""
        if cond is None:
            raise ValueError("a text-to-video transformer needs a prompt condition")
        return self.transformer(hidden_states=x_t, timestep=self.timestep(t).to(x_t.device),
                                encoder_hidden_states=cond, return_dict=False)[0]
