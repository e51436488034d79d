"""The image judge: FD in a feature network's space, class statistics from a classifier, per-class diversity, and
the student-vs-teacher grid; and the FD pieces the text judge shares.

FDs are computed on the samples' 8-bit quantisation (the values a PNG holds, so ``eval/fid.py`` on the written
folder reproduces the number) against reference statistics computed once per evaluation; Frechet distances on
~1000 samples are biased upward and only comparable within one protocol, which every entry records.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch

from fdistill.errors import ConfigError
from fdistill.evaluation.loop import Drawn, Judge, SampleSet
from fdistill.metrics.class_frequencies import class_frequencies, sampling_floor, total_variation
from fdistill.metrics.diversity import group_diversity

GRID_FILE = "student_vs_teacher.png"


def feature_statistics(pixels: torch.Tensor, feature_net):
    """The FD statistics of uint8 NCHW images in ``feature_net`` (clean-fid preprocessing), their features kept
    for the metrics that read them (per-condition diversity). Too few images for an FD is a one-line error naming
    ``eval.num_samples``."""
    from fdistill.metrics.fid import check_sample_count, compute_statistics

    stats = compute_statistics(pixels.permute(0, 2, 3, 1), feature_net, "clean", keep_features=True, progress=False)
    try:
        check_sample_count(stats, "samples")
    except ValueError as e:
        raise ConfigError(f"eval.num_samples={stats.num_samples}: {e}") from None
    return stats


def fd_fields(stats, reference) -> dict:
    """The FD of sample statistics ``stats`` to ``reference`` statistics, and what it was computed against."""
    from fdistill.metrics.fid import frechet_distance

    return {"fd": frechet_distance(stats.mu, stats.sigma, reference.mu, reference.sigma),
            "feature_net": stats.feature_net, "weights_hash": stats.weights_hash, "reference": reference.source,
            "num_reference": reference.num_samples}


def class_statistics(logits: torch.Tensor, labels: torch.Tensor | None, num_classes: int) -> dict:
    """``class_frequencies``: the fraction of the samples the classifier assigns to each class (its argmax);
    ``class_coverage``: the fraction of classes that receive at least half of their uniform share
    ``1 / (2 K)`` of the predictions, which flags dropped modes without punishing mild imbalance;
    ``class_accuracy``: the fraction classified as the label they were generated for (only given ``labels``)."""
    predicted = logits.argmax(1)
    frequencies = class_frequencies(predicted, num_classes)
    stats = {"class_frequencies": frequencies.tolist(),
             "class_coverage": float((frequencies >= 0.5 / num_classes).double().mean())}
    if labels is not None:
        stats["class_accuracy"] = float((predicted == labels).double().mean())
    return stats


@dataclass
class ImageJudge(Judge):
    """Images judged by FD against ``reference`` in ``features`` (a name or network), and, given a
    ``classifier`` (images in [-1, 1] to class logits), class statistics. ``conditions`` (one per sample, or
    ``None`` for unconditional teachers) condition student and teacher alike; ``labels`` (one per sample, or
    ``None``) are the classes the samples are asked for, which class accuracy and per-class diversity read: the
    conditions of a class-conditional run, ``None`` when every sample gets the null class. ``decode`` (optional)
    turns a latent model's output into images. ``data_frequencies`` (optional) are the data's class frequencies,
    which the class frequencies of unconditional samplers are compared with."""

    conditions: torch.Tensor | None
    labels: torch.Tensor | None
    reference: object
    features: object
    classifier: torch.nn.Module | None = None
    num_classes: int | None = None
    decode: Callable[[torch.Tensor], torch.Tensor] | None = None
    data_frequencies: torch.Tensor | None = None
    batch_size: int | None = None

    images = True

    @property
    def fields(self) -> dict:
        if self.conditions is None:
            labels = None
        elif self.labels is None:
            labels = f"the null class {int(self.conditions[0])} for every sample (unconditional)"
        else:
            labels = f"i % {self.num_classes} for sample i"
        return {"labels": labels}

    @cached_property
    def feature_net(self):
        from fdistill.metrics.fid import load_feature_net

        return load_feature_net(self.features)

    @cached_property
    def reference_statistics(self):
        """The reference's FD statistics (computed once: a folder reference may be large)."""
        from fdistill.metrics.fid import reference_statistics

        return reference_statistics(self.reference, self.feature_net, "clean", progress=False)

    def sample_sets(self, n: int) -> list[SampleSet]:
        return [SampleSet(self.conditions, self.labels, self.reference_statistics)]

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.decode is None else self.decode(x)

    def score(self, drawn: Drawn, sample_set: SampleSet) -> dict:
        stats = feature_statistics(drawn.pixels, self.feature_net)
        entry = fd_fields(stats, sample_set.reference)
        if self.classifier is not None:
            with torch.no_grad():
                logits = self.classifier(drawn.pixels.float() / 127.5 - 1)
            entry.update(class_statistics(logits, self.labels, self.num_classes))
        if self.labels is not None:
            entry["class_diversity"] = group_diversity(stats.features, self.labels)
        return entry

    def finish(self, sample_set: SampleSet, entries: list[dict], shown: dict[str, Drawn],
               samples_dir: Path | None) -> None:
        if self.data_frequencies is not None:
            add_class_distances(entries, self.data_frequencies)
        if samples_dir is not None and "student" in shown:
            student, teacher = shown["student"], shown["teacher"]
            write_comparison_grid(student.samples, student.title, teacher.samples, teacher.title,
                                  samples_dir / GRID_FILE, self.num_classes or 8)


def add_class_distances(entries: list[dict], data: torch.Tensor) -> None:
    """Add to each entry ``class_tv_to_data``, the TV of its ``class_frequencies`` to the data's class
    frequencies ``data``; students also get ``class_tv_to_teacher``, the TV to the teacher entry's frequencies
    under the same protocol. ``class_tv_floor`` is the TV that exact samples from the data's frequencies would
    show at this sample count."""
    teacher = next(entry["class_frequencies"] for entry in entries if entry["model"] == "teacher")
    for entry in entries:
        entry["class_tv_to_data"] = total_variation(entry["class_frequencies"], data)
        if entry["model"] != "teacher":
            entry["class_tv_to_teacher"] = total_variation(entry["class_frequencies"], teacher)
        entry["data_class_frequencies"] = [round(v, 4) for v in data.tolist()]
        entry["class_tv_floor"] = sampling_floor(data, entry["num_samples"])


def upscaled_grid(images: torch.Tensor, columns: int, min_size: int = 64) -> torch.Tensor:
    """``make_grid`` of images in [-1, 1] as [0, 1] RGB, upscaled (nearest) so each image is at least
    ``min_size`` pixels: 16-pixel digits are too small to judge at their own size."""
    from torchvision.utils import make_grid

    scale = max(1, -(-min_size // images.shape[-1]))
    big = torch.nn.functional.interpolate(images.float(), scale_factor=scale, mode="nearest")
    return make_grid((big.clamp(-1, 1) + 1) / 2, nrow=columns, padding=scale, pad_value=1.0)


def write_comparison_grid(student: torch.Tensor, student_title: str, teacher: torch.Tensor, teacher_title: str,
                          path: Path, columns: int, rows: int = 4) -> None:
    """The first ``rows x columns`` samples of each side by side, student left and teacher right, each under its
    title. With labels ``i % K`` and ``columns = K`` every column is one class, the same on both sides."""
    from PIL import Image, ImageDraw
    from torchvision.transforms.functional import to_pil_image

    n = rows * columns
    left, right = (to_pil_image(upscaled_grid(x[:n], columns)) for x in (student, teacher))
    gap, header = 24, 20
    canvas = Image.new("RGB", (left.width + gap + right.width, header + max(left.height, right.height)), "white")
    canvas.paste(left, (0, header))
    canvas.paste(right, (left.width + gap, header))
    draw = ImageDraw.Draw(canvas)
    draw.text((4, 4), student_title, fill="black")
    draw.text((left.width + gap + 4, 4), teacher_title, fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
