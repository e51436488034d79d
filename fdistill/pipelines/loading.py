"""Load a diffusers teacher's denoising network as an x0-denoiser, from a local pipeline directory or a hub id.

The pipeline's spec (:mod:`fdistill.pipelines.specs`, found from ``model_index.json``, else from the network's class)
names the adapter; the adapter reads the scheduler's config as its noise schedule (``from_pipeline``). The other
parts of a latent pipeline (VAE, text encoders) are loaded by :class:`fdistill.pipelines.parts.LatentPipelineParts`.
Offline, a model that is neither a local directory nor cached fails at once with one line naming the fix.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from fdistill.errors import ConfigError
from fdistill.networks.denoisers import Denoiser
from fdistill.pipelines.parts import on_meta_device, vae_scale_factor
from fdistill.pipelines.specs import SPECS, spec_named

DEFAULT_VAE_SCALE = 8  # the downsampling of Stable Diffusion's VAE, for a network saved without its VAE


def resolve_model_dir(source: str | Path) -> Path:
    """A local directory for ``source``: the directory itself, or the Hugging Face cache's snapshot of a hub id
    (downloaded when online). Offline and not cached, it fails at once with one line naming the fix."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError

    try:
        patterns = ["*.json", "*.safetensors", "*.txt", "*.model"]
        return Path(snapshot_download(str(source), allow_patterns=patterns))
    except HFValidationError:
        raise ConfigError(f"teacher model {str(source)!r} is neither a local directory nor a hub id; "
                          "give an existing directory written by save_pretrained") from None
    except Exception as e:  # offline, not cached, unknown repo, no network: all mean the same to the user
        raise ConfigError(f"teacher model {str(source)!r} is not a local directory and could not be fetched "
                          f"from the Hugging Face Hub ({type(e).__name__}); download it where there is network "
                          f"(huggingface-cli download {source} --local-dir DIR) and set teacher.pretrained=DIR"
                          ) from None


def vae_downsampling(vae_config: dict) -> tuple[int, int]:
    """``(spatial, temporal)``: pixels per latent pixel along a side (:func:`~fdistill.pipelines.parts.
    vae_scale_factor`), and video frames per latent frame (a video VAE's ``scale_factor_temporal``, 1 for an image
    VAE); Stable Diffusion's 8 for a network saved without its VAE."""
    if not vae_config:
        return DEFAULT_VAE_SCALE, 1
    return vae_scale_factor(vae_config), vae_config.get("scale_factor_temporal", 1)


def load_diffusers_teacher(source: str | Path, prediction_type: str | None = None, resolution: int | None = None,
                           embedded_guidance: float | None = None, dtype: torch.dtype = torch.float32,
                           on_meta: bool = False, num_frames: int | None = None) -> Denoiser:
    """A diffusers teacher with its noise schedule, from a pipeline directory (``model_index.json`` with
    ``unet/`` or ``transformer/``, and ``scheduler/``), a UNet directory holding ``scheduler_config.json`` too, or
    a hub id of either: its spec's adapter around the network, with ``prediction_type`` overriding the
    scheduler's, latents of ``resolution`` pixels (default: the pipeline's), a video teacher's ``num_frames``
    (default: the pipeline's) and Flux's ``embedded_guidance``; the network's weights are loaded in ``dtype``.
    ``on_meta`` builds the network from its config on the meta device instead, with no weight loaded and no memory
    taken (the memory pre-flight's probe). A pipeline with a second denoiser (Wan2.2's low-noise
    ``transformer_2``) is refused: fdistill distils one network."""
    import diffusers

    root = resolve_model_dir(source)
    net_dir = next((root / name for name in ("unet", "transformer") if (root / name / "config.json").is_file()), root)
    scheduler_dir = root / "scheduler" if (root / "scheduler").is_dir() else root
    config_file = net_dir / "config.json"
    scheduler_file = scheduler_dir / "scheduler_config.json"
    for needed, what in ((config_file, "a UNet or transformer config"), (scheduler_file, "a scheduler config")):
        if not needed.is_file():
            raise ConfigError(f"{root} has no {what} ({needed.relative_to(root)}); give a diffusers pipeline "
                              "directory (model_index.json, unet/ or transformer/, scheduler/) or a UNet directory "
                              "with scheduler_config.json")
    class_name = _read_json(config_file).get("_class_name")
    served = {name for spec in SPECS.values() for name in spec.denoiser_classes}
    if class_name not in served:
        raise ConfigError(f"{config_file} describes a {class_name}; fdistill teachers are {', '.join(sorted(served))}")
    index = _read_json(root / "model_index.json")
    spec = spec_named(index.get("_class_name"), class_name, str(source))
    second = f"{spec.denoiser_role}_2"
    if (index.get(second) or [None, None])[1] is not None:
        raise ConfigError(f"{source} is a {spec.name} with two denoisers ({spec.denoiser_role}/ and {second}/, "
                          "each for part of the noise levels); fdistill distils a pipeline with one")
    model = getattr(diffusers, class_name)
    network = on_meta_device(model, net_dir) if on_meta else model.from_pretrained(net_dir, torch_dtype=dtype)
    scheduler_config = dict(diffusers.DDPMScheduler.load_config(scheduler_dir))
    vae_scale, frame_scale = vae_downsampling(_read_json(root / "vae" / "config.json"))
    try:
        return spec.adapter.from_pipeline(network, scheduler_config, vae_scale, prediction_type, resolution,
                                          embedded_guidance, num_frames, frame_scale)
    except ValueError as e:
        raise ConfigError(f"teacher {source}: {e}") from None


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}
