"""The objective interface and the registry.

An objective is pure math: networks and a batch in, a scalar loss and a dict of named terms out. The trainer
owns optimizers, the critic/generator alternation, clipping, EMA and I/O, and asks the objective only which
kind of step comes next and which networks each kind trains.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from fdistill.containers import Batch, Networks
from fdistill.networks.denoisers import Denoiser
from fdistill.networks.generator import Generator
from fdistill.schedules import Schedule

OBJECTIVES: dict[str, tuple[type, type]] = {}


def register(name: str, options: type):
    """Class decorator: make an objective buildable by name, with its typed options dataclass."""

    def wrap(cls):
        cls.name = name
        OBJECTIVES[name] = (cls, options)
        return cls

    return wrap


@dataclass
class ObjectiveOptions:
    """Options every objective has. ``critic_steps`` critic updates happen per generator update."""

    name: str = "dmd"
    critic_steps: int = 4


class Objective(nn.Module):
    """Base class. Subclasses set ``critic_trains`` / ``generator_trains`` (names of :class:`Networks` fields)
    and implement :meth:`critic_loss` and :meth:`generator_loss`. Objectives are ``nn.Module`` so that any
    state they keep (ratio bins, a log-variance head) is saved in checkpoints with the networks.
    """

    name = "objective"
    critic_trains: tuple[str, ...] = ("fake_score",)
    generator_trains: tuple[str, ...] = ("student",)
    needs_fake_score = True
    needs_discriminator = False
    needs_real_data = False
    discriminator_features: list[str] | None = None  # the teacher blocks a discriminator reads (None: default)

    def __init__(self, options: ObjectiveOptions, schedule: Schedule):
        super().__init__()
        self.options, self.schedule = options, schedule

    def step_kind(self, step: int) -> str:
        """``"critic"`` or ``"generator"`` for training step ``step`` (0-based)."""
        cycle = self.options.critic_steps + 1
        return "generator" if step % cycle == self.options.critic_steps else "critic"

    def critic_loss(self, batch: Batch, nets: Networks, step: int) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError

    def generator_loss(self, batch: Batch, nets: Networks, step: int) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError

    def kept_passes(self, kind: str) -> tuple[str, ...]:
        """The network passes whose activations a step of ``kind`` keeps for its backward pass, one
        :class:`Networks` field name per pass (the memory pre-flight counts them): the fake score's denoising pass
        in a critic step, the student's pass in a generator step."""
        return ("fake_score",) if kind == "critic" else ("student",)

    def build_student(self, net: Denoiser, times: list[float]) -> Generator:
        """The student generator around a trainable copy of the teacher (objectives may wrap ``net``)."""
        return Generator(net, times)

    def generator_parameters(self):
        """Parameters the objective itself trains with the student (e.g. a log-variance head)."""
        return []

    def critic_parameters(self):
        """Parameters the objective itself trains with the critic."""
        return []


def build_objective(options, schedule: Schedule) -> Objective:
    """Instantiate the registered objective ``options.name`` for a teacher with this schedule."""
    cls, _ = OBJECTIVES[options.name]
    return cls(options, schedule)
