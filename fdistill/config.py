"""Typed experiment configuration: dataclasses validated through OmegaConf.

A YAML experiment file may name base files under ``include:`` (paths relative to it), merged first.
Command-line ``key=value`` overrides come last. Unknown keys and wrong types raise :class:`ConfigError`
with one line naming the key and the nearest valid one. The ``objective`` section is checked against the
options dataclass that its ``name`` registered.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, get_args, get_origin, get_type_hints

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from fdistill.errors import ConfigError


@dataclass
class RunConfig:
    dir: Optional[str] = None  # default: runs/<config file stem>
    seed: int = 0


@dataclass
class TeacherConfig:
    # ring (analytic 2-D ring of Gaussians) | mixture (analytic Gaussian mixture in any dimension) |
    # unet (built from `unet`) | pretrained | embedded (digits) | embedded_imbalanced (digits, imbalanced null
    # class) | embedded_t2i (shapes, Stable-Diffusion-style UNet) | embedded_t2i_flow (shapes, SD3-style
    # flow-matching transformer)
    kind: str = "ring"
    schedule: str = "edm"  # schedule of analytic teachers: edm | vp | rf | trigflow
    num_modes: int = 8  # ring: modes at angles 2 pi k / num_modes
    radius: float = 2.0  # ring
    std: float = 0.1  # ring: every mode's standard deviation
    weights: Optional[List[float]] = None  # ring and mixture: one per mode, normalised (default: equal)
    means: Optional[List[List[float]]] = None  # mixture: K means of D coordinates each
    stds: Any = None  # mixture: one number, K numbers (one per mode) or K x D (one per mode and coordinate)
    pretrained: Optional[str] = None  # hub id or local directory of a diffusers model / pipeline
    prediction_type: Optional[str] = None  # overrides the scheduler's prediction_type
    guidance_scale: float = 1.0  # classifier-free guidance of the teacher, x_u + w (x_c - x_u); 1: none
    guidance_interval: Optional[List[float]] = None  # [t_lo, t_hi]: guide only at these teacher times
    negative_prompt: str = ""  # text teachers: the prompt of guidance's unconditional pass
    # T5 pipelines (SD3, Flux, PixArt): the T5 prompt length (null: the pipeline's default, e.g. 256 for SD3; the
    # embedded flow teacher's own, 8)
    max_sequence_length: Optional[int] = None
    resolution: Optional[int] = None  # transformer teachers: image side in pixels (null: the pipeline's default)
    num_frames: Optional[int] = None  # video teachers (Wan): frames per video (null: the pipeline's default, 81)
    embedded_guidance: Optional[float] = None  # Flux with guidance_embeds: its guidance input (null: 3.5)
    # bf16 | fp16 | fp32: the frozen weights (the teacher or the base LoRA networks share, and the text encoders;
    # the VAE stays fp32); null: the compute dtype of train.mixed_precision, else fp32. Trained weights stay fp32.
    dtype: Optional[str] = None
    unet: Dict[str, Any] = field(default_factory=dict)  # UNet2DModel config for kind=unet


@dataclass
class ModelConfig:
    """Networks built from scratch when the teacher has no architecture to copy (analytic teachers)."""

    hidden: int = 128
    depth: int = 3
    sigma_data: float = 1.0


@dataclass
class GeneratorConfig:
    # sampling times t_0 > t_1 > ... in the teacher's time units (0..999 for diffusers teachers); default: the
    # teacher's last time, or sigma/alpha = 2.5 for epsilon-prediction teachers (docs/images.md)
    times: Optional[List[float]] = None
    noise_level: Optional[float] = None  # instead of times: one step at the time where sigma/alpha is this (SiD: 2.5)


# diffusers' LoRA distillation scripts (train_lcm_distill_lora_*.py) adapt these UNet layers: attention and
# feed-forward projections, the ResNet convolutions and time projections, and the down/upsampling convolutions.
# A UNet2DModel without cross-attention (the digits teacher) has the ResNet, sampler and mid-attention ones.
LORA_TARGET_MODULES = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                       "conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv",
                       "time_emb_proj")


@dataclass
class LoraConfig:
    """Low-rank adapters on the teacher's frozen weights (peft); only the adapters train. Every LoRA network of a
    run is an adapter of the teacher's own network, which holds the frozen weights once."""

    rank: int = 8
    alpha: Optional[float] = None  # the adapters' output is scaled by alpha / rank (default: rank, scale 1)
    # names (or name endings) of the UNet layers that get adapters; names a UNet lacks are skipped
    target_modules: List[str] = field(default_factory=lambda: list(LORA_TARGET_MODULES))

    def __post_init__(self) -> None:
        if self.rank <= 0:
            raise ConfigError(f"lora.rank={self.rank} (student.lora or fake_score.lora) must be a positive integer, "
                              "e.g. 8")
        if self.alpha is not None and self.alpha <= 0:
            raise ConfigError(f"lora.alpha={self.alpha} (student.lora or fake_score.lora) must be positive; leave it "
                              "null for alpha = rank")
        if not self.target_modules:
            raise ConfigError("lora.target_modules (student.lora or fake_score.lora) is empty; name the layers to "
                              "adapt, e.g. [to_q, to_k]")


@dataclass
class StudentConfig:
    lora: Optional[LoraConfig] = None  # null: the student trains all of a copy of the teacher


@dataclass
class FakeScoreConfig:
    lora: Optional[LoraConfig] = None  # null: the fake score trains all of a copy of the teacher


LR_DECAYS = ("constant", "cosine", "linear")


@dataclass
class OptimConfig:
    # adamw (torch) | adamw8bit (bitsandbytes' 8-bit AdamW: its two moments in 2 bytes per weight instead of 8; needs
    # bitsandbytes and a CUDA device)
    optimizer: str = "adamw"
    lr: float = 1e-4
    betas: List[float] = field(default_factory=lambda: [0.0, 0.999])
    weight_decay: float = 0.0
    grad_clip: Optional[float] = None  # max global gradient norm
    warmup_steps: int = 0  # linear learning-rate warm-up over this many updates of this optimizer
    # constant | cosine | linear: after the warm-up the learning rate stays, or falls to 0 at train.steps
    lr_decay: str = "constant"
    # learning rates of single networks this optimizer trains, overriding lr, e.g. {discriminator: 0.001}
    lr_by_network: Dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.lr_decay not in LR_DECAYS:
            raise ConfigError(f"student_optim/critic_optim lr_decay={self.lr_decay!r} is unknown; use one of "
                              f"{', '.join(LR_DECAYS)}")


@dataclass
class DataConfig:
    # teacher: exact samples of an analytic teacher | digits | shapes | folder (images at `path`);
    # text-to-image: captioned_shapes | prompts (a .txt/.csv/.jsonl/.json prompt file at `path`, images optional)
    kind: str = "teacher"
    path: Optional[str] = None
    # latent pipelines: a directory that keeps the prompt embeddings and the real images' VAE latents (safetensors
    # shards keyed by the encoder's weights and the prompt or image bytes), read instead of encoding again
    cache_dir: Optional[str] = None
    # class-labelled image data: draw training images with these class frequencies, one per class in label
    # order, normalised to sum 1 (default: the data's own proportions)
    class_frequencies: Optional[List[float]] = None
    # image data and a class-conditional teacher: teacher, student and fake score get only the null class, so
    # the student chooses its own class frequencies (docs/images.md, "Class frequencies")
    unconditional: bool = False

    def __post_init__(self) -> None:
        labelled, kinds = self.kind in CLASS_LABELLED_DATA, ", ".join(CLASS_LABELLED_DATA)
        if self.class_frequencies is not None and not labelled:
            raise ConfigError(f"data.class_frequencies needs class-labelled image data ({kinds}), not "
                              f"data.kind={self.kind}; remove it")
        if self.unconditional and not labelled:
            raise ConfigError(f"data.unconditional is read with class-labelled image data ({kinds}), not "
                              f"data.kind={self.kind}; remove it")
        weights = self.class_frequencies or []
        if any(not 0 <= w < float("inf") for w in weights) or (weights and sum(weights) == 0):
            raise ConfigError(f"data.class_frequencies={list(weights)} must be finite, non-negative and not all "
                              "zero; give one weight per class")


CLASS_LABELLED_DATA = ("digits", "shapes", "folder")  # the data kinds whose images carry class labels


@dataclass
class TrainConfig:
    """``batch_size`` is the global batch of one step. Each process runs ``batch_size / (processes x
    device_batch_size)`` accumulation micro-batches of ``device_batch_size`` samples."""

    steps: int = 2000
    batch_size: int = 256
    device_batch_size: Optional[int] = None  # default: batch_size / processes (no accumulation)
    mixed_precision: str = "no"  # no | bf16 | fp16 (fp16 needs a GPU; loss scaling)
    fsdp: bool = False  # shard the trainable networks, their gradients and optimizer states (FSDP2)
    # diffusers models recompute their blocks' activations in the backward pass instead of keeping them
    gradient_checkpointing: bool = False
    max_nonfinite_in_a_row: int = 20  # NaN/inf steps are skipped; this many in a row abort the run


@dataclass
class CheckpointConfig:
    every: int = 1000  # steps between checkpoints (0: only at the end); RUN_DIR/checkpoints/step-N
    keep_last: int = 2  # older checkpoints are deleted once a newer one is complete


@dataclass
class EMASpec:
    """One average of the student's weights; set one of ``decay``, ``half_life_kimg``, ``sigma_rel``."""

    name: str = "ema"
    decay: Optional[float] = None  # constant decay per update
    half_life_kimg: Optional[float] = None  # EDM: half-life in thousands of samples, ramped up early
    rampup: Optional[float] = 0.05  # EDM ramp-up: half-life <= rampup x samples so far (null: none)
    sigma_rel: Optional[float] = None  # EDM2 power-function EMA with this relative standard deviation


@dataclass
class EMAConfig:
    update: str = "generator"  # generator: after student updates only | every: after every step
    averages: List[EMASpec] = field(default_factory=list)


@dataclass
class LogConfig:
    every: int = 50  # steps between progress, CSV and TensorBoard updates
    sample_every: int = 0  # steps between sample previews RUN_DIR/samples/step-N.png (0: never)
    fd_every: int = 0  # image runs: steps between FDs of fd_samples one-step samples, logged as eval/fd (0: never)
    fd_samples: int = 250
    tensorboard: bool = True


@dataclass
class EvalConfig:
    num_samples: int = 4000
    seed: int = 1234
    teacher_steps: int = 32
    teacher_sampler: str = "heun"  # euler (= DDIM) | heun
    student_steps: List[int] = field(default_factory=lambda: [1])
    # few-step re-noising: sde (fresh noise) | ode (the implied noise); null: as the student's stock scheduler does
    # (sde for students of VP teachers, ode for flow-matching ones), else sde
    renoise: Optional[str] = None
    ema: Optional[str] = None  # the ema.averages entry to evaluate and sample with (null: trained weights)
    batch_size: int = 250  # images generated at once
    reference: Optional[str] = None  # images: folder, statistics .npz or "digits"; default: the training data
    # images: fdistill-digits | fdistill-shapes | inception; default: fdistill-digits on digits, fdistill-shapes on
    # the captioned shapes, else inception
    features: Optional[str] = None
    save_samples: bool = True  # images: RUN_DIR/samples/<sampler>/*.png and student_vs_teacher.png
    # text-to-image: the open_clip model of the CLIP score ("local-dir:DIR", or a name with clip_pretrained);
    # default: the shipped shapes CLIP on the captioned shapes, else ViT-g-14 (laion2b_s34b_b88k)
    clip_model: Optional[str] = None
    clip_pretrained: Optional[str] = None


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    fake_score: FakeScoreConfig = field(default_factory=FakeScoreConfig)
    data: DataConfig = field(default_factory=DataConfig)
    objective: Dict[str, Any] = field(default_factory=lambda: {"name": "dmd"})
    student_optim: OptimConfig = field(default_factory=OptimConfig)
    critic_optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    log: LogConfig = field(default_factory=LogConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


def _schema_fields(schema, prefix: str = "", in_list: bool = False):
    """``(dotted key, type, inside a list)`` of every field of ``schema``, into nested sections and list items,
    also sections that default to null (``student.lora``)."""
    hints = get_type_hints(schema)
    for f in fields(schema):
        kind = hints[f.name]
        yield prefix + f.name, kind, in_list
        default = f.default_factory() if callable(f.default_factory) else f.default  # type: ignore[misc]
        optional = [t for t in get_args(kind) if is_dataclass(t)]
        section = type(default) if is_dataclass(default) else optional[0] if optional else None
        if section is not None:
            yield from _schema_fields(section, prefix + f.name + ".", in_list or get_origin(kind) is list)


def _valid_keys(schema) -> list[str]:
    """Every dotted key of ``schema``."""
    return [key for key, _, _ in _schema_fields(schema)]


def _restore_words(user: DictConfig) -> None:
    """YAML reads the words ``no`` and ``yes`` as booleans; a string key gets its word back, so that
    ``train.mixed_precision=no`` (accelerate's name for full precision) means "no", not "False"."""
    for key, kind, in_list in _schema_fields(Config):
        if kind not in (str, Optional[str]) or in_list:  # list items are merged one by one
            continue
        value = OmegaConf.select(user, key)
        if isinstance(value, bool):
            OmegaConf.update(user, key, "yes" if value else "no")


def nearest(key: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _merge(schema_cfg, user_cfg, valid: list[str], prefix: str = ""):
    try:
        return OmegaConf.merge(schema_cfg, user_cfg)
    except OmegaConfBaseException as e:
        key = prefix + (e.full_key or "")
        if "not in struct" in str(e) or "Key '" in str(e) and "not in" in str(e):
            raise ConfigError(f"unknown config key {key!r}{nearest(key, valid)}") from None
        msg = str(e).splitlines()[0]
        raise ConfigError(f"bad value for config key {key!r}: {msg}") from None


def _load_yaml(path: Path, seen: tuple = ()) -> DictConfig:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path} (give an existing YAML file with --config)")
    if path.resolve() in seen:
        raise ConfigError(f"config include cycle through {path}")
    try:
        cfg = OmegaConf.load(path)
    except Exception as e:  # yaml syntax errors come in many types
        raise ConfigError(f"cannot parse {path}: {str(e).splitlines()[0]}") from None
    includes = cfg.pop("include", None) or []
    merged = OmegaConf.create()
    for inc in [includes] if isinstance(includes, str) else includes:
        inc_path = path.parent / inc
        if not inc_path.is_file():
            raise ConfigError(f"{path}: included file not found: {inc_path}")
        merged = OmegaConf.merge(merged, _load_yaml(inc_path, seen + (path.resolve(),)))
    return OmegaConf.merge(merged, cfg)


def _apply_overrides(user: DictConfig, overrides: list[str]) -> DictConfig:
    """Apply ``key=value`` items in order; ``ema.averages.0.decay=0.99`` sets a field of list element 0."""
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        try:
            value = OmegaConf.from_dotlist([f"value={text}"])["value"]
        except Exception as e:  # yaml and grammar errors come in many types
            raise ConfigError(f"cannot parse override {item!r}: {str(e).splitlines()[0]}") from None
        _check_list_path(user, key)
        try:
            OmegaConf.update(user, key, value, merge=True, force_add=True)
        except OmegaConfBaseException as e:
            raise ConfigError(f"override {item!r}: {str(e).splitlines()[0]}") from None
    return user


def _check_list_path(user: DictConfig, key: str) -> None:
    """A numeric part of ``key`` indexes a list: the list must be set (by a file or an earlier override) and
    long enough, since a list element cannot be created alone."""
    parts = key.split(".")
    for i, part in enumerate(parts[1:], start=1):
        if not part.isdigit():
            continue
        parent = ".".join(parts[:i])
        items = OmegaConf.select(user, parent)
        if not isinstance(items, ListConfig) or int(part) >= len(items):
            have = f"{len(items)} elements" if isinstance(items, ListConfig) else "no list set"
            raise ConfigError(f"override {key}: {parent} has no element {part} ({have} here); set the whole list, "
                              f"e.g. {parent}=[{{...}}], in the config file or an earlier override")


_LIST_SECTIONS = {"ema.averages": EMASpec}  # lists of typed items, checked one by one for precise errors
_CHOICES = {"train.mixed_precision": ("no", "bf16", "fp16"), "teacher.dtype": (None, "bf16", "fp16", "fp32"),
            "ema.update": ("generator", "every"), "student_optim.optimizer": ("adamw", "adamw8bit"),
            "critic_optim.optimizer": ("adamw", "adamw8bit"),
            "eval.teacher_sampler": ("euler", "heun"), "eval.renoise": (None, "sde", "ode")}


def _check_list_items(user: DictConfig) -> None:
    for key, schema in _LIST_SECTIONS.items():
        items = OmegaConf.select(user, key)
        for i, item in enumerate(items if isinstance(items, ListConfig) else []):
            prefix = f"{key}[{i}]."
            _merge(OmegaConf.structured(schema), item, [prefix + k for k in _valid_keys(schema)], prefix)


def _check_values(cfg: Config) -> None:
    """Checks that span several keys or restrict a string to a set of choices."""
    for key, choices in _CHOICES.items():
        value = OmegaConf.select(OmegaConf.structured(cfg), key)
        if value not in choices:
            hint = nearest(str(value), list(choices))
            raise ConfigError(f"bad value for config key {key!r}: {value!r}{hint}; "
                              f"choose one of {', '.join(choices)}")
    names = [spec.name for spec in cfg.ema.averages]
    for i, spec in enumerate(cfg.ema.averages):
        given = [k for k in ("decay", "half_life_kimg", "sigma_rel") if getattr(spec, k) is not None]
        if len(given) != 1:
            raise ConfigError(f"ema.averages[{i}] ({spec.name!r}) needs exactly one of decay, "
                              f"half_life_kimg, sigma_rel; got {', '.join(given) or 'none'}")
        if names.count(spec.name) > 1:
            raise ConfigError(f"ema.averages: the name {spec.name!r} is used twice; give each its own name")
    if cfg.eval.ema is not None and cfg.eval.ema not in names:
        hint = nearest(cfg.eval.ema, names)
        raise ConfigError(f"eval.ema={cfg.eval.ema!r} names no ema.averages entry{hint}; "
                          f"defined: {', '.join(names) or 'none'}")
    if cfg.generator.times and cfg.generator.noise_level is not None:
        raise ConfigError("generator.times and generator.noise_level both set the student's time; keep one")
    if cfg.generator.noise_level is not None and cfg.generator.noise_level <= 0:
        raise ConfigError(f"generator.noise_level must be positive (sigma/alpha), got {cfg.generator.noise_level}")
    if cfg.train.batch_size < 1 or cfg.checkpoint.keep_last < 1:
        raise ConfigError("train.batch_size and checkpoint.keep_last must be at least 1")


def batch_layout(train: TrainConfig, num_processes: int) -> tuple[int, int]:
    """``(device_batch_size, accumulation_steps)`` so that processes x accumulation x device batch = batch."""
    device = train.device_batch_size or train.batch_size // num_processes
    micro = device * num_processes
    if device < 1 or train.batch_size % micro:
        raise ConfigError(f"train.batch_size={train.batch_size} is not a multiple of {num_processes} "
                          f"processes x train.device_batch_size={device}; change either")
    return device, train.batch_size // micro


def section_options(section, options_cls, prefix: str) -> Any:
    """The mapping ``section`` (keys under ``prefix``) as an ``options_cls`` dataclass, rejecting unknown keys."""
    valid = [prefix + k for k in _valid_keys(options_cls)]
    merged = _merge(OmegaConf.structured(options_cls), OmegaConf.create(dict(section)), valid, prefix=prefix)
    return OmegaConf.to_object(merged)


def read_config(path: str | None, overrides: list[str] = ()) -> Config:
    """Load, merge and validate every section but ``objective``, which stays the user's mapping (its schema is
    the chosen objective's options: :func:`fdistill.recipes.load_config`)."""
    schema = OmegaConf.structured(Config)
    valid = _valid_keys(Config)
    user = _apply_overrides(_load_yaml(Path(path)) if path else OmegaConf.create(), list(overrides))
    _restore_words(user)
    objective = user.pop("objective", None)
    _check_list_items(user)
    cfg = _merge(schema, user, valid)
    if objective is not None:
        cfg.objective = objective
    cfg = OmegaConf.to_object(cfg)
    _check_values(cfg)
    if path and cfg.run.dir is None:
        cfg.run.dir = str(Path("runs") / Path(path).stem)
    return cfg


def dump_config(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
