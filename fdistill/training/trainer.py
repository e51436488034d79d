"""The training engine: one code path for a CPU, one GPU and many (through accelerate), for every objective.

The trainer knows nothing of any objective's math: it asks the objective which kind of step comes next
(critic or generator) and which networks that kind trains, calls its loss on each micro-batch, and owns the
rest: gradient averaging, NaN/inf handling, clipping, optimizers, LR warm-up, EMAs, logging, checkpoints. It
knows nothing of tasks either: the run hands it the batches and two hooks, ``preview(nets, path)`` (every
``log.sample_every`` steps) and ``metrics(nets) -> dict`` (every ``log.fd_every`` steps), which it calls on the
main process with the evaluation weights swapped in.

Randomness. Each step's global batch is drawn under the seed ``(run.seed, step, "data")`` on every process,
which keeps its own slice; micro-batch ``k`` of the step's ``processes x accumulation`` runs the objective
under the seed ``(run.seed, step, k)`` (torch's global RNG, which objectives draw from). A run is therefore a
function of its seed and micro-batch count: resuming is bit-exact, and 2 processes equal 1 process with 2
accumulation micro-batches up to the order of floating-point sums.

Data parallelism. Objectives call any method of the networks (``student.sample``,
``fake_score.forward_with_features``), not only ``forward``; a DDP wrapper would silently skip gradient
synchronisation there. So the networks stay unwrapped and, after the micro-batches, one all-reduce sums the
gradients, the loss terms and the fault flags of all processes. With ``train.fsdp`` every layer that owns
weights is sharded with FSDP2's ``fully_shard``, the frozen teacher's too, which gathers it around each call
whatever the caller and reduce-scatters its gradient.
"""

from __future__ import annotations

import hashlib
import math
import signal
import threading
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from accelerate import Accelerator
from torch.distributed.tensor import DTensor

from fdistill.config import Config, OptimConfig, batch_layout
from fdistill.containers import Batch, Networks
from fdistill.errors import ConfigError
from fdistill.objectives.base import Objective
from fdistill.training import checkpoint
from fdistill.training.ema import EMASet
from fdistill.training.logging import RunLogger


class NonFiniteTraining(RuntimeError):
    """Too many NaN/inf steps in a row."""


class Interrupted(RuntimeError):
    """SIGINT/SIGTERM arrived; a checkpoint was written."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum


@dataclass
class TrainSummary:
    steps: int
    wall_seconds: float
    last_logs: dict
    nonfinite_steps: int
    peak_memory: float  # bytes: this process's peak resident memory on a CPU, the allocator's peak on CUDA


def peak_memory(device: torch.device) -> float:
    """Peak memory of this process so far: the CUDA allocator's peak on a GPU, else the peak resident set size."""
    if device.type == "cuda":
        return float(torch.cuda.max_memory_allocated(device))
    import resource

    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)  # kilobytes on Linux


def step_seed(seed: int, step: int, stream) -> int:
    """A 63-bit seed for one (step, stream) of a run; the same on every process."""
    digest = hashlib.blake2b(f"{seed}/{step}/{stream}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def _adamw(params_by_network: dict[str, list[torch.nn.Parameter]], oc: OptimConfig, section: str):
    """AdamW (``oc.optimizer``: torch's, or bitsandbytes' 8-bit one) with one parameter group per network, at
    ``oc.lr`` unless ``oc.lr_by_network`` names the network."""
    unknown = sorted(set(oc.lr_by_network) - set(params_by_network))
    if unknown:
        raise ConfigError(f"{section}.lr_by_network names {', '.join(unknown)}, which this optimizer does not "
                          f"train; use {', '.join(params_by_network) or 'nothing'}")
    groups = [{"params": trainable, "lr": oc.lr_by_network.get(name, oc.lr)}
              for name, params in params_by_network.items() if (trainable := [p for p in params if p.requires_grad])]
    if not groups:
        return None
    adamw = torch.optim.AdamW if oc.optimizer == "adamw" else _adamw8bit(section, groups)
    return adamw(groups, lr=oc.lr, betas=tuple(oc.betas), weight_decay=oc.weight_decay)


def _adamw8bit(section: str, groups: list[dict]):
    """bitsandbytes' 8-bit AdamW, or a one-line error saying what it needs."""
    if not all(p.is_cuda for group in groups for p in group["params"]):
        raise ConfigError(f"{section}.optimizer=adamw8bit runs on a CUDA device only; use {section}.optimizer=adamw "
                          "on this device")
    try:
        import bitsandbytes
    except ImportError:
        raise ConfigError(f"{section}.optimizer=adamw8bit needs bitsandbytes (pip install bitsandbytes); or use "
                          f"{section}.optimizer=adamw") from None
    return bitsandbytes.optim.AdamW8bit


def _lr_schedule(opt, warmup: int, decay: str, updates: int):
    """The learning-rate factor of the ``k``-th update of ``opt``: a linear warm-up over ``warmup`` updates, then
    ``decay`` from 1 to 0 over the rest of the ``updates`` this optimizer gets in the run."""
    def factor(k: int) -> float:
        if warmup and k < warmup:
            return (k + 1) / warmup
        if decay == "constant":
            return 1.0
        progress = min(1.0, (k - warmup) / max(1, updates - warmup))
        return 0.5 * (1 + math.cos(math.pi * progress)) if decay == "cosine" else 1.0 - progress

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def _shard(module: torch.nn.Module) -> None:
    """FSDP2 on every submodule that owns parameters and is not sharded yet (a LoRA network's adapters are also
    modules of the shared base): each call, from any method, gathers its weights."""
    from torch.distributed.fsdp import FSDPModule, fully_shard

    for sub in list(module.modules()):
        if next(sub.parameters(recurse=False), None) is not None and not isinstance(sub, FSDPModule):
            fully_shard(sub)


class Trainer:
    """Trains ``nets`` with ``objective`` on ``batches`` (an iterable of global batches) as ``cfg`` says.

    ``accelerator`` defaults to a new :class:`accelerate.Accelerator` with ``train.mixed_precision``; without
    ``run_dir`` nothing is written (no checkpoints, logs or previews). ``preview`` and ``metrics`` are the
    run's hooks (see the module docstring); either may be left out.
    """

    def __init__(self, nets: Networks, objective: Objective, batches, cfg: Config, accelerator=None,
                 run_dir: Path | None = None, progress: bool = True,
                 preview: Callable[[Networks, Path], None] | None = None,
                 metrics: Callable[[Networks], dict] | None = None):
        accelerator = accelerator or Accelerator(mixed_precision=cfg.train.mixed_precision)
        self.acc, self.nets, self.objective, self.cfg = accelerator, nets, objective, cfg
        self.batches, self.run_dir, self.progress = iter(batches), run_dir, progress
        self.preview_hook, self.metrics_hook = preview, metrics
        self.accumulation = batch_layout(cfg.train, accelerator.num_processes)[1]
        self._place()
        # each network's parameters that no step trains (a LoRA network's base weights), by name: sharding keeps
        # the names but may replace the parameter objects
        self.frozen = {name: {n for n, p in net.named_parameters() if not p.requires_grad}
                       for name, net in nets.trainable().items()}
        extra = {"generator": objective.generator_parameters(), "critic": objective.critic_parameters()}
        optim = {"generator": cfg.student_optim, "critic": cfg.critic_optim}
        self.trains = {"generator": objective.generator_trains, "critic": objective.critic_trains}
        sections = {"generator": "student_optim", "critic": "critic_optim"}
        self.optimizers = {k: _adamw(self._params_by_network(self.trains[k], extra[k]), optim[k], sections[k])
                           for k in optim}
        updates = Counter(objective.step_kind(step) for step in range(cfg.train.steps))
        self.schedulers = {k: _lr_schedule(o, optim[k].warmup_steps, optim[k].lr_decay, updates[k])
                           for k, o in self.optimizers.items() if o}
        self.clip = {k: optim[k].grad_clip for k in optim}
        self.ema = EMASet(nets.student, cfg.ema.averages, cfg.train.batch_size)
        self.step, self.nonfinite_total, self.nonfinite_run, self.wall_seconds = 0, 0, 0, 0.0
        self._stop_signal, self.resumed_from = 0, None
        accelerator.register_for_checkpointing(self)

    # ----------------------------------------------------------------------------------------- set-up
    def _place(self) -> None:
        """Move everything to the device and shard: the trainable networks, then the frozen teacher (the shared
        base of LoRA networks), whose weights no step changes but every process would otherwise hold whole."""
        nets = self.nets.to(self.acc.device)
        self.objective.to(self.acc.device)
        if self.cfg.train.fsdp and self.acc.num_processes > 1:
            for net in nets.trainable().values():
                _shard(net)
            _shard(nets.teacher)

    def _params_by_network(self, names, extra) -> dict[str, list[torch.nn.Parameter]]:
        """The parameters of each named network present (``objective`` for the objective's own), in order."""
        params = {n: list(getattr(self.nets, n).parameters()) for n in names if getattr(self.nets, n, None) is not None}
        extra = list(extra)
        return {**params, "objective": extra} if extra else params

    def _set_trainable(self, kind: str) -> None:
        """Only the parameters that steps of ``kind`` train require gradients (``none``: no network's do); the
        frozen ones (:attr:`frozen`) never do."""
        for k, names in self.trains.items():
            for name in names:
                for n, p in (getattr(self.nets, name).named_parameters() if name in self.frozen else ()):
                    p.requires_grad_(k == kind and n not in self.frozen[name])

    # ------------------------------------------------------------------------------------------ a step
    def _micro_batches(self, step: int) -> list[tuple[int, Batch]]:
        """This process's (shard index, micro-batch) pairs of the step's global batch."""
        torch.manual_seed(step_seed(self.cfg.run.seed, step, "data"))
        batch = next(self.batches)
        first = self.acc.process_index * self.accumulation
        parts = batch.split(self.acc.num_processes * self.accumulation)
        return [(k, parts[k].to(self.acc.device)) for k in range(first, first + self.accumulation)]

    def _accumulate(self, kind: str, step: int) -> dict[str, torch.Tensor]:
        """Forward and backward over the micro-batches; returns the loss terms averaged over them."""
        loss_fn = self.objective.generator_loss if kind == "generator" else self.objective.critic_loss
        totals: dict[str, torch.Tensor] = {}
        for shard, batch in self._micro_batches(step):
            torch.manual_seed(step_seed(self.cfg.run.seed, step, shard))
            with self.acc.autocast():
                loss, logs = loss_fn(batch, self.nets, step)
            self.acc.backward(loss / self.accumulation)
            for name, value in {"loss": loss, **logs}.items():
                term = value.detach().float().reshape(()) / self.accumulation
                totals[name] = totals[name] + term if name in totals else term
        return totals

    def _all_reduce(self, params, totals: dict) -> tuple[dict[str, float], float, bool]:
        """One all-reduce of the replicated gradients, the loss terms, the sharded gradients' squared norm and
        the stop flag. Returns the averaged terms, the sharded squared norm and whether to stop."""
        world = self.acc.num_processes
        plain = [p.grad for p in params if p.grad is not None and not isinstance(p.grad, DTensor)]
        sharded = [p.grad.to_local().float() for p in params if isinstance(p.grad, DTensor)]
        device, names = self.acc.device, sorted(totals)
        sharded_sq = torch.as_tensor(sum((g**2).sum() for g in sharded), dtype=torch.float32, device=device)
        stop = torch.tensor(float(self._stop_signal), device=device)
        tail = [*(totals[n] for n in names), sharded_sq, stop]
        grads = [g.reshape(-1).float() for g in plain] if world > 1 else []
        buf = self.acc.reduce(torch.cat(grads + [torch.stack(tail)]), "sum")
        offset = 0
        for g in plain if world > 1 else []:
            g.copy_(buf[offset:offset + g.numel()].view_as(g) / world)
            offset += g.numel()
        values = (buf[offset:offset + len(names)] / world).tolist()
        return dict(zip(names, values, strict=True)), float(buf[-2]), bool(buf[-1] > 0)

    @staticmethod
    def _grad_norm(params, sharded_sq: float) -> float:
        plain = [p.grad for p in params if p.grad is not None and not isinstance(p.grad, DTensor)]
        norms = [torch.linalg.vector_norm(g.float()) for g in plain]
        return ((float(torch.stack(norms).square().sum()) if norms else 0.0) + sharded_sq) ** 0.5

    def train_step(self, step: int) -> tuple[str, dict[str, float], bool]:
        """One critic or generator step; returns its kind, averaged scalars and whether a stop was requested.
        A step whose loss or gradient is not finite is skipped (no update, no EMA) and counted in
        ``nonfinite_run`` (reset by a good step) and ``nonfinite_total``."""
        kind = self.objective.step_kind(step)
        opt, scaler = self.optimizers[kind], self.acc.scaler
        self._set_trainable(kind)
        for o in self.optimizers.values():
            if o is not None:
                o.zero_grad(set_to_none=True)
        params = [p for g in opt.param_groups for p in g["params"]]
        logs, sharded_sq, stop = self._all_reduce(params, self._accumulate(kind, step))
        if scaler is not None:
            scaler.unscale_(opt)
        norm = self._grad_norm(params, sharded_sq)
        finite = all(torch.isfinite(torch.tensor([*logs.values(), norm])).tolist())
        if finite:
            self._clip(params, norm, self.clip[kind])
            if scaler is not None:
                scaler.step(opt)
            else:
                opt.step()
            self.schedulers[kind].step()
            if kind == "generator" or self.cfg.ema.update == "every":
                self.ema.update()
        if scaler is not None:
            scaler.update()
        self._count_nonfinite(finite, kind, step)
        scalars = {f"{kind}/{k}": v for k, v in logs.items()} | {f"{kind}/grad_norm": norm} if finite else {}
        return kind, scalars | {"nonfinite_fraction": 0.0 if finite else 1.0}, stop

    @staticmethod
    @torch.no_grad()
    def _clip(params, norm: float, max_norm: float | None) -> None:
        if max_norm is not None and norm > max_norm:
            for p in params:
                if p.grad is not None:
                    p.grad.mul_(max_norm / (norm + 1e-6))

    def _count_nonfinite(self, finite: bool, kind: str, step: int) -> None:
        if finite:
            self.nonfinite_run = 0
            return
        self.nonfinite_total += 1
        self.nonfinite_run += 1
        limit = self.cfg.train.max_nonfinite_in_a_row
        if self.nonfinite_run >= limit:
            raise NonFiniteTraining(f"{self.nonfinite_run} non-finite steps in a row (limit "
                                    f"train.max_nonfinite_in_a_row={limit}) at step {step}; stopped without "
                                    f"writing a checkpoint; lower the learning rate or resume an earlier one")

    # ---------------------------------------------------------------------------------------- the loop
    def load_checkpoint(self, path: Path) -> None:
        """Continue from checkpoint ``path`` (all processes); a layout that cannot continue it raises at once."""
        checkpoint.load(self.acc, path)
        self.resumed_from = path

    def fit(self, resume_from: Path | None = None) -> TrainSummary:
        if resume_from is not None:
            self.load_checkpoint(resume_from)
        steps, log_cfg = self.cfg.train.steps, self.cfg.log
        log = self.log = RunLogger(self.acc, self.run_dir, log_cfg, steps, self.step, self.progress)
        if self.resumed_from is not None:
            log.note(f"resumed from {self.resumed_from} at step {self.step}")
        start = time.time() - self.wall_seconds
        with self._signals():
            while self.step < steps:
                kind, logs, stop = self.train_step(self.step)
                self.step += 1
                self.wall_seconds = time.time() - start
                if self.nonfinite_run:
                    log.note(f"step {self.step}: non-finite {kind} loss or gradient, step skipped "
                             f"({self.nonfinite_run} in a row, {self.nonfinite_total} in all)")
                log.update(self.step, logs)
                self._periodic(stop)
        self._set_trainable("none")
        for opt in self.optimizers.values():  # the last step's gradients are no longer needed
            if opt is not None:
                opt.zero_grad(set_to_none=True)
        log.close()
        return TrainSummary(self.step, self.wall_seconds, log.last, self.nonfinite_total, peak_memory(self.acc.device))

    def _periodic(self, stop: bool) -> None:
        step, every = self.step, self.cfg.checkpoint.every
        due = step == self.cfg.train.steps or stop or (every and step % every == 0)
        if self.run_dir is not None and due:
            path = self.save_checkpoint()
            if stop:
                signum = signal.Signals(self._stop_signal or signal.SIGTERM)
                raise Interrupted(signum, f"interrupted by {signum.name} at step {step}; wrote checkpoint "
                                  f"{path}; continue with --resume")
        every = self.cfg.log.sample_every
        if self.preview_hook and self.run_dir is not None and every and step % every == 0 and not self.cfg.train.fsdp:
            self.write_preview(self.run_dir / "samples" / f"step-{step:08d}.png")
        every = self.cfg.log.fd_every
        if self.metrics_hook and every and step % every == 0 and not self.cfg.train.fsdp:
            self.log.record(step, self.training_metrics())

    def save_checkpoint(self) -> Path:
        return checkpoint.save(self.acc, self.run_dir, self.step, self.cfg.checkpoint.keep_last)

    def write_preview(self, path: Path) -> None:
        """The preview hook with the evaluation weights (``eval.ema``); main process only, no collectives."""
        if self.acc.is_main_process:
            path.parent.mkdir(parents=True, exist_ok=True)
            with self._evaluation_weights():
                self.preview_hook(self.nets, path)

    def training_metrics(self) -> dict[str, float]:
        """The metrics hook with the evaluation weights; main process only, no collectives."""
        if not self.acc.is_main_process:
            return {}
        with self._evaluation_weights():
            return self.metrics_hook(self.nets)

    @contextmanager
    def _evaluation_weights(self):
        """The student in eval mode with the ``eval.ema`` weights swapped in, under autocast and no_grad."""
        student = self.nets.student
        was_training = student.training
        with self.ema.swapped(self.cfg.eval.ema), self.acc.autocast(), torch.no_grad():
            student.eval()
            try:
                yield
            finally:
                student.train(was_training)

    @contextmanager
    def _signals(self):
        """SIGINT/SIGTERM set a flag that all processes act on after the current step."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum, _frame):
            self._stop_signal = signum
            signal.signal(signum, previous[signum])  # a second signal acts at once

        previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, h in previous.items():
                signal.signal(s, h)

    # -------------------------------------------------------------------------------- state and export
    def _stateful(self) -> dict[str, torch.nn.Module]:
        return {**self.nets.trainable(), "objective": self.objective}

    def state_dict(self) -> dict:
        """Everything a resumed run needs; gathers sharded tensors (call on every process)."""
        state = {
            "counters": {"step": self.step, "nonfinite_total": self.nonfinite_total,
                         "nonfinite_run": self.nonfinite_run, "wall_seconds": self.wall_seconds,
                         "micro_batches": self.micro_batches},
            "modules": {n: checkpoint.full_state_dict(m, copy=False) for n, m in self._stateful().items()},
            "optimizers": {k: checkpoint.full_optimizer_state(o, copy=False) for k, o in self.optimizers.items() if o},
            "schedulers": {k: s.state_dict() for k, s in self.schedulers.items()},
            "ema": self.ema.state_dict(copy=False),
        }
        checkpoint.assert_finite(state)
        return state

    @property
    def micro_batches(self) -> int:
        """Micro-batches per step (processes x accumulation): each runs the objective under its own seed."""
        return self.acc.num_processes * self.accumulation

    def load_state_dict(self, state: dict) -> None:
        counters = state["counters"]
        saved = counters.get("micro_batches", self.micro_batches)
        if saved != self.micro_batches:
            device_batch = self.cfg.train.batch_size // saved
            raise ConfigError(f"the checkpoint was written with {saved} micro-batches per step (processes x "
                              f"accumulation) and this launch has {self.micro_batches}; resume with "
                              f"train.device_batch_size={device_batch} on a number of processes that divides {saved}")
        self.step, self.wall_seconds = counters["step"], counters["wall_seconds"]
        self.nonfinite_total, self.nonfinite_run = counters["nonfinite_total"], counters["nonfinite_run"]
        for name, module in self._stateful().items():
            checkpoint.load_full_state_dict(module, state["modules"][name])
        for k, opt in self.optimizers.items():
            if opt is not None:
                checkpoint.load_full_optimizer_state(opt, state["optimizers"][k])
        for k, s in self.schedulers.items():
            s.load_state_dict(state["schedulers"][k])
        self.ema.load_state_dict(state["ema"])

    def release(self) -> None:
        """Drop the accelerator's reference to this trainer (taken for its checkpoints), so that the networks are
        freed with the trainer."""
        self.acc._custom_objects[:] = [obj for obj in self.acc._custom_objects if obj is not self]

    def student_weights(self):
        """``(name, state dict)`` pairs of the whole student: trained weights under ``None``, then each EMA by name,
        made one at a time so that one copy at most is held (each a collective: iterate on every process)."""
        yield None, checkpoint.full_state_dict(self.nets.student, copy=False)  # written before training goes on
        for name in self.ema.averages:
            yield name, self.ema.module_state_dict(name)
