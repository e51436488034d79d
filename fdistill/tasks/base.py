"""The task interface: what a run trains on and how it is judged, chosen once per run by ``build_task``."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch

from fdistill.config import Config
from fdistill.containers import Batch, Networks
from fdistill.errors import ConfigError
from fdistill.networks.denoisers import Denoiser


class Task:
    """One kind of distillation problem (analytic 2-D mixtures, class-conditional images, ...).

    A task owns everything that depends on the kind of teacher and data: the networks a student and a fake score
    start from, the training batches, the end-of-run evaluation, previews, training-time metrics and whether the
    student exports as a diffusers pipeline. The run builds it and hands the trainer its hooks; the trainer and
    the objectives never see it. ``teacher`` is the unguided frozen teacher; ``Networks.teacher`` (what the
    methods below receive) may wrap it in guidance.
    """

    unread: dict[str, str] = {}  # config keys this task does not read -> who does
    # guidance's unconditional input for a batch of conditions (a text task's negative prompt); None: the
    # network's own null condition
    unconditional = None

    def __init__(self, cfg: Config, teacher: Denoiser):
        self.cfg, self.teacher = cfg, teacher
        defaults = Config()
        for key, reader in self.unread.items():
            section, name = key.split(".")
            if getattr(getattr(cfg, section), name) != getattr(getattr(defaults, section), name):
                raise ConfigError(f"{key} is not read by a teacher.kind={cfg.teacher.kind} run ({reader}); "
                                  "remove it")

    def trainable_copy(self) -> Denoiser:
        """A fresh trainable network to start a student or a fake score from."""
        raise NotImplementedError

    def condition_probe(self, n: int) -> torch.Tensor | None:
        """``n`` valid conditions (any values) for a shape probe of the teacher, or ``None``."""
        return None

    def batches(self, needs_real_data: bool, device: torch.device | None = None) -> Iterator[Batch]:
        """An endless iterator of global training batches (real samples only when ``needs_real_data``); frozen
        encoders that prepare them (a VAE, text encoders) run on ``device`` (default: where they are)."""
        raise NotImplementedError

    def evaluate(self, nets: Networks, run_dir: Path, progress: bool = False) -> list[dict]:
        """The ``results`` of ``metrics.json``: one entry per sampler (student step counts, then the teacher)."""
        raise NotImplementedError

    def preview(self, nets: Networks, path: Path) -> None:
        """Write a picture of student samples to ``path`` (the trainer calls it every ``log.sample_every``)."""

    def training_metrics(self, nets: Networks) -> dict[str, float]:
        """Metrics logged during training (the trainer calls it every ``log.fd_every`` steps)."""
        return {}

    def export(self, student, out_dir: Path, metadata: dict, in_place: bool = False) -> Path | None:
        """Write the student as a diffusers pipeline; ``None`` when this task's students have no such form.
        ``in_place``: the export is the last use of the networks, and may merge a LoRA student into the shared
        base's own weights (no second copy of the base)."""
        return None


def check_sample_counts(cfg, features: str, fd_during_training: bool = True) -> None:
    """An FD needs more images than its features have dimensions: refuse too few before training (the FDs of
    ``log.fd_every`` too, where the task reads it)."""
    from fdistill.metrics.fid import FEATURE_DIMS

    dim = FEATURE_DIMS.get(features)
    counts = {"eval.num_samples": cfg.eval.num_samples,
              "log.fd_samples": cfg.log.fd_samples if cfg.log.fd_every and fd_during_training else None}
    for key, n in counts.items():
        if dim is not None and n is not None and n <= dim:
            raise ConfigError(f"{key}={n} is too few images for an FD in {dim}-d {features} features; use "
                              f"at least {dim + 1}")
