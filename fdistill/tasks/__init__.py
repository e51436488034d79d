"""Tasks: what a run trains on and how it is judged. :func:`build_task` is the only place that asks what kind
of teacher a run has."""

from __future__ import annotations

from fdistill.config import Config, ConfigError
from fdistill.denoisers import Denoiser, GaussianMixtureDenoiser, UNetDenoiser
from fdistill.tasks.base import Task
from fdistill.tasks.images import ImageTask
from fdistill.tasks.toy import ToyTask

__all__ = ["Task", "ImageTask", "ToyTask", "build_task"]


def build_task(cfg: Config, teacher: Denoiser) -> Task:
    """The task of a run whose (unguided) teacher is ``teacher``."""
    if isinstance(teacher, GaussianMixtureDenoiser):
        return ToyTask(cfg, teacher)
    if isinstance(teacher, UNetDenoiser) and not teacher.text_conditioned:
        return ImageTask(cfg, teacher)
    kind = "text-conditioned UNet" if isinstance(teacher, UNetDenoiser) else type(teacher).__name__
    raise ConfigError(f"teacher.kind={cfg.teacher.kind!r} gives a {kind} teacher, for which fdistill has no task "
                      "yet; use a class-conditional or unconditional UNet2DModel teacher or an analytic one")
