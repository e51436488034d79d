"""What a run trains on and how it is judged, by kind of teacher and data: the only place that knows them.

* an analytic 2-D teacher (``teacher.kind=ring``) trains on its own exact samples and is judged by mode
  statistics and energy distance;
* a UNet teacher trains on an image set (``data.kind``: digits, shapes or an image folder) whose class labels
  condition a class-conditional teacher, and is judged by FD against the data (``eval.reference``) in a
  feature network's space (``eval.features``), plus label accuracy and class coverage from the shipped digits
  classifier when the data are the digits.
"""

from __future__ import annotations

from pathlib import Path

import torch

from fdistill.config import Config, ConfigError
from fdistill.data.images import IMAGE_DATASETS, ImageBatches, build_image_dataset
from fdistill.data.toy import TeacherSamples
from fdistill.denoisers import GaussianMixtureDenoiser, UNetDenoiser
from fdistill.evaluation import ImageProtocol, evaluate_images, evaluate_toy
from fdistill.objectives import Networks, Objective

PREVIEW_ROWS = 4


def image_dataset(cfg: Config, teacher: UNetDenoiser):
    """The run's image data set, at the teacher's resolution and channel count."""
    kind = cfg.data.kind
    channels, size = teacher.sample_shape[0], teacher.sample_shape[-1]
    if kind not in IMAGE_DATASETS:
        raise ConfigError(f"data.kind={kind!r} is not an image data set; choose one of {', '.join(IMAGE_DATASETS)}")
    if kind == "folder" and not cfg.data.path:
        raise ConfigError("data.kind=folder needs data.path=<directory of PNG/JPEG images>")
    kwargs = {"digits": {"size": size}, "shapes": {"size": size},
              "folder": {"root": cfg.data.path, "size": size, "channels": channels}}[kind]
    try:
        dataset = build_image_dataset(kind, **kwargs)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"data: {str(e).splitlines()[0]}") from None
    if dataset.channels != channels:
        raise ConfigError(f"data.kind={kind} has {dataset.channels}-channel images but the teacher takes "
                          f"{channels}; use data with the teacher's channels")
    classes = num_condition_classes(teacher)
    if classes is not None and not getattr(dataset, "num_classes", 0):
        raise ConfigError(f"the teacher is class-conditional but data.kind={kind} has no classes; put the "
                          "images in one sub-folder per class")
    if classes is not None and dataset.num_classes > classes:
        raise ConfigError(f"the data have {dataset.num_classes} classes but the teacher knows {classes}")
    return dataset


def num_condition_classes(teacher: UNetDenoiser) -> int | None:
    """Class embeddings of a class-conditional UNet teacher (``None`` when it is not)."""
    return getattr(teacher.unet.config, "num_class_embeds", None)


def _check_image_teacher(cfg: Config, nets: Networks) -> UNetDenoiser:
    teacher = nets.teacher
    if not isinstance(teacher, UNetDenoiser) or teacher.text_conditioned:
        raise ConfigError(f"teacher.kind={cfg.teacher.kind!r} has no image task; image runs need a "
                          "class-conditional or unconditional UNet2DModel teacher")
    return teacher


def training_batches(cfg: Config, nets: Networks, objective: Objective):
    """An endless iterator of :class:`~fdistill.objectives.Batch` for this run."""
    if isinstance(nets.teacher, GaussianMixtureDenoiser):
        if cfg.data.kind != "teacher":
            raise ConfigError(f"data.kind={cfg.data.kind!r} is not available for an analytic teacher; use teacher")
        return iter(TeacherSamples(nets.teacher, cfg.train.batch_size, objective.needs_real_data))
    teacher = _check_image_teacher(cfg, nets)
    dataset = image_dataset(cfg, teacher)
    conditional = num_condition_classes(teacher) is not None
    return iter(ImageBatches(dataset, cfg.train.batch_size, objective.needs_real_data, conditional))


def image_protocol(cfg: Config, nets: Networks, samples_dir: Path | None, progress: bool = False):
    """The evaluation protocol of an image run (see :class:`~fdistill.evaluation.ImageProtocol`)."""
    teacher = _check_image_teacher(cfg, nets)
    dataset = image_dataset(cfg, teacher)
    ec = cfg.eval
    digits = cfg.data.kind == "digits"
    reference = ec.reference or ("digits" if digits else cfg.data.path if cfg.data.kind == "folder" else
                                 torch.stack([dataset[i][0] for i in range(min(len(dataset), ec.num_samples))]))
    features = ec.features or ("fdistill-digits" if digits else "inception")
    num_classes = getattr(dataset, "num_classes", None) if num_condition_classes(teacher) else None
    labels = None if num_classes is None else torch.arange(ec.num_samples) % num_classes
    classifier = None
    if digits and features == "fdistill-digits":
        from fdistill.metrics.features import load_digits_classifier

        classifier = load_digits_classifier()
    return ImageProtocol(ec.num_samples, ec.seed, ec.batch_size, labels, reference, features, classifier,
                         num_classes or getattr(dataset, "num_classes", None), samples_dir, progress)


def evaluate(cfg: Config, nets: Networks, run_dir: Path, progress: bool = False) -> list[dict]:
    """The metrics.json ``results``: one entry per sampler (student step counts, then the teacher)."""
    if isinstance(nets.teacher, GaussianMixtureDenoiser):
        return evaluate_toy(nets, cfg.eval)
    protocol = image_protocol(cfg, nets, run_dir / "samples" if cfg.eval.save_samples else None, progress)
    return evaluate_images(nets, cfg.eval, protocol)


@torch.no_grad()
def preview(cfg: Config, nets: Networks, path: Path) -> None:
    """Training previews: one-step student samples, one class per column, on the eval seed; 2-D data get a
    scatter plot of student over teacher samples."""
    from fdistill.training.logging import scatter_preview

    if not isinstance(nets.teacher, UNetDenoiser):
        return scatter_preview(cfg, nets, path)
    from torchvision.utils import save_image

    classes = num_condition_classes(nets.teacher)
    columns = min(classes - 1, 10) if classes else 8
    n = PREVIEW_ROWS * columns
    device = next(nets.student.parameters()).device
    g = torch.Generator().manual_seed(cfg.eval.seed)
    cond = (torch.arange(n) % columns).to(device) if classes else None
    x = nets.student(nets.student.noise(n, generator=g).to(device), cond).float().cpu()
    save_image((x.clamp(-1, 1) + 1) / 2, path, nrow=columns, padding=1, pad_value=1.0)


def training_metrics(cfg: Config, nets: Networks) -> dict[str, float]:
    """Training-time metrics (``log.fd_every``): the FD of ``log.fd_samples`` one-step student samples (labels
    ``i % K``, eval seed) against the run's reference, in the evaluation's feature network and preprocessing.
    Far fewer samples than the final evaluation, so only its trend is meaningful. Analytic teachers log nothing
    here."""
    if isinstance(nets.teacher, GaussianMixtureDenoiser):
        return {}
    from fdistill.evaluation import student_samples
    from fdistill.metrics.fid import frechet_distance_to_reference

    protocol, feature_net, reference = _training_reference(cfg, nets)
    n = cfg.log.fd_samples
    labels = None if protocol.labels is None else torch.arange(n) % protocol.num_classes
    x = student_samples(nets, n, 1, cfg.eval.seed, cond=labels, batch_size=cfg.eval.batch_size)
    fd = frechet_distance_to_reference(x.clamp(-1, 1), reference, feature_net, backend="clean")
    return {"eval/fd": fd["value"]}


_TRAINING_REFERENCE: dict = {}  # one entry: the protocol, feature net and reference statistics of the current run


def _training_reference(cfg: Config, nets: Networks):
    """Computed once per run rather than at every ``log.fd_every`` step (a folder reference may be large)."""
    from fdistill.metrics.fid import load_feature_net, reference_statistics

    key = (cfg.data.kind, cfg.data.path, cfg.eval.reference, cfg.eval.features, cfg.eval.num_samples,
           tuple(nets.teacher.sample_shape))
    if key not in _TRAINING_REFERENCE:
        protocol = image_protocol(cfg, nets, None)
        feature_net = load_feature_net(protocol.features)
        reference = reference_statistics(protocol.reference, feature_net, "clean", progress=False)
        _TRAINING_REFERENCE.clear()
        _TRAINING_REFERENCE[key] = (protocol, feature_net, reference)
    return _TRAINING_REFERENCE[key]
