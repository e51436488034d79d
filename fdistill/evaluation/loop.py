"""The evaluation loop every task runs: draw each sampler's samples under one protocol, then let the task's judge
turn them into numbers.

For every :class:`SampleSet` of the judge (one for most tasks; the text task's training and held-out prompts), each
sampler of :func:`~fdistill.evaluation.sampling.evaluation_samplers` (the student at each step count, then the
teacher) draws ``eval.num_samples`` samples from a generator seeded with ``eval.seed``, so identical weights give
identical numbers; samples/s covers the sampling and the judge's :meth:`Judge.prepare` (a latent model's VAE
decode). Image samples are written as PNG folders ``RUN_DIR/samples/<model>_nfe<NFE>[_<set>]`` (the 8-bit values
the numbers are computed on, so ``eval/fid.py`` on a folder reproduces its FD); every such folder of an earlier
evaluation is removed first, for every task and whether or not this one saves samples, so the folders always
belong to the numbers beside them.

Every entry records the protocol: ``model``, ``nfe``, how it sampled (``renoise`` for a multi-step student,
``sampler`` for the teacher), its sample set's fields, the judge's numbers, ``samples_per_second``,
``num_samples``, ``seed`` and the judge's own protocol fields (:attr:`Judge.fields`).
"""

from __future__ import annotations

import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fdistill.containers import Networks
from fdistill.evaluation.sampling import Sampler, draw_samples, evaluation_samplers

SAMPLE_FOLDER = re.compile(r"(student|teacher)_nfe\d+(_.+)?")


@dataclass
class SampleSet:
    """What every sampler draws once: ``conditions`` of the samples (one per sample, sliced per batch; ``None``
    for unconditional models), ``groups`` the prompt or class each sample asks for (``None`` when none is
    asked for), ``reference`` the FD reference of the set, ``name`` its suffix in sample folder names and
    ``fields`` what every entry of the set records (e.g. which prompts)."""

    conditions: object = None
    groups: torch.Tensor | None = None
    reference: object = None
    name: str = ""
    fields: dict = field(default_factory=dict)


@dataclass
class Drawn:
    """One sampler's samples of one set: ``samples`` as the judge reads them (images in [-1, 1], or points),
    ``pixels`` the images' 8-bit quantisation (uint8 NCHW, what the PNGs hold; ``None`` for other samples)."""

    sampler: Sampler
    nfe: int
    samples: torch.Tensor
    pixels: torch.Tensor | None

    @property
    def title(self) -> str:
        return f"{self.sampler.model}, {self.nfe} step{'s' if self.nfe > 1 else ''}"


class Judge:
    """Turns one task's samples into numbers. ``images``: the samples are images (written as PNGs, judged on
    their pixels); ``fields``: protocol fields every entry records; ``batch_size``: samples drawn at once
    (``None``: all)."""

    images = False
    batch_size: int | None = None

    @property
    def fields(self) -> dict:
        return {}

    def sample_sets(self, n: int) -> list[SampleSet]:
        """What every sampler draws ``n`` samples of, in the order of the results."""
        return [SampleSet()]

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """The networks' outputs as samples (a latent model decodes them); timed with the sampling."""
        return x

    def score(self, drawn: Drawn, sample_set: SampleSet) -> dict:
        """The numbers of one sampler's samples of ``sample_set``."""
        raise NotImplementedError

    def finish(self, sample_set: SampleSet, entries: list[dict], shown: dict[str, Drawn],
               samples_dir: Path | None) -> None:
        """After every sampler of ``sample_set``: add numbers that compare its ``entries``, and write pictures of
        ``shown`` (the student's fewest steps and the teacher, by model; no student when ``eval.student_steps`` is
        empty) into ``samples_dir`` (``None``: write nothing)."""


def evaluate_samplers(nets: Networks, ec, judge: Judge, run_dir: Path | None = None,
                      progress: bool = False) -> list[dict]:
    """The ``results`` of ``metrics.json``: every sampler on every sample set of ``judge``, under ``ec``'s
    protocol (``eval.num_samples``, ``eval.seed``), with samples and pictures in ``run_dir/samples`` when
    ``eval.save_samples`` (``run_dir=None``: none); see the module docstring."""
    samples_dir = None if run_dir is None else run_dir / "samples"
    clear_sample_folders(samples_dir)
    samples_dir = samples_dir if ec.save_samples else None
    samplers = evaluation_samplers(nets, ec)
    was_training = nets.student.training
    nets.student.eval()
    results = []
    for sample_set in judge.sample_sets(ec.num_samples):
        entries, shown = [], {}
        for sampler in samplers:
            entry, drawn = judge_sampler(sampler, sample_set, judge, ec, samples_dir, progress)
            entries.append(entry)
            shown.setdefault(sampler.model, drawn)
        judge.finish(sample_set, entries, shown, samples_dir)
        results += entries
    nets.student.train(was_training)
    return results


def judge_sampler(sampler: Sampler, sample_set: SampleSet, judge: Judge, ec, samples_dir: Path | None,
                  progress: bool) -> tuple[dict, Drawn]:
    """One sampler's entry on ``sample_set`` and its samples: drawn under ``eval.seed``, timed with
    :meth:`Judge.prepare`, written as PNGs into ``samples_dir`` when they are images, judged."""
    from fdistill.metrics.image_sources import to_uint8_nchw

    start = time.time()
    x, nfe = draw_samples(sampler.draw, ec.num_samples, torch.Generator().manual_seed(ec.seed),
                          sample_set.conditions, judge.batch_size, progress, sampler.model)
    x = judge.prepare(x)
    rate = ec.num_samples / (time.time() - start)
    drawn = Drawn(sampler, nfe, x, to_uint8_nchw(x.clamp(-1, 1)) if judge.images else None)
    if samples_dir is not None and drawn.pixels is not None:
        name = "_".join(filter(None, (f"{sampler.model}_nfe{nfe}", sample_set.name)))
        write_png_folder(drawn.pixels, samples_dir / name)
    entry = {"model": sampler.model, "nfe": nfe, **sampler.fields, **sample_set.fields,
             **judge.score(drawn, sample_set), "samples_per_second": rate, "num_samples": ec.num_samples,
             "seed": ec.seed, **judge.fields}
    return entry, drawn


def clear_sample_folders(samples_dir: Path | None) -> None:
    """Remove the sample folders an earlier evaluation wrote into ``samples_dir`` (and nothing else there)."""
    if samples_dir is None or not samples_dir.is_dir():
        return
    for folder in samples_dir.iterdir():
        if folder.is_dir() and SAMPLE_FOLDER.fullmatch(folder.name):
            shutil.rmtree(folder)


def write_png_folder(pixels: torch.Tensor, folder: Path) -> None:
    """uint8 NCHW images as ``folder/000000.png ...`` (gray "L" or "RGB")."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(pixels):
        array = img[0].numpy() if img.shape[0] == 1 else img.permute(1, 2, 0).numpy()
        Image.fromarray(array).save(folder / f"{i:06d}.png")
