"""End-of-run evaluation: the student at each of its step counts next to the teacher's multi-step sampler.

Every entry is computed from fixed seeds (``eval.seed``), so identical weights give identical numbers.
"""

from __future__ import annotations

import time

import torch

from fdistill.config import EvalConfig
from fdistill.denoisers import GaussianMixtureDenoiser
from fdistill.metrics.toy import energy_distance, mode_statistics
from fdistill.objectives import Networks
from fdistill.sampling import sample_ode


@torch.no_grad()
def student_samples(nets: Networks, n: int, steps: int, seed: int, renoise: str = "sde") -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    z = nets.student.noise(n, generator=g)
    return nets.student.sample(z, steps=steps, mode=renoise, generator=g)


@torch.no_grad()
def teacher_samples(nets: Networks, n: int, steps: int, sampler: str, seed: int) -> tuple[torch.Tensor, int]:
    g = torch.Generator().manual_seed(seed)
    return sample_ode(nets.teacher, torch.randn((n, *nets.teacher.sample_shape), generator=g), steps, sampler)


def _toy_entry(samples, teacher: GaussianMixtureDenoiser, reference) -> dict:
    stats = mode_statistics(samples, teacher.means, teacher.variances.sqrt().mean(1), teacher.weights)
    return {**stats, "energy_distance": energy_distance(samples, reference)}


def evaluate_toy(nets: Networks, ec: EvalConfig) -> list[dict]:
    """Mode coverage, mode-weight TV and energy distance to exact teacher samples, per sampler."""
    teacher = nets.teacher
    reference = teacher.sample(ec.num_samples, generator=torch.Generator().manual_seed(ec.seed + 1))[0]
    was_training = nets.student.training
    nets.student.eval()
    results = []
    for steps in [k for k in ec.student_steps if k <= nets.student.max_steps]:
        start = time.time()
        x = student_samples(nets, ec.num_samples, steps, ec.seed, ec.renoise)
        entry = {"model": "student", "nfe": steps, **_toy_entry(x, teacher, reference)}
        results.append({**entry, "samples_per_second": ec.num_samples / (time.time() - start)})
    start = time.time()
    x, nfe = teacher_samples(nets, ec.num_samples, ec.teacher_steps, ec.teacher_sampler, ec.seed)
    entry = {"model": "teacher", "nfe": nfe, "sampler": ec.teacher_sampler, **_toy_entry(x, teacher, reference)}
    results.append({**entry, "samples_per_second": ec.num_samples / (time.time() - start)})
    nets.student.train(was_training)
    return results
