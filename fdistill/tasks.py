"""What a run trains on and how it is judged, by kind of teacher: the only place that knows the data kinds."""

from __future__ import annotations

from pathlib import Path

from fdistill.config import Config, ConfigError
from fdistill.data.toy import TeacherSamples
from fdistill.denoisers import GaussianMixtureDenoiser
from fdistill.evaluation import evaluate_toy
from fdistill.objectives import Networks, Objective


def training_batches(cfg: Config, nets: Networks, objective: Objective):
    """An endless iterator of :class:`~fdistill.objectives.Batch` for this run."""
    if isinstance(nets.teacher, GaussianMixtureDenoiser) and cfg.data.kind == "teacher":
        return TeacherSamples(nets.teacher, cfg.train.batch_size, objective.needs_real_data)
    raise ConfigError(f"data.kind={cfg.data.kind!r} is not available for teacher.kind={cfg.teacher.kind!r}")


def evaluate(cfg: Config, nets: Networks, run_dir: Path) -> list[dict]:
    """The metrics.json ``results``: one entry per sampler (student step counts, then the teacher)."""
    if isinstance(nets.teacher, GaussianMixtureDenoiser):
        return evaluate_toy(nets, cfg.eval)
    raise ConfigError(f"no evaluation is defined for teacher.kind={cfg.teacher.kind!r}")
