"""Samplers under fixed seeds: the student at one of its step counts and the teacher's multi-step ODE sampler.

A :class:`Sampler` draws a batch from a ``torch.Generator``; :func:`draw_samples` draws ``n`` samples batch by
batch from one generator (each batch's input noise, then the fresh noise of its multi-step sampling), so the same
seed and batch size give the same samples. The evaluation loop and ``sample.py`` both draw through these.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from fdistill.containers import Networks
from fdistill.samplers.ode import sample_ode

# (n, conditions of the n samples or None, generator) -> (n network outputs, network evaluations per sample)
Draw = Callable[[int, object, torch.Generator], tuple[torch.Tensor, int]]


@dataclass
class Sampler:
    """One way to draw samples. ``model`` is ``"student"`` or ``"teacher"``; ``fields`` are what a result entry
    records of how it samples (``renoise`` for a multi-step student, ``sampler`` for the teacher's ODE)."""

    model: str
    draw: Draw
    fields: dict = field(default_factory=dict)


def _on(cond, device):
    return None if cond is None else cond.to(device)


def student_sampler(student, steps: int, renoise: str | None, device) -> Sampler:
    """A student as it is served (``Generator.servable()``, which the caller passes) at ``steps`` steps,
    re-noising between steps as ``renoise`` says (``None``: as its stock scheduler does)."""
    fields = {"renoise": renoise or student.renoise_mode} if steps > 1 else {}

    def draw(n, cond, generator):
        z = student.noise(n, generator=generator).to(device)
        return student.sample(z, _on(cond, device), steps=steps, mode=renoise, generator=generator), steps

    return Sampler("student", draw, fields)


def teacher_sampler(teacher, steps: int, method: str, device) -> Sampler:
    """The teacher's probability-flow ODE sampler (:func:`~fdistill.samplers.ode.sample_ode`) with ``steps``
    steps of ``method``; the teacher is the guided one when guidance is on."""

    def draw(n, cond, generator):
        z = torch.randn((n, *teacher.sample_shape), generator=generator).to(device)
        return sample_ode(teacher, z, steps, method, _on(cond, device))

    return Sampler("teacher", draw, {"sampler": method})


def evaluation_samplers(nets: Networks, ec) -> list[Sampler]:
    """What an evaluation judges, in order: the student at each ``eval.student_steps`` it was trained for, then
    the teacher's ``eval.teacher_steps``-step ``eval.teacher_sampler``."""
    student, device = nets.student.servable(), nets.device
    steps = [k for k in ec.student_steps if k <= nets.student.max_steps]
    return [*(student_sampler(student, k, ec.renoise, device) for k in steps),
            teacher_sampler(nets.teacher, ec.teacher_steps, ec.teacher_sampler, device)]


@torch.no_grad()
def draw_samples(draw: Draw, n: int, generator: torch.Generator, conditions=None, batch_size: int | None = None,
                 progress: bool = False, desc: str = "sampling") -> tuple[torch.Tensor, int]:
    """``n`` samples of ``draw`` (float, on the CPU) in batches of ``batch_size`` (all at once when ``None``), all
    from ``generator``, and the network evaluations per sample. Batch ``[a, b)`` is conditioned on
    ``conditions[a:b]`` (a tensor, a list, or any object sliced the same way; ``None``: unconditioned)."""
    size = batch_size or n
    starts = range(0, n, size)
    out, nfe = [], 0
    for start in tqdm(starts, desc=desc, disable=not progress or len(starts) < 2, leave=False):
        stop = min(start + size, n)
        x, nfe = draw(stop - start, None if conditions is None else conditions[start:stop], generator)
        out.append(x.float().cpu())
    return torch.cat(out), nfe


def student_samples(nets: Networks, n: int, steps: int, seed: int, renoise: str | None = None, cond=None,
                    batch_size: int | None = None, progress: bool = False) -> torch.Tensor:
    """``n`` samples of the served student at ``steps`` steps under ``seed``."""
    sampler = student_sampler(nets.student.servable(), steps, renoise, nets.device)
    return draw_samples(sampler.draw, n, torch.Generator().manual_seed(seed), cond, batch_size, progress,
                        f"student {steps} step")[0]


def teacher_samples(nets: Networks, n: int, steps: int, method: str, seed: int, cond=None,
                    batch_size: int | None = None, progress: bool = False) -> tuple[torch.Tensor, int]:
    """``n`` samples of the teacher's ODE sampler under ``seed`` and its network evaluations per sample."""
    sampler = teacher_sampler(nets.teacher, steps, method, nets.device)
    return draw_samples(sampler.draw, n, torch.Generator().manual_seed(seed), cond, batch_size, progress,
                        f"teacher {steps} steps")
