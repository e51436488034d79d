"""SIM: Score Implicit Matching (Luo et al. 2024, arXiv 2410.16794).

Objective ``int w(t) E_{x ~ pi_t}[ d(s_q(x) - s_p(x)) ] dt`` with the sampling distribution
``pi_t = q_{sg(theta),t}`` held fixed (docs/objectives.md §6). The score-gradient theorem gives the tractable loss

    L_SIM = E[ -u(x_t) . c(x_t, eps) ],   u = grad d(y) at y = s_q - s_p,   c = s_q(x_t) + eps/sigma_t,

with every network frozen and the gradient flowing through ``x_t`` into ``u`` (not detached: detaching it
halves the scale-direction gradient in the 1-D check) and through the explicit ``x_g`` inside ``c``. Written
on the x0 difference ``Delta = x0_q - x0_p`` (:func:`sim_loss`):

* ``l2``: ``d = 1/2 ||Delta||^2`` gives ``inner = (x0_p - x0_q).(x0_q - x_g)``, i.e. **SiD with alpha = 1**;
* ``pseudo_huber``: ``d = sqrt(||Delta||^2 + c^2) - c`` gives ``inner / sqrt(||Delta||^2 + c^2)``; the default
  ``c = 0.00054 sqrt(D)`` (iCT's constant, in x0 units) is a choice: the paper's value was not available.

Training is SiD's: student input sigma 2.5, t_max = 800 time law, the DMD-type normaliser times 100, 1:1
alternation with the fake score, no real data, and DMD2's backward simulation for a student with several sampling
times (docs/objectives.md §3.1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from fdistill.objectives import common
from fdistill.objectives.base import register
from fdistill.objectives.sid import ScoreIdentity, ScoreIdentityOptions

HUBER_C_PER_SQRT_DIM = 0.00054
SIM_DISTANCES = ("l2", "pseudo_huber")


def sim_loss(inner: torch.Tensor, sq: torch.Tensor, distance: str = "l2", huber_c: float = 1.0):
    """SIM (§6): ``-u(Delta).(x0_q - x_g)`` with ``u = grad d`` kept *attached* (its gradient is half of it).

    Distances act on the x0 difference: ``l2`` is ``d = 1/2 ||Delta||^2``, so ``u = Delta`` and the loss is
    SiD(alpha=1) exactly; ``pseudo_huber`` is ``d = sqrt(||Delta||^2 + c^2) - c``, so
    ``u = Delta / sqrt(sq + c^2)``."""
    if distance == "l2":
        return common.sid_loss(inner, sq, 1.0)
    if distance == "pseudo_huber":
        return inner / torch.sqrt(sq + huber_c**2)
    raise ValueError(f"unknown SIM distance {distance!r}; use one of {SIM_DISTANCES}")


@dataclass
class SIMOptions(ScoreIdentityOptions):
    name: str = "sim"
    distance: str = "pseudo_huber"
    huber_c: Optional[float] = None  # default 0.00054 sqrt(D), in x0 units


@register("sim", SIMOptions)
class SIM(ScoreIdentity):
    def __init__(self, options: SIMOptions, schedule):
        super().__init__(options, schedule)
        common.check_choice(options, "distance", SIM_DISTANCES)

    def huber_c(self, dim: int) -> float:
        c = self.options.huber_c
        return HUBER_C_PER_SQRT_DIM * math.sqrt(dim) if c is None else c

    def score_loss(self, x_g, x0_teacher, x0_fake, t, logits, generator_step):
        inner, sq = common.score_identity_terms(x_g, x0_teacher, x0_fake)
        return sim_loss(inner, sq, self.options.distance, self.huber_c(x_g[0].numel())), {}
