"""Build the teacher and the trainable networks of a run from the configuration."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

from fdistill.config import Config, ConfigError
from fdistill.denoisers import Denoiser, GaussianMixtureDenoiser, MLPDenoiser, UNetDenoiser, freeze, ring_mixture
from fdistill.discriminator import discriminator_for
from fdistill.objectives import Networks, Objective
from fdistill.schedules import SCHEDULES, DiscreteVPSchedule

TEACHER_KINDS = ("ring", "unet", "pretrained", "embedded")
EMBEDDED_TEACHER_DIR = Path(__file__).resolve().parent / "assets" / "digits_teacher"
UNET_CLASSES = ("UNet2DModel", "UNet2DConditionModel")
# sigma/alpha of a one-step student whose teacher predicts epsilon (SiD's initial noise level, sigma_init = 2.5)
EPSILON_STUDENT_NOISE = 2.5


def build_teacher(cfg: Config) -> Denoiser:
    """A frozen teacher: an analytic ring mixture, or a diffusers UNet built from ``teacher.unet``."""
    tc = cfg.teacher
    if tc.kind == "ring":
        if tc.schedule not in SCHEDULES:
            raise ConfigError(f"unknown teacher.schedule {tc.schedule!r}; choose one of {', '.join(SCHEDULES)}")
        try:
            params = ring_mixture(tc.num_modes, tc.radius, tc.std, tc.weights)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        return freeze(GaussianMixtureDenoiser(**params, schedule=SCHEDULES[tc.schedule]()))
    if tc.kind == "unet":
        from diffusers import DDPMScheduler, UNet2DModel

        unet = UNet2DModel(**tc.unet)
        scheduler = DDPMScheduler(num_train_timesteps=1000)
        prediction = tc.prediction_type or "epsilon"
        return freeze(UNetDenoiser(unet, DiscreteVPSchedule.from_diffusers(scheduler), prediction))
    if tc.kind in ("pretrained", "embedded"):
        source = EMBEDDED_TEACHER_DIR if tc.kind == "embedded" else tc.pretrained
        if source is None:
            raise ConfigError("teacher.kind=pretrained needs teacher.pretrained=<hub id or local directory>")
        return freeze(load_diffusers_teacher(source, tc.prediction_type))
    raise ConfigError(f"unknown teacher.kind {tc.kind!r}; choose one of {', '.join(TEACHER_KINDS)}")


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


def load_diffusers_teacher(source: str | Path, prediction_type: str | None = None) -> UNetDenoiser:
    """A diffusers UNet teacher with its noise schedule, from a pipeline directory (``model_index.json`` with
    ``unet/`` and ``scheduler/``), a UNet directory holding ``scheduler_config.json`` too, or a hub id of
    either. The scheduler's ``alphas_cumprod`` become a :class:`DiscreteVPSchedule` and its
    ``prediction_type`` (unless overridden) says how to read the UNet's output."""
    import diffusers

    root = resolve_model_dir(source)
    unet_dir = root / "unet" if (root / "unet" / "config.json").is_file() else root
    scheduler_dir = root / "scheduler" if (root / "scheduler").is_dir() else root
    config_file = unet_dir / "config.json"
    scheduler_file = scheduler_dir / "scheduler_config.json"
    for needed, what in ((config_file, "a UNet config"), (scheduler_file, "a scheduler config")):
        if not needed.is_file():
            raise ConfigError(f"{root} has no {what} ({needed.relative_to(root)}); give a diffusers pipeline "
                              "directory (model_index.json, unet/, scheduler/) or a UNet directory with "
                              "scheduler_config.json")
    class_name = json.loads(config_file.read_text()).get("_class_name")
    if class_name not in UNET_CLASSES:
        raise ConfigError(f"{config_file} describes a {class_name}; fdistill teachers are {' or '.join(UNET_CLASSES)}")
    unet = getattr(diffusers, class_name).from_pretrained(unet_dir, torch_dtype=torch.float32)
    scheduler = diffusers.DDPMScheduler.from_config(diffusers.DDPMScheduler.load_config(scheduler_dir))
    prediction = prediction_type or scheduler.config.prediction_type
    try:
        return UNetDenoiser(unet, DiscreteVPSchedule.from_diffusers(scheduler), prediction)
    except ValueError as e:
        raise ConfigError(f"teacher {source}: {e}") from None


def default_student_times(teacher: Denoiser) -> list[float]:
    """The one-step time when ``generator.times`` is not given: the schedule's last time, where the student's
    input ``sigma z`` carries no data at all; for an epsilon-predicting UNet teacher, the time where
    ``sigma/alpha = 2.5`` instead. Reading x0 from epsilon divides the network's error by ``alpha``, which is
    0.006 at the last step of a linear-beta schedule (a 156x amplification) and 0.37 at that time."""
    if isinstance(teacher, UNetDenoiser) and teacher.prediction_type == "epsilon":
        return [time_at_noise_level(teacher.schedule, EPSILON_STUDENT_NOISE)]
    return [float(teacher.schedule.t_max)]


def time_at_noise_level(schedule, noise_level: float) -> float:
    """The schedule time where ``sigma/alpha = noise_level`` (EDM's sigma), clamped to the schedule's range."""
    snr = torch.tensor([1.0 / noise_level], dtype=torch.float64)  # alpha / sigma
    return float(schedule.t_from_snr(snr).clamp(schedule.t_min, schedule.t_max))


def trainable_copy(teacher: Denoiser, cfg: Config) -> Denoiser:
    """A trainable network initialised from the teacher's weights, or an MLP when the teacher is analytic."""
    if isinstance(teacher, GaussianMixtureDenoiser):
        m = cfg.model
        return MLPDenoiser(teacher.sample_shape[0], teacher.schedule, m.hidden, m.depth, m.sigma_data)
    if isinstance(teacher, UNetDenoiser):
        net = UNetDenoiser(copy.deepcopy(teacher.unet), teacher.schedule, teacher.prediction_type)
    else:
        net = copy.deepcopy(teacher)
    net.train()
    return net.requires_grad_(True)


def build_networks(cfg: Config, teacher: Denoiser, objective: Objective) -> Networks:
    """Student (and fake score / discriminator when the objective uses them) for ``teacher``."""
    if cfg.generator.times:
        times = cfg.generator.times
    elif cfg.generator.noise_level is not None:
        times = [time_at_noise_level(teacher.schedule, cfg.generator.noise_level)]
    else:
        times = default_student_times(teacher)
    student = objective.build_student(trainable_copy(teacher, cfg), times)
    fake_score = trainable_copy(teacher, cfg) if objective.needs_fake_score else None
    discriminator = None
    if objective.needs_discriminator:
        probe = torch.zeros(2, *teacher.sample_shape)
        t = torch.full((2,), teacher.schedule.t_max, dtype=torch.float64)
        with torch.no_grad():
            _, features = teacher.forward_with_features(probe, t, _probe_condition(teacher, 2))
        discriminator = discriminator_for(features)
    return Networks(teacher=teacher, student=student, fake_score=fake_score, discriminator=discriminator)


def _probe_condition(teacher: Denoiser, n: int):
    unet_config = getattr(getattr(teacher, "unet", None), "config", None)
    if getattr(unet_config, "num_class_embeds", None):
        return torch.zeros(n, dtype=torch.long)
    if getattr(unet_config, "cross_attention_dim", None):
        width = unet_config.cross_attention_dim
        return torch.zeros(n, 1, width if isinstance(width, int) else width[0])
    return None
