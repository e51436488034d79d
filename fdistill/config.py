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
from typing import Any, Dict, List, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException


class ConfigError(ValueError):
    """A problem with the user's configuration; its message is one line that names the fix."""


@dataclass
class RunConfig:
    dir: Optional[str] = None  # default: runs/<config file stem>
    seed: int = 0


@dataclass
class TeacherConfig:
    kind: str = "ring"  # ring (analytic 2-D mixture) | unet (built from `unet`) | pretrained | embedded
    schedule: str = "edm"  # schedule of analytic teachers: edm | vp | rf | trigflow
    num_modes: int = 8
    radius: float = 2.0
    std: float = 0.1
    weights: Optional[List[float]] = None
    pretrained: Optional[str] = None  # hub id or local directory of a diffusers model / pipeline
    prediction_type: Optional[str] = None  # overrides the scheduler's prediction_type
    unet: Dict[str, Any] = field(default_factory=dict)  # UNet2DModel config for kind=unet


@dataclass
class ModelConfig:
    """Networks built from scratch when the teacher has no architecture to copy (analytic teachers)."""

    hidden: int = 128
    depth: int = 3
    sigma_data: float = 1.0


@dataclass
class GeneratorConfig:
    times: Optional[List[float]] = None  # sampling times t_0 > t_1 > ...; default [teacher t_max]


@dataclass
class OptimConfig:
    lr: float = 1e-4
    betas: List[float] = field(default_factory=lambda: [0.0, 0.999])
    weight_decay: float = 0.0
    grad_clip: Optional[float] = None


@dataclass
class DataConfig:
    kind: str = "teacher"  # teacher: exact samples of an analytic teacher | digits | shapes | folder
    path: Optional[str] = None


@dataclass
class TrainConfig:
    steps: int = 2000
    batch_size: int = 256
    log_every: int = 50


@dataclass
class EvalConfig:
    num_samples: int = 4000
    seed: int = 1234
    teacher_steps: int = 32
    teacher_sampler: str = "heun"
    student_steps: List[int] = field(default_factory=lambda: [1])
    renoise: str = "sde"


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    data: DataConfig = field(default_factory=DataConfig)
    objective: Dict[str, Any] = field(default_factory=lambda: {"name": "dmd"})
    student_optim: OptimConfig = field(default_factory=OptimConfig)
    critic_optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


def _valid_keys(schema, prefix: str = "") -> list[str]:
    keys = []
    for f in fields(schema):
        keys.append(prefix + f.name)
        default = f.default_factory() if callable(f.default_factory) else f.default  # type: ignore[misc]
        if is_dataclass(default):
            keys += _valid_keys(type(default), prefix + f.name + ".")
    return keys


def _nearest(key: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _merge(schema_cfg, user_cfg, valid: list[str], prefix: str = ""):
    try:
        return OmegaConf.merge(schema_cfg, user_cfg)
    except OmegaConfBaseException as e:
        key = prefix + (e.full_key or "")
        if "not in struct" in str(e) or "Key '" in str(e) and "not in" in str(e):
            raise ConfigError(f"unknown config key {key!r}{_nearest(key, valid)}") from None
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


def _parse_overrides(overrides: list[str]) -> DictConfig:
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
    try:
        return OmegaConf.from_dotlist(list(overrides))
    except Exception as e:
        raise ConfigError(f"cannot parse overrides: {str(e).splitlines()[0]}") from None


def validate_objective(section) -> Any:
    """Turn the ``objective`` mapping into its registered options dataclass, rejecting unknown keys."""
    from fdistill.objectives import OBJECTIVES

    name = section.get("name", "dmd")
    if name not in OBJECTIVES:
        raise ConfigError(f"unknown objective {name!r}{_nearest(name, list(OBJECTIVES))}; "
                          f"choose one of {', '.join(sorted(OBJECTIVES))}")
    options_cls = OBJECTIVES[name][1]
    schema = OmegaConf.structured(options_cls)
    valid = ["objective." + k for k in _valid_keys(options_cls)]
    merged = _merge(schema, OmegaConf.create(dict(section)), valid, prefix="objective.")
    return OmegaConf.to_object(merged)


def load_config(path: str | None, overrides: list[str] = ()) -> tuple[Config, Any]:
    """Load, merge and validate; returns ``(config, objective_options)``."""
    schema = OmegaConf.structured(Config)
    valid = _valid_keys(Config)
    user = _load_yaml(Path(path)) if path else OmegaConf.create()
    user = OmegaConf.merge(user, _parse_overrides(list(overrides)))
    objective = user.pop("objective", None)
    cfg = _merge(schema, user, valid)
    if objective is not None:
        cfg.objective = objective
    cfg = OmegaConf.to_object(cfg)
    options = validate_objective(cfg.objective)
    cfg.objective = OmegaConf.to_container(OmegaConf.structured(options))
    if path and cfg.run.dir is None:
        cfg.run.dir = str(Path("runs") / Path(path).stem)
    return cfg, options


def dump_config(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
