"""A recipe, read: a YAML config with ``key=value`` overrides, checked against the schema
(:mod:`fdistill.config`) and its ``objective`` section against the chosen objective's options."""

from __future__ import annotations

from typing import Any

from omegaconf import OmegaConf

from fdistill.config import Config, nearest, read_config, section_options
from fdistill.errors import ConfigError
from fdistill.objectives import OBJECTIVES


def objective_options(section) -> Any:
    """The ``objective`` mapping as its registered options dataclass; an unknown name or key is an error."""
    name = section.get("name", "dmd")
    if name not in OBJECTIVES:
        raise ConfigError(f"unknown objective {name!r}{nearest(name, list(OBJECTIVES))}; "
                          f"choose one of {', '.join(sorted(OBJECTIVES))}")
    return section_options(section, OBJECTIVES[name][1], prefix="objective.")


def load_config(path: str | None, overrides: list[str] = ()) -> tuple[Config, Any]:
    """Load, merge and validate; returns ``(config, objective_options)``, with ``config.objective`` holding every
    option of the objective (defaults filled in)."""
    cfg = read_config(path, overrides)
    options = objective_options(cfg.objective)
    cfg.objective = OmegaConf.to_container(OmegaConf.structured(options))
    return cfg, options
