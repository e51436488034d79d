"""The training loop: critic/generator alternation, optimizers, clipping, progress and the run directory.

The trainer knows nothing of any objective's math: it asks the objective which kind of step comes next and
which networks that kind trains, calls its loss, and steps the matching optimizer.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

from fdistill.config import OptimConfig
from fdistill.objectives import Networks, Objective


class NonFiniteLoss(RuntimeError):
    """A loss or gradient became NaN/inf."""


def _adamw(params, oc: OptimConfig):
    params = [p for p in params if p.requires_grad]
    return torch.optim.AdamW(params, lr=oc.lr, betas=tuple(oc.betas), weight_decay=oc.weight_decay) if params else None


@dataclass
class TrainSummary:
    steps: int
    wall_seconds: float
    last_logs: dict


class Trainer:
    def __init__(self, nets: Networks, objective: Objective, batches, student_optim: OptimConfig,
                 critic_optim: OptimConfig, steps: int, log_every: int = 50, progress: bool = True):
        self.nets, self.objective, self.batches = nets, objective, iter(batches)
        self.steps, self.log_every, self.progress = steps, log_every, progress
        self.modules = {"generator": self._modules(objective.generator_trains),
                        "critic": self._modules(objective.critic_trains)}
        self.clip = {"generator": student_optim.grad_clip, "critic": critic_optim.grad_clip}
        self.optimizers = {
            "generator": _adamw(self._params("generator") + list(objective.generator_parameters()), student_optim),
            "critic": _adamw(self._params("critic") + list(objective.critic_parameters()), critic_optim),
        }

    def _modules(self, names):
        return [getattr(self.nets, n) for n in names if getattr(self.nets, n, None) is not None]

    def _params(self, kind):
        return [p for m in self.modules[kind] for p in m.parameters()]

    def _set_trainable(self, kind: str):
        for k, mods in self.modules.items():
            for m in mods:
                m.requires_grad_(k == kind)

    def train_step(self, step: int) -> tuple[str, dict]:
        kind = self.objective.step_kind(step)
        self._set_trainable(kind)
        batch = next(self.batches)
        loss_fn = self.objective.generator_loss if kind == "generator" else self.objective.critic_loss
        loss, logs = loss_fn(batch, self.nets, step)
        if not torch.isfinite(loss):
            raise NonFiniteLoss(f"{kind} loss is {loss.item()} at step {step}")
        opt = self.optimizers[kind]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        params = [p for g in opt.param_groups for p in g["params"]]
        if self.clip[kind] is not None:
            torch.nn.utils.clip_grad_norm_(params, self.clip[kind])
        opt.step()
        return kind, {k: float(v) for k, v in logs.items()}

    def fit(self) -> TrainSummary:
        start, logs, shown = time.time(), {}, {}
        bar = tqdm(range(self.steps), disable=not self.progress, dynamic_ncols=True, desc="train")
        for step in bar:
            kind, step_logs = self.train_step(step)
            logs.update({f"{kind}/{k}": v for k, v in step_logs.items()})
            if step % self.log_every == 0 or step == self.steps - 1:
                shown = {k.split("/")[-1]: f"{v:.3g}" for k, v in logs.items()}
                bar.set_postfix(shown, refresh=False)
        self._set_trainable("none")
        return TrainSummary(self.steps, time.time() - start, logs)
