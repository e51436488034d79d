"""Build a run's frozen teacher from the configuration (``teacher.kind``), and wrap it in guidance.

Kinds: ``ring`` (an analytic 2-D ring of Gaussians with exact scores), ``mixture`` (an analytic Gaussian mixture
in any dimension from its means, standard deviations and weights), ``unet`` (a diffusers ``UNet2DModel``
built from ``teacher.unet``, for tests), ``pretrained`` (a diffusers model or pipeline from a local directory or
a hub id, text-to-image pipelines included), ``embedded`` (the shipped digits teacher), ``embedded_imbalanced``
(the shipped digits teacher fine-tuned so that its null class draws digits 0 to 9 with frequencies 0.3 down to
0.02), ``embedded_t2i`` (the shipped text-to-image pipeline on the captioned shapes) and ``embedded_t2i_flow``
(the shipped flow-matching ``StableDiffusion3Pipeline`` on the captioned shapes). A new kind is one builder
in :data:`TEACHER_BUILDERS` and the keys it reads in :data:`TEACHER_KEYS`.
"""

from __future__ import annotations

import json
import math
from dataclasses import fields
from pathlib import Path
from typing import Callable

import torch

from fdistill.config import Config, TeacherConfig
from fdistill.errors import ConfigError
from fdistill.networks.denoisers import (
    Denoiser,
    GaussianMixtureDenoiser,
    UNetDenoiser,
    freeze,
    gaussian_mixture,
    ring_mixture,
)
from fdistill.networks.guidance import GuidedDenoiser
from fdistill.pipelines.parts import vae_scale_factor
from fdistill.pipelines.transformers import TRANSFORMER_DENOISERS, transformer_schedule
from fdistill.schedules import SCHEDULES, DiscreteVPSchedule

EMBEDDED_TEACHER_DIR = Path(__file__).resolve().parent / "assets" / "digits_teacher"
EMBEDDED_IMBALANCED_TEACHER_DIR = Path(__file__).resolve().parent / "assets" / "digits_imbalanced_teacher"
EMBEDDED_T2I_TEACHER_DIR = Path(__file__).resolve().parent / "assets" / "shapes_t2i_teacher"
EMBEDDED_FLOW_TEACHER_DIR = Path(__file__).resolve().parent / "assets" / "shapes_flow_teacher"
EMBEDDED_FLOW_MAX_SEQUENCE_LENGTH = 8  # the T5 length the embedded flow teacher was trained with
UNET_CLASSES = ("UNet2DModel", "UNet2DConditionModel")
PIPELINE_DEFAULT_LATENT_SIZE = 128  # FluxPipeline's default_sample_size: latents of 1024-pixel images


def analytic_schedule(tc: TeacherConfig):
    """The noise schedule an analytic teacher diffuses under (``teacher.schedule``)."""
    if tc.schedule not in SCHEDULES:
        raise ConfigError(f"unknown teacher.schedule {tc.schedule!r}; choose one of {', '.join(SCHEDULES)}")
    return SCHEDULES[tc.schedule]()


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def describe(value) -> str:
    """A short account of a configured value's shape, for error messages."""
    if isinstance(value, (list, tuple)):
        row_lengths = sorted({len(v) for v in value if isinstance(v, (list, tuple))})
        rows = f" (rows of {' or '.join(map(str, row_lengths))})" if row_lengths else ""
        return f"{len(value)} entries{rows}"
    return repr(value)


def check_weights(weights: list[float] | None, num_modes: int, modes_from: str) -> None:
    """``teacher.weights``: absent (equal weights) or one non-negative number per mode, not all zero."""
    if weights is None:
        return
    if len(weights) != num_modes:
        raise ConfigError(f"teacher.weights has {len(weights)} entries but {modes_from} gives {num_modes} modes; "
                          "give one weight per mode, or leave teacher.weights out for equal weights")
    if not all(math.isfinite(w) and w >= 0 for w in weights) or sum(weights) <= 0:
        raise ConfigError(f"teacher.weights={list(weights)} must be non-negative and not all zero (they are "
                          "normalised to sum to 1); fix the weights")


def check_stds(stds, num_modes: int, dim: int) -> None:
    """``teacher.stds``: one number, one per mode or one per mode and coordinate, all positive."""
    shapes = (f"one number, {num_modes} numbers (one per mode) or {num_modes} rows of {dim} (one per mode and "
              "coordinate)")
    if stds is None:
        raise ConfigError(f"teacher.kind=mixture needs teacher.stds: {shapes}")
    if is_number(stds):
        values = [stds]
    elif isinstance(stds, (list, tuple)) and len(stds) == num_modes and all(map(is_number, stds)):
        values = list(stds)
    elif (isinstance(stds, (list, tuple)) and len(stds) == num_modes
          and all(isinstance(row, (list, tuple)) and len(row) == dim and all(map(is_number, row)) for row in stds)):
        values = [s for row in stds for s in row]
    else:
        raise ConfigError(f"teacher.stds ({describe(stds)}) must be {shapes} to fit teacher.means")
    bad = [s for s in values if not (math.isfinite(s) and s > 0)]
    if bad:
        raise ConfigError(f"teacher.stds must be positive and finite, got {bad[0]}; give every mode a positive "
                          "standard deviation")


def check_means(means: list[list[float]] | None) -> None:
    """``teacher.means``: K >= 1 means with the same D >= 1 coordinates each, all finite."""
    if not means:
        raise ConfigError("teacher.kind=mixture needs teacher.means: K means of D coordinates each, "
                          "e.g. [[-2, 0], [2, 0]]")
    dim = len(means[0])
    for k, mean in enumerate(means):
        if len(mean) != dim:
            raise ConfigError(f"teacher.means is ragged: mean {k} has {len(mean)} coordinates but mean 0 has {dim}; "
                              "give every mean the same number of coordinates")
        if not all(math.isfinite(c) for c in mean):
            raise ConfigError(f"teacher.means[{k}]={list(mean)} is not finite; give finite coordinates")
    if dim == 0:
        raise ConfigError("teacher.means has means with no coordinates; give each mean D >= 1 coordinates")


def ring_teacher(cfg: Config) -> Denoiser:
    tc = cfg.teacher
    schedule = analytic_schedule(tc)
    if tc.num_modes < 1:
        raise ConfigError(f"teacher.num_modes must be at least 1, got {tc.num_modes}")
    if not (math.isfinite(tc.std) and tc.std > 0):
        raise ConfigError(f"teacher.std must be positive and finite, got {tc.std}")
    check_weights(tc.weights, tc.num_modes, f"teacher.num_modes={tc.num_modes}")
    return GaussianMixtureDenoiser(**ring_mixture(tc.num_modes, tc.radius, tc.std, tc.weights), schedule=schedule)


def mixture_teacher(cfg: Config) -> Denoiser:
    tc = cfg.teacher
    schedule = analytic_schedule(tc)
    check_means(tc.means)
    check_stds(tc.stds, len(tc.means), len(tc.means[0]))
    check_weights(tc.weights, len(tc.means), "teacher.means")
    return GaussianMixtureDenoiser(**gaussian_mixture(tc.means, tc.stds, tc.weights), schedule=schedule)


def unet_teacher(cfg: Config) -> Denoiser:
    from diffusers import DDPMScheduler, UNet2DModel

    unet = UNet2DModel(**cfg.teacher.unet)
    schedule = DiscreteVPSchedule.from_diffusers(DDPMScheduler(num_train_timesteps=1000))
    return UNetDenoiser(unet, schedule, cfg.teacher.prediction_type or "epsilon")


def pretrained_teacher(cfg: Config) -> Denoiser:
    tc = cfg.teacher
    if tc.pretrained is None:
        raise ConfigError("teacher.kind=pretrained needs teacher.pretrained=<hub id or local directory>")
    return load_diffusers_teacher(tc.pretrained, tc.prediction_type, tc.resolution, tc.embedded_guidance)


def embedded_teacher(cfg: Config) -> Denoiser:
    return load_diffusers_teacher(EMBEDDED_TEACHER_DIR, cfg.teacher.prediction_type)


def embedded_imbalanced_teacher(cfg: Config) -> Denoiser:
    return load_diffusers_teacher(EMBEDDED_IMBALANCED_TEACHER_DIR, cfg.teacher.prediction_type)


def embedded_t2i_teacher(cfg: Config) -> Denoiser:
    return load_diffusers_teacher(EMBEDDED_T2I_TEACHER_DIR, cfg.teacher.prediction_type)


def embedded_t2i_flow_teacher(cfg: Config) -> Denoiser:
    return load_diffusers_teacher(EMBEDDED_FLOW_TEACHER_DIR)


TEACHER_BUILDERS: dict[str, Callable[[Config], Denoiser]] = {
    "ring": ring_teacher, "mixture": mixture_teacher, "unet": unet_teacher, "pretrained": pretrained_teacher,
    "embedded": embedded_teacher, "embedded_imbalanced": embedded_imbalanced_teacher,
    "embedded_t2i": embedded_t2i_teacher, "embedded_t2i_flow": embedded_t2i_flow_teacher,
}
# the teacher.* keys each kind reads, beyond kind and guidance (which every kind reads)
TEACHER_KEYS = {
    "ring": {"schedule", "num_modes", "radius", "std", "weights"},
    "mixture": {"schedule", "means", "stds", "weights"},
    "unet": {"unet", "prediction_type"},
    "pretrained": {"pretrained", "prediction_type", "negative_prompt", "max_sequence_length", "resolution",
                   "embedded_guidance"},
    "embedded": {"prediction_type"},
    "embedded_imbalanced": {"prediction_type"},
    "embedded_t2i": {"prediction_type", "negative_prompt"},
    "embedded_t2i_flow": {"negative_prompt", "max_sequence_length"},
}
ALL_KINDS_READ = {"kind", "guidance_scale", "guidance_interval"}


def check_teacher_keys(tc: TeacherConfig) -> None:
    """A ``teacher.*`` key that ``teacher.kind`` does not read, set away from its default, is an error."""
    defaults = TeacherConfig()
    for f in fields(TeacherConfig):
        if f.name in ALL_KINDS_READ | TEACHER_KEYS[tc.kind] or getattr(tc, f.name) == getattr(defaults, f.name):
            continue
        readers = ", ".join(kind for kind, keys in TEACHER_KEYS.items() if f.name in keys)
        raise ConfigError(f"teacher.{f.name} is not read by teacher.kind={tc.kind} (teacher.kind={readers} reads "
                          "it); remove it or change teacher.kind")


def build_teacher(cfg: Config) -> Denoiser:
    """The frozen teacher of ``teacher.kind``, unguided (students and fake scores are copied from it)."""
    builder = TEACHER_BUILDERS.get(cfg.teacher.kind)
    if builder is None:
        raise ConfigError(f"unknown teacher.kind {cfg.teacher.kind!r}; choose one of {', '.join(TEACHER_BUILDERS)}")
    check_teacher_keys(cfg.teacher)
    return freeze(builder(cfg))


def teacher_directory(cfg: Config) -> tuple[Path, str] | None:
    """The local directory a diffusers teacher was loaded from and how the user named it, or ``None`` for
    teachers built in memory (the pipeline's other parts, text encoders and a VAE, live beside its denoiser)."""
    if cfg.teacher.kind == "pretrained":
        return resolve_model_dir(cfg.teacher.pretrained), cfg.teacher.pretrained
    if cfg.teacher.kind == "embedded_t2i":
        return EMBEDDED_T2I_TEACHER_DIR, "fdistill/assets/shapes_t2i_teacher"
    if cfg.teacher.kind == "embedded_t2i_flow":
        return EMBEDDED_FLOW_TEACHER_DIR, "fdistill/assets/shapes_flow_teacher"
    return None


def prompt_length(root: Path, configured: int | None = None) -> int | None:
    """The T5 prompt length of the pipeline in ``root``: ``configured`` (``teacher.max_sequence_length``) when
    set, else the one the shipped flow teacher was trained with when ``root`` is it, else ``None`` (the
    pipeline's default)."""
    if configured is None and Path(root).resolve() == EMBEDDED_FLOW_TEACHER_DIR:
        return EMBEDDED_FLOW_MAX_SEQUENCE_LENGTH
    return configured


def with_guidance(teacher: Denoiser, cfg: Config, unconditional: Callable | None = None) -> Denoiser:
    """The teacher that objectives and the evaluation read: guided when ``teacher.guidance_scale != 1``.
    ``unconditional(cond)`` gives the unconditional input (a text task's negative-prompt embedding); by default
    the network's own null condition."""
    tc = cfg.teacher
    if tc.guidance_scale == 1.0 and tc.guidance_interval is None:
        return teacher
    if tc.guidance_interval is not None and len(tc.guidance_interval) != 2:
        raise ConfigError(f"teacher.guidance_interval must be [t_lo, t_hi] in the teacher's time units, "
                          f"got {tc.guidance_interval}")
    try:
        interval = None if tc.guidance_interval is None else tuple(tc.guidance_interval)
        return GuidedDenoiser(teacher, tc.guidance_scale, interval, unconditional)
    except ValueError as e:
        raise ConfigError(f"teacher.guidance_scale={tc.guidance_scale}: {e}") from None


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


def load_diffusers_teacher(source: str | Path, prediction_type: str | None = None, resolution: int | None = None,
                           embedded_guidance: float | None = None) -> Denoiser:
    """A diffusers teacher with its noise schedule, from a pipeline directory (``model_index.json`` with
    ``unet/`` or ``transformer/``, and ``scheduler/``), a UNet directory holding ``scheduler_config.json`` too, or
    a hub id of either.

    * A UNet's scheduler gives its ``alphas_cumprod`` as a :class:`DiscreteVPSchedule`, and its
      ``prediction_type`` (unless overridden) says how to read the UNet's output.
    * A transformer gets its class's adapter (:data:`~fdistill.pipelines.transformers.TRANSFORMER_DENOISERS`) on
      latents of ``resolution`` pixels (default: the pipeline's), with ``embedded_guidance`` for a Flux
      transformer that embeds a guidance scale.
    """
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
    class_name = json.loads(config_file.read_text()).get("_class_name")
    if class_name not in (*UNET_CLASSES, *TRANSFORMER_DENOISERS):
        raise ConfigError(f"{config_file} describes a {class_name}; fdistill teachers are "
                          f"{', '.join((*UNET_CLASSES, *TRANSFORMER_DENOISERS))}")
    network = getattr(diffusers, class_name).from_pretrained(net_dir, torch_dtype=torch.float32)
    scheduler_config = dict(diffusers.DDPMScheduler.load_config(scheduler_dir))
    if class_name in TRANSFORMER_DENOISERS:
        return transformer_teacher(root, source, network, scheduler_config, prediction_type, resolution,
                                   embedded_guidance)
    for key, value in (("resolution", resolution), ("embedded_guidance", embedded_guidance)):
        if value is not None:
            raise ConfigError(f"teacher.{key} is read by diffusion-transformer teachers, and {source} is a "
                              f"{class_name}; remove it")
    scheduler = diffusers.DDPMScheduler.from_config(scheduler_config)
    prediction = prediction_type or scheduler.config.prediction_type
    try:
        return UNetDenoiser(network, DiscreteVPSchedule.from_diffusers(scheduler), prediction)
    except ValueError as e:
        raise ConfigError(f"teacher {source}: {e}") from None


def transformer_teacher(root: Path, source, network, scheduler_config: dict, prediction_type: str | None,
                        resolution: int | None, embedded_guidance: float | None) -> Denoiser:
    """The adapter of a diffusion transformer loaded from the pipeline in ``root``, on square latents of
    ``resolution`` pixels (default: the pipeline's)."""
    adapter = TRANSFORMER_DENOISERS[type(network).__name__]
    pipeline_class = _read_json(root / "model_index.json").get("_class_name")
    if pipeline_class is not None and pipeline_class not in adapter.pipeline_classes:
        raise ConfigError(f"{source} is a {pipeline_class} around a {type(network).__name__}, which fdistill "
                          f"serves in {', '.join(adapter.pipeline_classes)}")
    vae_config = _read_json(root / "vae" / "config.json")
    vae_scale = vae_scale_factor(vae_config) if vae_config else 8
    patch = adapter.token_patch(network)
    if resolution is None:
        latent_size = adapter.default_latent_size(network, PIPELINE_DEFAULT_LATENT_SIZE)
    elif resolution <= 0 or resolution % (vae_scale * patch):
        raise ConfigError(f"teacher.resolution={resolution} must be a positive multiple of {vae_scale * patch} "
                          f"(the VAE's downsampling {vae_scale} times the transformer's patch {patch})")
    else:
        latent_size = resolution // vae_scale
    try:
        schedule = transformer_schedule(adapter, scheduler_config, (latent_size // patch) ** 2)
        options = adapter.settings(network, scheduler_config, prediction_type, embedded_guidance,
                                   latent_size * vae_scale)
        shape = (adapter.latent_channels(network), latent_size, latent_size)
        return adapter(network, schedule, shape, **options)
    except ValueError as e:
        raise ConfigError(f"teacher {source}: {e}") from None


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}
