"""One spec per stock diffusers pipeline class: all that fdistill knows of the class is written here.

A :class:`PipelineSpec` says

* which parts the class needs beside its denoiser and scheduler, and which are optional;
* how its prompts become the denoiser's condition: through the pipeline's own ``encode_prompt``, into one tensor
  per prompt (:func:`~fdistill.pipelines.transformers.pack_text_condition` adds a pooled embedding or an attention
  mask as one more row);
* which adapter reads its denoiser as an x0-denoiser (and so which keywords the denoiser takes), and how latents are
  scaled into and out of the VAE;
* how the stock pipeline is called to sample a student in 1-4 steps (its fixed call arguments, whether it takes
  the image size and the student's timesteps) with the stock scheduler of the adapter's ``stock_sampling``;
* whether the class loads LoRA weights, which call argument carries their scale, and whether the kohya format
  that A1111 and ComfyUI read applies.

Loading (:mod:`fdistill.pipelines.loading`, :mod:`fdistill.pipelines.parts`), export
(:mod:`fdistill.pipelines.export`) and ``sample.py`` read the spec, and no other module names a pipeline class.
A new class is a spec in :data:`SPECS` and its adapter.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Callable

import torch

from fdistill.errors import ConfigError
from fdistill.networks.denoisers import UNetDenoiser
from fdistill.pipelines.transformers import (
    DiTTransformerDenoiser,
    FluxTransformerDenoiser,
    PixArtTransformerDenoiser,
    SanaTransformerDenoiser,
    SD3TransformerDenoiser,
    pack_text_condition,
)
from fdistill.pipelines.unets import SDXLUNetDenoiser
from fdistill.pipelines.video import WanTransformerDenoiser

CLIP_AND_T5 = ("tokenizer", "text_encoder", "tokenizer_2", "text_encoder_2", "vae")
# the components a Stable Diffusion pipeline is saved with but a student never needs
NO_SAFETY_CHECKER = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}


def divide_by_scaling(latents: torch.Tensor, vae_config) -> torch.Tensor:
    """Denoiser latents to VAE latents as most pipelines do: ``latents / scaling_factor (+ shift_factor)``."""
    latents = latents / vae_config.scaling_factor
    shift = getattr(vae_config, "shift_factor", None)
    return latents if shift is None else latents + shift


def scale_for_denoiser(latents: torch.Tensor, vae_config) -> torch.Tensor:
    """VAE latents to denoiser latents, the inverse of :func:`divide_by_scaling` (as training scripts encode)."""
    shift = getattr(vae_config, "shift_factor", None)
    return (latents if shift is None else latents - shift) * vae_config.scaling_factor


def multiply_by_reciprocal(latents: torch.Tensor, vae_config) -> torch.Tensor:
    """``DiTPipeline``'s own arithmetic, ``1 / scaling_factor * latents`` (it rounds differently from a division)."""
    return 1 / vae_config.scaling_factor * latents


@dataclass(frozen=True)
class PipelineSpec:
    """What fdistill needs to know of the stock pipeline class ``name`` (see the module's docstring)."""

    name: str
    adapter: type  # the Denoiser adapter of the pipeline's denoising network
    denoiser_role: str  # the denoiser's component name: "unet" or "transformer"
    denoiser_classes: tuple[str, ...]  # the diffusers classes that network may be
    parts: tuple[str, ...] = ()  # components needed beside the denoiser and the scheduler
    optional_parts: tuple[str, ...] = ()
    # text pipelines: (pipeline, prompts, device, max_sequence_length) -> one condition tensor per prompt
    encode_prompts: Callable | None = None
    # the condition of guidance's unconditional pass for a negative prompt; None: encode it as any prompt
    encode_negative: Callable | None = None
    max_sequence_length: int | None = None  # the call's default text length, for pipelines that take one
    to_vae_latents: Callable = divide_by_scaling
    from_vae_latents: Callable = scale_for_denoiser
    call_arguments: dict = field(default_factory=dict)  # fixed keyword arguments of the student's stock call
    sized_call: bool = False  # the call is given the image's height and width
    takes_timesteps: bool = True  # the call takes the student's timesteps (or sigmas)
    extra_components: dict = field(default_factory=dict)  # constructor arguments a student's pipeline fixes
    lora: bool = False  # the class loads LoRA weights (load_lora_weights)
    lora_scale_argument: str | None = None  # the call argument that carries the LoRA scale
    kohya_lora: bool = False  # its LoRA is also written in the kohya format of A1111 and ComfyUI

    @property
    def text(self) -> bool:
        """Whether the pipeline is conditioned on text (rather than class labels, or nothing)."""
        return self.encode_prompts is not None

    @property
    def latent(self) -> bool:
        return "vae" in self.parts

    def pipeline_class(self):
        import diffusers

        return getattr(diffusers, self.name)


def _sd_condition(pipe, prompts: list[str], device, max_sequence_length: int | None) -> torch.Tensor:
    hidden, _ = pipe.encode_prompt(prompts, device, 1, False)
    return hidden


def _sd3_condition(pipe, prompts: list[str], device, max_sequence_length: int) -> torch.Tensor:
    hidden, _, pooled, _ = pipe.encode_prompt(prompts, prompts, prompts, device=device,
                                              do_classifier_free_guidance=False,
                                              max_sequence_length=max_sequence_length)
    return pack_text_condition(hidden, pooled)


def _flux_condition(pipe, prompts: list[str], device, max_sequence_length: int) -> torch.Tensor:
    hidden, pooled, _ = pipe.encode_prompt(prompts, prompts, device=device, max_sequence_length=max_sequence_length)
    return pack_text_condition(hidden, pooled)


def _pixart_condition(pipe, prompts: list[str], device, max_sequence_length: int) -> torch.Tensor:
    hidden, mask, _, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False, device=device,
                                            clean_caption=False, max_sequence_length=max_sequence_length)
    return pack_text_condition(hidden, mask)


def _sana_condition(pipe, prompts: list[str], device, max_sequence_length: int) -> torch.Tensor:
    instruction = inspect.signature(type(pipe).__call__).parameters["complex_human_instruction"].default
    hidden, mask, _, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False, device=device,
                                            clean_caption=False, max_sequence_length=max_sequence_length,
                                            complex_human_instruction=instruction)
    return pack_text_condition(hidden, mask)


def _sdxl_condition(pipe, prompts: list[str], device, max_sequence_length: int | None) -> torch.Tensor:
    hidden, _, pooled, _ = pipe.encode_prompt(prompts, device=device, do_classifier_free_guidance=False)
    return pack_text_condition(hidden, pooled)


def _sdxl_negative(pipe, prompt: str, device, max_sequence_length: int | None) -> torch.Tensor:
    """SDXL's unconditional input: zeros (hidden states and pooled embedding) for the empty negative prompt, the
    pipeline's default when none is given and its ``force_zeros_for_empty_prompt`` is set; else the prompt's
    encoding."""
    condition = _sdxl_condition(pipe, [prompt], device, max_sequence_length)
    return torch.zeros_like(condition) if prompt == "" and pipe.config.force_zeros_for_empty_prompt else condition


def _sdxl_latent_statistics(latents: torch.Tensor, vae_config):
    """The VAE's per-channel ``latents_mean`` and ``latents_std`` as ``[1, C, 1, 1]``, or ``None`` without them."""
    mean, std = getattr(vae_config, "latents_mean", None), getattr(vae_config, "latents_std", None)
    if mean is None or std is None:
        return None
    return tuple(torch.tensor(v).view(1, len(v), 1, 1).to(latents.device, latents.dtype) for v in (mean, std))


def sdxl_to_vae_latents(latents: torch.Tensor, vae_config) -> torch.Tensor:
    """``StableDiffusionXLPipeline``'s un-scaling: ``latents * std / scaling_factor + mean`` when the VAE has latent
    statistics, else :func:`divide_by_scaling` (SDXL's VAE has no shift)."""
    statistics = _sdxl_latent_statistics(latents, vae_config)
    if statistics is None:
        return divide_by_scaling(latents, vae_config)
    mean, std = statistics
    return latents * std / vae_config.scaling_factor + mean


def sdxl_from_vae_latents(latents: torch.Tensor, vae_config) -> torch.Tensor:
    """The inverse of :func:`sdxl_to_vae_latents`, as SDXL's training scripts scale encoded images."""
    statistics = _sdxl_latent_statistics(latents, vae_config)
    if statistics is None:
        return scale_for_denoiser(latents, vae_config)
    mean, std = statistics
    return (latents - mean) * vae_config.scaling_factor / std


def _wan_condition(pipe, prompts: list[str], device, max_sequence_length: int) -> torch.Tensor:
    hidden, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False, device=device,
                                   max_sequence_length=max_sequence_length)
    return hidden


def _wan_latent_statistics(latents: torch.Tensor, vae_config) -> tuple[torch.Tensor, torch.Tensor]:
    """``WanPipeline``'s ``latents_mean`` and ``latents_std`` (the reciprocal of the VAE's per-channel standard
    deviation), ``[1, z_dim, 1, 1, 1]`` in ``latents``' dtype, computed as the pipeline computes them."""
    shape = (1, vae_config.z_dim, 1, 1, 1)
    mean = torch.tensor(vae_config.latents_mean).view(shape).to(latents.device, latents.dtype)
    std = 1.0 / torch.tensor(vae_config.latents_std).view(shape).to(latents.device, latents.dtype)
    return mean, std


def wan_to_vae_latents(latents: torch.Tensor, vae_config) -> torch.Tensor:
    """``WanPipeline``'s un-normalising before its decode: ``latents / latents_std + latents_mean``, with its
    ``latents_std`` the reciprocal of the VAE's (so the video latents' per-channel statistics are restored)."""
    mean, std = _wan_latent_statistics(latents, vae_config)
    return latents / std + mean


def wan_from_vae_latents(latents: torch.Tensor, vae_config) -> torch.Tensor:
    """The inverse of :func:`wan_to_vae_latents`, ``(latents - latents_mean) * latents_std``, as
    ``WanImageToVideoPipeline`` normalises the latents of its encoded frames."""
    mean, std = _wan_latent_statistics(latents, vae_config)
    return (latents - mean) * std


def _pixart(name: str, max_sequence_length: int) -> PipelineSpec:
    return PipelineSpec(name, PixArtTransformerDenoiser, "transformer", ("PixArtTransformer2DModel",),
                        ("tokenizer", "text_encoder", "vae"), encode_prompts=_pixart_condition,
                        max_sequence_length=max_sequence_length, sized_call=True,
                        call_arguments={"use_resolution_binning": False, "clean_caption": False})


SPECS: dict[str, PipelineSpec] = {spec.name: spec for spec in (
    # pixel UNets: a student of any UNet2DModel pipeline (DDPMPipeline, DDIMPipeline, ...) is served by this class
    PipelineSpec("ConsistencyModelPipeline", UNetDenoiser, "unet", ("UNet2DModel",)),
    PipelineSpec("StableDiffusionPipeline", UNetDenoiser, "unet", ("UNet2DConditionModel",),
                 ("tokenizer", "text_encoder", "vae"), encode_prompts=_sd_condition,
                 extra_components=NO_SAFETY_CHECKER, lora=True, lora_scale_argument="cross_attention_kwargs",
                 kohya_lora=True),
    PipelineSpec("StableDiffusionXLPipeline", SDXLUNetDenoiser, "unet", ("UNet2DConditionModel",),
                 ("tokenizer", "text_encoder", "tokenizer_2", "text_encoder_2", "vae"), encode_prompts=_sdxl_condition,
                 encode_negative=_sdxl_negative, to_vae_latents=sdxl_to_vae_latents,
                 from_vae_latents=sdxl_from_vae_latents, sized_call=True, lora=True,
                 lora_scale_argument="cross_attention_kwargs", kohya_lora=True),
    PipelineSpec("StableDiffusion3Pipeline", SD3TransformerDenoiser, "transformer", ("SD3Transformer2DModel",),
                 CLIP_AND_T5, ("tokenizer_3", "text_encoder_3"), encode_prompts=_sd3_condition,
                 max_sequence_length=256, sized_call=True, lora=True, lora_scale_argument="joint_attention_kwargs"),
    PipelineSpec("FluxPipeline", FluxTransformerDenoiser, "transformer", ("FluxTransformer2DModel",), CLIP_AND_T5,
                 encode_prompts=_flux_condition, max_sequence_length=512, sized_call=True, lora=True,
                 lora_scale_argument="joint_attention_kwargs"),
    _pixart("PixArtAlphaPipeline", 120),
    _pixart("PixArtSigmaPipeline", 300),
    PipelineSpec("SanaPipeline", SanaTransformerDenoiser, "transformer", ("SanaTransformer2DModel",),
                 ("tokenizer", "text_encoder", "vae"), encode_prompts=_sana_condition, max_sequence_length=300,
                 sized_call=True, call_arguments={"use_resolution_binning": False}, lora=True,
                 lora_scale_argument="attention_kwargs"),
    # text-to-video (Wan2.1): the call takes no timesteps; the adapter gives it the video's size
    PipelineSpec("WanPipeline", WanTransformerDenoiser, "transformer", ("WanTransformer3DModel",),
                 ("tokenizer", "text_encoder", "vae"), encode_prompts=_wan_condition, max_sequence_length=512,
                 to_vae_latents=wan_to_vae_latents, from_vae_latents=wan_from_vae_latents, takes_timesteps=False,
                 lora=True, lora_scale_argument="attention_kwargs"),
    # class-conditional latents: a VAE and no text; the call takes no timesteps
    PipelineSpec("DiTPipeline", DiTTransformerDenoiser, "transformer", ("DiTTransformer2DModel",), ("vae",),
                 to_vae_latents=multiply_by_reciprocal, takes_timesteps=False),
)}
PIXEL_SPEC = SPECS["ConsistencyModelPipeline"]


def spec_named(pipeline_class: str | None, network_class: str, source: str) -> PipelineSpec:
    """The spec of a pipeline of class ``pipeline_class`` (``None``: not recorded) whose denoising network is a
    ``network_class``; one that fdistill does not serve is a one-line error naming those it does. Unrecorded, the
    first spec of that network class is taken (Stable Diffusion for a ``UNet2DConditionModel``); a pixel
    ``UNet2DModel`` of any pipeline (``DDPMPipeline``, ``DDIMPipeline``, ...) is served as a consistency model."""
    if pipeline_class is None or (pipeline_class not in SPECS and network_class == PIXEL_SPEC.denoiser_classes[0]):
        pipeline_class = next((s.name for s in SPECS.values() if network_class in s.denoiser_classes), None)
    spec = SPECS.get(pipeline_class)
    if spec is None:
        served = [name for name in SPECS if name != PIXEL_SPEC.name]
        raise ConfigError(f"{source} is a {pipeline_class or network_class}; fdistill distils {', '.join(served)} "
                          "teachers, and any pipeline of a pixel UNet2DModel")
    if network_class not in spec.denoiser_classes:
        raise ConfigError(f"{source} is a {spec.name} around a {network_class}, which fdistill serves in "
                          f"{', '.join(s.name for s in SPECS.values() if network_class in s.denoiser_classes)}")
    return spec
