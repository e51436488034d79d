"""The image task: a diffusers UNet teacher (class-conditional or unconditional), or a class-conditional latent
transformer (``DiTPipeline``: the network works on the latents of its pipeline's VAE), and an image data set.

Training batches come from ``data.kind`` (digits, shapes or an image folder), whose class labels condition a
class-conditional teacher, drawn in the data's own class proportions or in ``data.class_frequencies``. With
``data.unconditional`` every network gets the teacher's null class instead, and the student chooses its own class
frequencies. The run is judged by FD against the data (``eval.reference``) in a feature network's space
(``eval.features``), plus class frequencies, label accuracy and class coverage from the shipped digits classifier
when the data are the digits, and for unconditional samplers the total-variation distances of their class
frequencies to the data's and the teacher's, and per-class diversity for class-conditional runs
(:class:`~fdistill.evaluation.images.ImageJudge` in the one sampler loop); the student exports as a diffusers
pipeline. A latent teacher's real images are VAE-encoded once per run, and every sample is decoded before it is
judged or shown.
"""

from __future__ import annotations

from contextlib import nullcontext
from functools import cached_property
from pathlib import Path

import torch

from fdistill.containers import Networks
from fdistill.data.images import (
    IMAGE_DATASETS,
    ImageBatches,
    build_image_dataset,
    normalised_frequencies,
    reference_images,
)
from fdistill.errors import ConfigError
from fdistill.evaluation.images import ImageJudge, upscaled_grid
from fdistill.evaluation.loop import evaluate_samplers
from fdistill.evaluation.sampling import student_samples
from fdistill.networks.denoisers import Denoiser, UNetDenoiser
from fdistill.pipelines.parts import LatentPipelineParts
from fdistill.tasks.base import Task, check_sample_counts
from fdistill.teachers import frozen_dtype, teacher_directory

PREVIEW_ROWS = 4
DECODE_BATCH = 64  # latents decoded at a time, at most


class ImageTask(Task):
    teacher: UNetDenoiser
    unread = {**{f"model.{name}": "the MLPs of analytic teachers read it; image students copy the teacher's UNet"
                 for name in ("hidden", "depth", "sigma_data")},
              **{key: "text-to-image runs read it" for key in
                 ("teacher.negative_prompt", "teacher.max_sequence_length", "eval.clip_model",
                  "eval.clip_pretrained")}}

    def __init__(self, cfg, teacher: Denoiser):
        super().__init__(cfg, teacher)
        located = teacher_directory(cfg)
        self.parts = None  # the VAE of a latent teacher's pipeline
        if located is not None and (located[0] / "vae").is_dir():
            self.parts = LatentPipelineParts.load(*located, teacher.network, dtype=frozen_dtype(cfg))
        if cfg.data.cache_dir and self.parts is None:
            raise ConfigError("data.cache_dir keeps what a latent pipeline's VAE and text encoders compute, and this "
                              "teacher works on pixels; remove it")
        if cfg.data.cache_dir:
            self.parts.cache_in(cfg.data.cache_dir)

    def trainable_copy(self) -> Denoiser:
        return self.teacher.copy_network().train().requires_grad_(True)

    @property
    def image_shape(self) -> tuple[int, int]:
        """``(channels, size)`` of the data's images: the teacher's own, or its VAE's images for a latent one."""
        if self.parts is None:
            return self.teacher.sample_shape[0], self.teacher.sample_shape[-1]
        vae = self.parts.vae.config
        return vae.in_channels, self.teacher.sample_shape[-1] * self.parts.vae_scale_factor

    def to_images(self, x: torch.Tensor) -> torch.Tensor:
        """Samples of the networks as images in [-1, 1]: decoded by the VAE for a latent teacher."""
        if self.parts is None:
            return x
        return self.parts.decode_all(x, DECODE_BATCH)

    def condition_probe(self, n: int) -> torch.Tensor | None:
        return None if self.teacher.num_class_embeds is None else torch.zeros(n, dtype=torch.long)

    @property
    def null_label(self) -> int | None:
        """The condition of every sample of a ``data.unconditional`` run (the teacher's null class), else ``None``."""
        if not self.cfg.data.unconditional:
            return None
        return int(self.teacher.null_condition(torch.zeros(1, dtype=torch.long))[0])

    def conditions(self, n: int) -> torch.Tensor | None:
        """The conditions of ``n`` evaluation samples: labels ``i % K`` for a class-conditional run, the null class
        for a ``data.unconditional`` one, ``None`` for an unconditional teacher."""
        if self.teacher.num_class_embeds is None:
            return None
        if self.null_label is not None:
            return torch.full((n,), self.null_label, dtype=torch.long)
        return torch.arange(n) % self.dataset.num_classes

    @cached_property
    def dataset(self):
        """The run's image data set, at the teacher's resolution and channel count."""
        cfg, teacher = self.cfg, self.teacher
        kind = cfg.data.kind
        channels, size = self.image_shape
        if kind not in IMAGE_DATASETS:
            raise ConfigError(f"data.kind={kind!r} is not an image data set; choose one of "
                              f"{', '.join(IMAGE_DATASETS)}")
        if kind == "folder" and not cfg.data.path:
            raise ConfigError("data.kind=folder needs data.path=<directory of PNG/JPEG images>")
        if kind != "folder" and cfg.data.path:
            raise ConfigError(f"data.path is read only with data.kind=folder, not {kind}; remove it or set "
                              "data.kind=folder")
        kwargs = {"digits": {"size": size}, "shapes": {"size": size},
                  "folder": {"root": cfg.data.path, "size": size, "channels": channels}}[kind]
        try:
            dataset = build_image_dataset(kind, **kwargs)
        except (FileNotFoundError, ValueError) as e:
            raise ConfigError(f"data: {str(e).splitlines()[0]}") from None
        if dataset.channels != channels:
            raise ConfigError(f"data.kind={kind} has {dataset.channels}-channel images but the teacher takes "
                              f"{channels}; use data with the teacher's channels")
        classes = teacher.num_class_embeds
        if classes is not None and not getattr(dataset, "num_classes", 0):
            raise ConfigError(f"the teacher is class-conditional but data.kind={kind} has no classes; put the "
                              "images in one sub-folder per class")
        if classes is not None and dataset.num_classes > classes:
            raise ConfigError(f"the data have {dataset.num_classes} classes but the teacher knows {classes}")
        if cfg.data.unconditional and classes is None:
            raise ConfigError("data.unconditional: the teacher takes no class labels, so the run is unconditional "
                              "already; remove it")
        if cfg.data.unconditional and (cfg.teacher.guidance_scale != 1.0 or cfg.teacher.guidance_interval):
            raise ConfigError("teacher.guidance_scale guides towards a class, and a data.unconditional run gives the "
                              "teacher none; remove the guidance or data.unconditional")
        if cfg.data.class_frequencies is not None and not getattr(dataset, "num_classes", 0):
            raise ConfigError(f"data.class_frequencies needs classes but {cfg.data.path} has none; put the images "
                              "in one sub-folder per class")
        return dataset

    @cached_property
    def data_class_frequencies(self) -> torch.Tensor | None:
        """The class frequencies training images are drawn with: ``data.class_frequencies`` normalised, else the
        data's own label proportions; ``None`` for data without classes."""
        dataset, given = self.dataset, self.cfg.data.class_frequencies
        num_classes = getattr(dataset, "num_classes", 0)
        if not num_classes:
            return None
        if given is None:
            return torch.bincount(dataset.labels, minlength=num_classes).double() / len(dataset)
        try:
            return normalised_frequencies(given, num_classes)
        except ValueError as e:
            raise ConfigError(f"data.class_frequencies: {e} (data.kind={self.cfg.data.kind})") from None

    @property
    def features(self) -> str:
        return fd_features(self.cfg)

    def batches(self, needs_real_data: bool, device=None):
        """Batches of the data set (a latent teacher's as VAE latents, encoded on ``device``, or read from
        ``data.cache_dir``)."""
        check_sample_counts(self.cfg, self.features)
        conditional = self.teacher.num_class_embeds is not None
        frequencies = None if self.cfg.data.class_frequencies is None else self.data_class_frequencies
        if self.parts is None or not needs_real_data:
            data = self.dataset
        else:
            with self.parts.on(device):
                data = self.latent_dataset
        try:
            batches = ImageBatches(data, self.cfg.train.batch_size, needs_real_data, conditional,
                                   frequencies, self.null_label)
        except ValueError as e:
            raise ConfigError(f"data.class_frequencies: {e}") from None
        return iter(batches)

    @cached_property
    def latent_dataset(self) -> LatentImages:
        """The data set's images as VAE latents (posterior samples, seeded by ``run.seed``), with its labels."""
        g = torch.Generator().manual_seed(self.cfg.run.seed)
        images = self.dataset.images if hasattr(self.dataset, "images") else \
            torch.stack([self.dataset[i][0] for i in range(len(self.dataset))])
        latents = self.parts.encode_all(images, g)
        return LatentImages(latents, self.dataset.labels, getattr(self.dataset, "num_classes", 0))

    def judge(self) -> ImageJudge:
        """What every sampler of this run is judged under (see :class:`~fdistill.evaluation.images.ImageJudge`):
        unconditional samplers judged by the digits classifier also get the TVs of their class frequencies to the
        data's and the teacher's."""
        cfg, dataset, ec = self.cfg, self.dataset, self.cfg.eval
        digits = cfg.data.kind == "digits"
        default_reference = ("digits" if digits else cfg.data.path if cfg.data.kind == "folder" else
                             torch.stack([dataset[i][0] for i in range(min(len(dataset), ec.num_samples))]))
        features = self.features
        classifier = None
        if digits and features == "fdistill-digits":
            from fdistill.metrics.features import load_digits_classifier

            classifier = load_digits_classifier()
        conditions = self.conditions(ec.num_samples)
        labels = conditions if self.null_label is None else None  # the null class asks for no class
        unconditional_classes = labels is None and classifier is not None
        return ImageJudge(conditions, labels, reference_images(ec.reference or default_reference), features,
                          classifier, getattr(dataset, "num_classes", None),
                          None if self.parts is None else self.to_images,
                          self.data_class_frequencies if unconditional_classes else None, ec.batch_size)

    def decoder_on(self, device):
        """A latent teacher's VAE on ``device`` inside the block (it is kept off the accelerator otherwise)."""
        return nullcontext() if self.parts is None else self.parts.on(device)

    def evaluate(self, nets: Networks, run_dir: Path, progress: bool = False) -> list[dict]:
        """The sampler loop with the image judge (:meth:`judge`)."""
        with self.decoder_on(nets.device):
            return evaluate_samplers(nets, self.cfg.eval, self.judge(), run_dir, progress)

    @torch.no_grad()
    def preview(self, nets: Networks, path: Path) -> None:
        """One-step student samples on the eval seed, one class per column."""
        from torchvision.utils import save_image

        classes = self.teacher.num_class_embeds
        columns = min(classes - 1, 10) if classes else 8
        n = PREVIEW_ROWS * columns
        g = torch.Generator().manual_seed(self.cfg.eval.seed)
        cond = None
        if classes:
            cond = (torch.arange(n) % columns if self.null_label is None else self.conditions(n)).to(nets.device)
        student = nets.student.servable()
        with self.decoder_on(nets.device):
            x = self.to_images(student(student.noise(n, generator=g).to(nets.device), cond).float().cpu())
        save_image(upscaled_grid(x, columns), path)

    def training_metrics(self, nets: Networks) -> dict[str, float]:
        """The FD of ``log.fd_samples`` one-step student samples (the evaluation's conditions, eval seed) against
        the run's reference, in the evaluation's feature network and preprocessing. Far fewer samples than the
        final evaluation, so only its trend is meaningful."""
        from fdistill.metrics.fid import frechet_distance_to_reference

        feature_net, reference = self._training_reference
        n = self.cfg.log.fd_samples
        with self.decoder_on(nets.device):
            x = self.to_images(student_samples(nets, n, 1, self.cfg.eval.seed, cond=self.conditions(n),
                                               batch_size=self.cfg.eval.batch_size))
        fd = frechet_distance_to_reference(x.clamp(-1, 1), reference, feature_net, backend="clean")
        return {"eval/fd": fd["value"]}

    @cached_property
    def _training_reference(self):
        """The evaluation's feature network and reference statistics, computed once per run rather than at every
        ``log.fd_every`` step (a folder reference may be large)."""
        judge = self.judge()
        return judge.feature_net, judge.reference_statistics

    def export(self, student, out_dir: Path, metadata: dict, in_place: bool = False) -> Path:
        from fdistill.pipelines.export import export_pipeline

        return export_pipeline(student, out_dir, metadata, self.parts, in_place)


class LatentImages:
    """Latents of a labelled image data set, in memory: what :class:`~fdistill.data.images.ImageBatches` draws
    real samples from for a latent teacher."""

    def __init__(self, latents: torch.Tensor, labels: torch.Tensor, num_classes: int):
        self.images, self.labels, self.num_classes = latents, labels, num_classes

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return self.images[i], int(self.labels[i])


def fd_features(cfg) -> str:
    """The feature network of the FD: ``eval.features``, by default the digits classifier on the digits."""
    return cfg.eval.features or ("fdistill-digits" if cfg.data.kind == "digits" else "inception")
