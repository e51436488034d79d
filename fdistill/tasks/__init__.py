"""Tasks: what a run trains on and how it is judged. :func:`build_task` is the only place that asks what kind
of teacher a run has."""

from __future__ import annotations

from fdistill.config import Config
from fdistill.errors import ConfigError
from fdistill.networks.denoisers import Denoiser, GaussianMixtureDenoiser, UNetDenoiser
from fdistill.pipelines.transformers import TransformerDenoiser
from fdistill.tasks import images, text_to_image
from fdistill.tasks.base import Task, check_sample_counts
from fdistill.tasks.images import ImageTask
from fdistill.tasks.text_to_image import TextToImageTask
from fdistill.tasks.toy import ToyTask

__all__ = ["Task", "ImageTask", "TextToImageTask", "ToyTask", "build_task", "check_inputs"]


def build_task(cfg: Config, teacher: Denoiser) -> Task:
    """The task of a run whose (unguided) teacher is ``teacher``."""
    if isinstance(teacher, GaussianMixtureDenoiser):
        return ToyTask(cfg, teacher)
    if isinstance(teacher, (UNetDenoiser, TransformerDenoiser)):
        return TextToImageTask(cfg, teacher) if teacher.text_conditioned else ImageTask(cfg, teacher)
    raise ConfigError(f"teacher.kind={cfg.teacher.kind!r} gives a {type(teacher).__name__} teacher, for which "
                      "fdistill has no task yet; use a diffusers UNet or transformer teacher, or an analytic one")


def check_inputs(cfg: Config, teacher: Denoiser, needs_real_data: bool) -> None:
    """What the configuration and the data files decide about the task of ``teacher`` (which may be built on the
    meta device), checked before any weight loads."""
    if isinstance(teacher, (UNetDenoiser, TransformerDenoiser)):
        if teacher.text_conditioned:
            text_to_image.check_inputs(cfg, needs_real_data)
        else:
            check_sample_counts(cfg, images.fd_features(cfg))
