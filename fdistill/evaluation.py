"""End-of-run evaluation: the student at each of its step counts next to the teacher's multi-step sampler.

Sampling under fixed seeds for every task, and the image protocol (FD, class statistics, PNG folders, the
comparison grid) that the image tasks share.

Every entry is computed from fixed seeds (``eval.seed``), so identical weights give identical numbers.
Image samplers share one protocol: the same noise, conditions, sample count and reference statistics, so
that student and teacher numbers can be compared (Frechet distances on ~1000 samples are biased upward and
only comparable within one protocol, which every entry records).
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from fdistill.config import EvalConfig
from fdistill.containers import Networks
from fdistill.metrics.class_frequencies import class_frequencies
from fdistill.samplers.ode import sample_ode


@torch.no_grad()
def student_samples(nets: Networks, n: int, steps: int, seed: int, renoise: str | None = None, cond=None,
                    batch_size: int | None = None, progress: bool = False) -> torch.Tensor:
    """``n`` samples of the student as it is served (:meth:`~fdistill.networks.generator.Generator.servable`); one
    generator seeded with ``seed`` draws each batch's noise in turn."""
    g = torch.Generator().manual_seed(seed)
    device, student = nets.device, nets.student.servable()
    out = []
    for rows in _batches(n, batch_size, progress, f"student {steps} step"):
        z = student.noise(len(rows), generator=g).to(device)
        c = None if cond is None else cond[rows].to(device)
        out.append(student.sample(z, c, steps=steps, mode=renoise, generator=g).float().cpu())
    return torch.cat(out)


@torch.no_grad()
def teacher_samples(nets: Networks, n: int, steps: int, sampler: str, seed: int, cond=None,
                    batch_size: int | None = None, progress: bool = False) -> tuple[torch.Tensor, int]:
    """``n`` samples of the teacher's ODE sampler and its function evaluations per sample."""
    g = torch.Generator().manual_seed(seed)
    device = nets.device
    out, nfe = [], 0
    for rows in _batches(n, batch_size, progress, f"teacher {steps} steps"):
        z = torch.randn((len(rows), *nets.teacher.sample_shape), generator=g).to(device)
        c = None if cond is None else cond[rows].to(device)
        x, nfe = sample_ode(nets.teacher, z, steps, sampler, c)
        out.append(x.float().cpu())
    return torch.cat(out), nfe


def _batches(n: int, batch_size: int | None, progress: bool, desc: str):
    size = batch_size or n
    starts = range(0, n, size)
    for start in tqdm(starts, desc=desc, disable=not progress or len(starts) < 2, leave=False):
        yield torch.arange(start, min(start + size, n))


@dataclass
class ImageProtocol:
    """What every image sampler is judged under. ``conditions`` (one per sample, or ``None`` for unconditional
    teachers) condition both student and teacher; ``labels`` (one per sample, or ``None``) are the classes the
    samples are asked for, which class accuracy is measured against: the conditions of a class-conditional run,
    ``None`` when every sample is conditioned on the null class. ``classifier`` (optional) maps images in [-1, 1]
    to class logits for the class statistics; ``samples_dir`` receives each sampler's PNGs; ``decode`` (optional)
    turns a latent sampler's output into images."""

    num_samples: int
    seed: int
    batch_size: int
    conditions: torch.Tensor | None
    labels: torch.Tensor | None
    reference: object  # any image source of fdistill.metrics.fid, or its ReferenceStats
    features: object  # feature network name or FeatureNet
    classifier: torch.nn.Module | None = None
    num_classes: int | None = None
    samples_dir: Path | None = None
    progress: bool = False
    decode: Callable[[torch.Tensor], torch.Tensor] | None = None

    def describe(self) -> dict:
        if self.conditions is None:
            labels = None
        elif self.labels is None:
            labels = f"the null class {int(self.conditions[0])} for every sample (unconditional)"
        else:
            labels = f"i % {self.num_classes} for sample i"
        return {"num_samples": self.num_samples, "seed": self.seed, "labels": labels}


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


def image_entry(images: torch.Tensor, protocol: ImageProtocol, reference, name: str) -> dict:
    """FD and class statistics of float images in [-1, 1], computed on their 8-bit quantisation: the values
    a PNG holds, so ``eval/fid.py`` on the written folder reproduces the number."""
    from fdistill.metrics.fid import compute_fid
    from fdistill.metrics.image_sources import to_uint8_nchw

    pixels = to_uint8_nchw(images.clamp(-1, 1))
    if protocol.samples_dir is not None:
        shutil.rmtree(protocol.samples_dir / name, ignore_errors=True)  # no stale images from an earlier eval
        write_png_folder(pixels, protocol.samples_dir / name)
    fid = compute_fid(pixels.permute(0, 2, 3, 1), reference, protocol.features, backend="clean",
                      progress=False)
    entry = {"fd": fid["value"], "feature_net": fid["feature_net"], "weights_hash": fid["weights_hash"],
             "reference": fid["reference"], "num_reference": fid["num_reference"]}
    if protocol.classifier is not None:
        with torch.no_grad():
            logits = protocol.classifier(pixels.float() / 127.5 - 1)
        entry.update(class_statistics(logits, protocol.labels, protocol.num_classes))
    return entry


def write_png_folder(pixels: torch.Tensor, folder: Path) -> None:
    """uint8 NCHW images as ``folder/000000.png ...`` (gray "L" or "RGB")."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(pixels):
        array = img[0].numpy() if img.shape[0] == 1 else img.permute(1, 2, 0).numpy()
        Image.fromarray(array).save(folder / f"{i:06d}.png")


GRID_FILE = "student_vs_teacher.png"


def evaluate_images(nets: Networks, ec: EvalConfig, protocol: ImageProtocol) -> list[dict]:
    """Student (each trained step count) and teacher (``eval.teacher_steps`` ODE steps) under one protocol."""
    from fdistill.metrics.fid import load_feature_net, reference_statistics

    net = load_feature_net(protocol.features)
    reference = reference_statistics(protocol.reference, net, "clean", progress=False)
    protocol.features = net
    common = protocol.describe()
    was_training = nets.student.training
    nets.student.eval()
    samplers = [("student", k) for k in ec.student_steps if k <= nets.student.max_steps] + [("teacher", None)]
    results, shown = [], {}
    for model, steps in samplers:
        start = time.time()
        if model == "student":
            x = student_samples(nets, protocol.num_samples, steps, protocol.seed, ec.renoise, protocol.conditions,
                                protocol.batch_size, protocol.progress)
            mode = ec.renoise or nets.student.servable().renoise_mode
            nfe, extra = steps, {"renoise": mode} if steps > 1 else {}
        else:
            x, nfe = teacher_samples(nets, protocol.num_samples, ec.teacher_steps, ec.teacher_sampler,
                                     protocol.seed, protocol.conditions, protocol.batch_size, protocol.progress)
            extra = {"sampler": ec.teacher_sampler}
        if protocol.decode is not None:
            x = protocol.decode(x)
        rate = protocol.num_samples / (time.time() - start)
        entry = image_entry(x, protocol, reference, f"{model}_nfe{nfe}")
        results.append({"model": model, "nfe": nfe, **extra, **entry, "samples_per_second": rate, **common})
        shown.setdefault(model, (x, f"{model}, {nfe} step{'s' if nfe > 1 else ''}"))  # the student's fewest steps
    nets.student.train(was_training)
    if protocol.samples_dir is not None:
        write_comparison_grid(*shown["student"], *shown["teacher"], protocol.samples_dir / GRID_FILE,
                              protocol.num_classes or 8)
    return results


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
