"""Build a run's frozen teacher from the configuration (``teacher.kind``), and wrap it in guidance.

:data:`TEACHER_KINDS` is the one table of teacher kinds: each kind's builder, the ``teacher.*`` keys it reads (any
other key set away from its default is an error), and, for the shipped pipelines, their directory, the name exports
record and their text length. Kinds: ``ring`` (an analytic 2-D ring of Gaussians with exact scores), ``mixture`` (an
analytic Gaussian mixture in any dimension from its means, standard deviations and weights), ``unet`` (a diffusers
``UNet2DModel`` built from ``teacher.unet``, for tests), ``pretrained`` (a diffusers pipeline of any class with a
spec in :mod:`fdistill.pipelines.specs`, from a local directory or a hub id), ``embedded`` (the shipped digits
teacher), ``embedded_imbalanced`` (the shipped digits teacher fine-tuned so that its null class draws digits 0 to 9
with frequencies 0.3 down to 0.02), ``embedded_t2i`` (the shipped text-to-image pipeline on the captioned shapes)
and ``embedded_t2i_flow`` (the shipped flow-matching ``StableDiffusion3Pipeline`` on the captioned shapes). A new
kind is one row of :data:`TEACHER_KINDS`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
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
from fdistill.pipelines.export import portable_path
from fdistill.pipelines.loading import load_diffusers_teacher, resolve_model_dir
from fdistill.schedules import SCHEDULES, DiscreteVPSchedule

ASSETS = Path(__file__).resolve().parent / "assets"
EMBEDDED_TEACHER_DIR = ASSETS / "digits_teacher"
EMBEDDED_IMBALANCED_TEACHER_DIR = ASSETS / "digits_imbalanced_teacher"
EMBEDDED_T2I_TEACHER_DIR = ASSETS / "shapes_t2i_teacher"
EMBEDDED_FLOW_TEACHER_DIR = ASSETS / "shapes_flow_teacher"


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


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def frozen_dtype(cfg: Config) -> torch.dtype:
    """The dtype of the frozen weights (teacher or shared base, VAE, text encoders): ``teacher.dtype``, else the
    compute dtype of ``train.mixed_precision``, else float32."""
    precision = cfg.train.mixed_precision if cfg.train.mixed_precision in DTYPES else "fp32"
    return DTYPES[cfg.teacher.dtype or precision]


def loading_dtype(cfg: Config) -> torch.dtype:
    """The dtype a diffusers teacher loads in: its frozen dtype when only LoRA networks are trained on it, else
    float32, so that full copies of it start from its weights as stored (the teacher is cast afterwards)."""
    only_lora = cfg.student.lora is not None and cfg.fake_score.lora is not None
    return frozen_dtype(cfg) if only_lora else torch.float32


def unet_teacher(cfg: Config) -> Denoiser:
    from diffusers import DDPMScheduler, UNet2DModel

    unet = UNet2DModel(**cfg.teacher.unet)
    schedule = DiscreteVPSchedule.from_diffusers(DDPMScheduler(num_train_timesteps=1000))
    return UNetDenoiser(unet, schedule, cfg.teacher.prediction_type or "epsilon")


def pretrained_teacher(cfg: Config) -> Denoiser:
    tc = cfg.teacher
    if tc.pretrained is None:
        raise ConfigError("teacher.kind=pretrained needs teacher.pretrained=<hub id or local directory>")
    return load_diffusers_teacher(tc.pretrained, tc.prediction_type, tc.resolution, tc.embedded_guidance,
                                  loading_dtype(cfg), num_frames=tc.num_frames)


def shipped_teacher(cfg: Config) -> Denoiser:
    """A shipped pipeline (``fdistill/assets/``), read as its kind says."""
    return load_diffusers_teacher(TEACHER_KINDS[cfg.teacher.kind].directory, cfg.teacher.prediction_type,
                                  dtype=loading_dtype(cfg))


@dataclass(frozen=True)
class TeacherKind:
    """A ``teacher.kind``: its builder and the ``teacher.*`` keys it reads beyond ``kind`` and guidance; a shipped
    pipeline also has its ``directory``, the ``name`` exports record for it (no path of the machine that ran it)
    and the text length it was trained with (``max_sequence_length``, when its pipeline takes one)."""

    build: Callable[[Config], Denoiser]
    keys: frozenset[str]
    directory: Path | None = None
    name: str | None = None
    max_sequence_length: int | None = None


def _kind(build, *keys: str, **shipped) -> TeacherKind:
    return TeacherKind(build, frozenset(keys), **shipped)


TEACHER_KINDS: dict[str, TeacherKind] = {
    "ring": _kind(ring_teacher, "schedule", "num_modes", "radius", "std", "weights"),
    "mixture": _kind(mixture_teacher, "schedule", "means", "stds", "weights"),
    "unet": _kind(unet_teacher, "unet", "prediction_type", "dtype"),
    "pretrained": _kind(pretrained_teacher, "pretrained", "prediction_type", "negative_prompt", "max_sequence_length",
                        "resolution", "num_frames", "embedded_guidance", "dtype"),
    "embedded": _kind(shipped_teacher, "prediction_type", "dtype", directory=EMBEDDED_TEACHER_DIR,
                      name="fdistill digits teacher"),
    "embedded_imbalanced": _kind(shipped_teacher, "prediction_type", "dtype", directory=EMBEDDED_IMBALANCED_TEACHER_DIR,
                                 name="fdistill class-imbalanced digits teacher"),
    "embedded_t2i": _kind(shipped_teacher, "prediction_type", "negative_prompt", "dtype",
                          directory=EMBEDDED_T2I_TEACHER_DIR, name="fdistill captioned-shapes text-to-image teacher"),
    "embedded_t2i_flow": _kind(shipped_teacher, "negative_prompt", "max_sequence_length", "dtype",
                               directory=EMBEDDED_FLOW_TEACHER_DIR,
                               name="fdistill captioned-shapes flow-matching teacher", max_sequence_length=8),
}
ALL_KINDS_READ = {"kind", "guidance_scale", "guidance_interval"}


def check_teacher_keys(tc: TeacherConfig) -> None:
    """A ``teacher.*`` key that ``teacher.kind`` does not read, set away from its default, is an error."""
    defaults = TeacherConfig()
    for f in fields(TeacherConfig):
        if f.name in ALL_KINDS_READ | TEACHER_KINDS[tc.kind].keys or getattr(tc, f.name) == getattr(defaults, f.name):
            continue
        readers = ", ".join(name for name, kind in TEACHER_KINDS.items() if f.name in kind.keys)
        raise ConfigError(f"teacher.{f.name} is not read by teacher.kind={tc.kind} (teacher.kind={readers} reads "
                          "it); remove it or change teacher.kind")


def build_teacher(cfg: Config) -> Denoiser:
    """The frozen teacher of ``teacher.kind``, unguided (students and fake scores are copied from it)."""
    kind = TEACHER_KINDS.get(cfg.teacher.kind)
    if kind is None:
        raise ConfigError(f"unknown teacher.kind {cfg.teacher.kind!r}; choose one of {', '.join(TEACHER_KINDS)}")
    check_teacher_keys(cfg.teacher)
    return freeze(kind.build(cfg))


def teacher_directory(cfg: Config) -> tuple[Path, str] | None:
    """The local directory a diffusers teacher was loaded from and how exports name it (the user's own name for a
    pretrained teacher, the shipped name for an embedded one), or ``None`` for teachers built in memory (a
    pipeline's other parts, text encoders and a VAE, live beside its denoiser)."""
    if cfg.teacher.kind == "pretrained":
        return resolve_model_dir(cfg.teacher.pretrained), portable_path(cfg.teacher.pretrained)
    kind = TEACHER_KINDS[cfg.teacher.kind]
    return None if kind.directory is None else (kind.directory, f"fdistill/assets/{kind.directory.name}")


def teacher_name(cfg: Config) -> str | None:
    """How an export names its teacher: the user's hub id or directory, or the shipped teacher's name."""
    if cfg.teacher.kind == "pretrained":
        return portable_path(cfg.teacher.pretrained)
    return TEACHER_KINDS[cfg.teacher.kind].name


def prompt_length(root: Path, configured: int | None = None) -> int | None:
    """The text length of the pipeline in ``root``: ``configured`` (``teacher.max_sequence_length``) when set,
    else the one a shipped teacher was trained with when ``root`` is it, else ``None`` (the pipeline's default)."""
    if configured is not None:
        return configured
    shipped = [kind for kind in TEACHER_KINDS.values() if kind.directory == Path(root).resolve()]
    return shipped[0].max_sequence_length if shipped else None


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
