"""Speed and memory on the shipped digits teacher: sampling throughput, training-step overhead, peak memory, JVP.

    python bench/speed.py [--device cpu|cuda] [--batch-size 48] [--repeats 5] [--teacher-steps 35] [--out PATH]

Everything is built as ``configs/quickstart.yaml`` builds it (the config loader, then
:func:`fdistill.run.build_experiment`: the embedded class-conditional 16x16 UNet teacher, the task, the objective
and its networks), on one device, with ``--batch-size`` samples (default 48, the digits recipes' training batch).
Every measurement is preceded by warm-up calls and repeated ``--repeats`` times, round-robin over what it
compares, so that load on a shared machine affects all alike; tables print the median and, after ``±``, half
the range (min to max) of the repeats; the JSON keeps every repeat.

1. Sampling. Samples per second of one batch from the student at 1, 2 and 4 steps
   (:func:`fdistill.evaluation.student_samples`, sampling times ``generator.times=[999,749,499,249]``) and
   from the teacher's ODE sampler (:func:`fdistill.evaluation.teacher_samples`, the quickstart's
   ``eval.teacher_sampler`` with ``--teacher-steps`` steps), with the evaluation's seed and class labels. The
   speed-up over the teacher is compared with the ideal, the ratio of network evaluations (teacher NFE /
   student steps). The weights do not change the cost, so the student is the untrained copy of the teacher.

2. Training-step overhead, per registered objective. The quickstart's objective settings that an objective has
   (``critic_steps``, ``gan_weight``, ...) apply to it, its own defaults to the rest; consistency students
   sample at TrigFlow time 1.5. A critic step and a generator step are run by
   :meth:`fdistill.training.trainer.Trainer.train_step`, exactly as training runs them (micro-batches, loss,
   backward, all-reduce, clipping, optimizer, LR schedule, EMA), at the first step index of each kind from
   step 10000 on, past every objective's warm-up. Each repeat times one step of each kind plain and one
   instrumented: forward hooks on each network's model (the diffusers UNet inside the teacher, student and
   fake score; the discriminator itself) time every network pass with the device synchronised before and after
   it and count the passes that keep a graph for the backward pass, the trainer's ``accelerator.backward``
   call is timed whole (the backward passes of every network, plus the few element-wise operations of the
   loss), and the optimizer steps are timed by optimizer hooks. The framework overhead is ``(plain step -
   network forwards - backward) / plain step``, pairing the plain and the instrumented step of the same
   repeat: time spent on anything but the networks' forward and backward passes (noise and time draws,
   schedule arithmetic, sampler and TrigFlow conversions, the optimizer step and EMA update, gradient norms
   and the finiteness check). An exact JVP (sCM, rCM) is one forward pass of the student under
   ``torch.func.jvp``. "iteration" is one critic step plus one generator step; training runs
   ``critic_per_generator`` (in the JSON) critic steps per generator step. The JSON also keeps the
   instrumented step's own duration: its excess over the plain step is the cost of the hooks (and, on a GPU,
   of the synchronisations).

3. Peak memory of each step: the peak of live tensor memory during the step above what was live when it
   began (weights, optimizer state and gradients kept from the step before are not counted). On CUDA from
   ``torch.cuda.max_memory_allocated``; on CPU from the allocations and frees recorded by
   ``torch.profiler`` (``profile_memory=True``): neither tracemalloc (which does not see torch's allocator)
   nor the resident set size (which keeps freed memory in the C library's arenas) measures a single step.
   The profiler does not record frees of blocks allocated before it started whose size it does not know, so
   the CPU figure is an upper bound.

4. sCM's tangent JVP ``dF/dt``, exact (forward-mode AD) against the central finite difference: the inputs
   are captured from one sCD generator loss on a digits batch; both JVPs are timed alone and against one
   forward pass of the student, their agreement is the relative L2 error of the finite difference at three
   relative steps (1e-3, the objective's default; 3e-5, the step its options recommend for diffusers UNets;
   and 1e-4 between them), and a whole sCD training iteration in each mode is timed with ``bench/jvp_cost.py``'s
   :class:`SCMIteration` on the digits teacher.

5. Features-only teacher passes. The discriminator of f-distill and of DMD2 reads the teacher's features (the
   quickstart's ``discriminator_features``); without gradient recording such a pass ends where the last feature
   block has run. Each such objective's critic step is timed with those passes stopped early and run whole (as
   before), alternating, on two trainers from the same seed; the losses of their first 20 steps are compared
   (equal features give equal losses, so training and its FD are unchanged) and the teacher's passes counted
   (all / stopped early).

Writes ``bench/results/speed.json`` (or ``--out``) with the environment (device name, threads, versions, commit).
``--only SECTION`` (repeatable: sampling, training, jvp, features) runs only those sections and keeps the others
from the file.
"""

from __future__ import annotations

import argparse
import inspect
import json
import statistics
import time
from collections import Counter, defaultdict
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, fields
from functools import partial
from pathlib import Path
from unittest import mock

import torch
from accelerate import Accelerator
from diffusers import ModelMixin
from jvp_cost import MODES, SCMIteration, seconds_per_iteration, synchronize
from omegaconf import OmegaConf
from torch import nn
from torch._C._profiler import _EventType
from torch.profiler import ProfilerActivity, profile

from fdistill.evaluation import student_samples, teacher_samples
from fdistill.networks.denoisers import Denoiser, DiffusersDenoiser
from fdistill.networks.jvp import time_jvp
from fdistill.objectives import OBJECTIVES, build_objective, scm
from fdistill.recipes import load_config, objective_options
from fdistill.run import build_experiment, environment
from fdistill.teachers import build_teacher
from fdistill.training.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "configs" / "quickstart.yaml"
RESULTS = ROOT / "bench" / "results" / "speed.json"
WARMUP = 2  # calls of each measured thing before timing: first-call allocations, kernel selection
STEADY_STATE_STEP = 10_000  # steps are timed as they run from here on, past every objective's warm-up
STUDENT_STEPS = (1, 2, 4)
FEW_STEP_TIMES = "generator.times=[999,749,499,249]"
TRIGFLOW_TIMES = {"scm": "generator.times=[1.5]", "rcm": "generator.times=[1.5]"}  # consistency students
FD_RELATIVE_STEPS = (1e-3, 1e-4, 3e-5)
NETWORK_LETTERS = {"teacher": "T", "student": "S", "fake_score": "F", "discriminator": "D"}
MIB = 2**20
SECTIONS = ("sampling", "training", "jvp", "features")


def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "values": values}


def shown(s: dict, digits: int = 1) -> str:
    return f"{s['median']:.{digits}f} ±{(s['max'] - s['min']) / 2:.{digits}f}"


def elapsed_ms(call, device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    call()
    synchronize(device)
    return 1e3 * (time.perf_counter() - start)


# quickstart settings of its discriminator on teacher features, which only objectives that train one read
DISCRIMINATOR_KEYS = ("discriminator_features", "discriminator_time_distribution")


def quickstart_experiment(objective: str, batch_size: int, overrides: tuple[str, ...] = ()):
    """The quickstart run with ``objective``: the quickstart's objective keys that it has (its discriminator's
    settings when it trains a discriminator on teacher features), its defaults for the rest. Returns
    ``(cfg, options, nets, objective, task)``."""
    times = [TRIGFLOW_TIMES[objective]] if objective in TRIGFLOW_TIMES else []
    cfg, _ = load_config(str(QUICKSTART), [f"train.batch_size={batch_size}", *times, *overrides])
    shipped = OmegaConf.to_container(OmegaConf.load(QUICKSTART).objective)
    accepted = {f.name for f in fields(OBJECTIVES[objective][1])}
    kept = {k: v for k, v in shipped.items() if k in accepted} | {"name": objective}
    options = objective_options({k: v for k, v in kept.items() if k not in DISCRIMINATOR_KEYS})
    if build_objective(options, build_teacher(cfg).schedule).needs_discriminator:
        options = objective_options(kept)
    else:
        cfg.critic_optim.lr_by_network.pop("discriminator", None)
    cfg.objective = asdict(options)
    return cfg, options, *build_experiment(cfg, options)


def make_accelerator(device: str) -> Accelerator:
    return Accelerator(cpu=device == "cpu")


# ------------------------------------------------------------------------------------------------- sampling
def sampling(args, device: torch.device) -> dict:
    cfg, _, nets, _, task = quickstart_experiment("f_distill", args.batch_size, (FEW_STEP_TIMES,))
    nets.to(device)
    nets.student.eval()
    n, seed, sampler = args.batch_size, cfg.eval.seed, cfg.eval.teacher_sampler
    labels = torch.arange(n) % task.dataset.num_classes
    calls = {"teacher": lambda: teacher_samples(nets, n, args.teacher_steps, sampler, seed, labels, n)}
    calls |= {f"student {k}": lambda k=k: student_samples(nets, n, k, seed, cfg.eval.renoise, labels, n)
              for k in STUDENT_STEPS}
    for call in calls.values():
        for _ in range(WARMUP):
            call()
    teacher_nfe = calls["teacher"]()[1]
    rates = {name: [] for name in calls}
    for _ in range(args.repeats):
        for name, call in calls.items():
            rates[name].append(1e3 * n / elapsed_ms(call, device))
    rows = []
    for name, rate in rates.items():
        nfe = teacher_nfe if name == "teacher" else int(name.split()[1])
        speedup = [r / t for r, t in zip(rate, rates["teacher"], strict=True)]
        ideal = teacher_nfe / nfe
        rows.append({"sampler": name if name != "teacher" else f"teacher {sampler} {args.teacher_steps}",
                     "nfe": nfe, "samples_per_second": spread(rate), "speedup": spread(speedup),
                     "ideal_speedup": ideal, "speedup_over_ideal": statistics.median(speedup) / ideal,
                     "samples": n, "batch_size": n, "seed": seed})
    return {"teacher_sampler": sampler, "teacher_steps": args.teacher_steps, "rows": rows}


# ---------------------------------------------------------------------------------------- training steps
@dataclass
class PassRecord:
    """What one instrumented training step spent on network passes, in ms, and how many it made."""

    step_ms: float = 0.0
    forward_ms: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    forwards: Counter = field(default_factory=Counter)
    with_graph: Counter = field(default_factory=Counter)  # forward passes that keep a graph for backward
    stopped: Counter = field(default_factory=Counter)  # features-only passes that ended at the last feature block
    backward_ms: float = 0.0
    optimizer_ms: float = 0.0


def network_model(net: nn.Module) -> nn.Module:
    """The module whose calls are the network's passes: the diffusers model inside it, else the network."""
    return next((m for m in net.modules() if isinstance(m, ModelMixin)), net)


@contextmanager
def recorded_passes(trainer: Trainer):
    """Hooks that fill a :class:`PassRecord` while the block runs, removed afterwards."""
    device, record, started = trainer.acc.device, PassRecord(), {}

    def stopwatch_start(key):
        def hook(*_):
            synchronize(device)
            started[key] = time.perf_counter()
        return hook

    def pass_end(name):
        def hook(_module, _args, output):  # output None: the pass stopped at the last feature block (an exception)
            synchronize(device)
            record.forward_ms[name] += 1e3 * (time.perf_counter() - started[name])
            record.forwards[name] += 1
            record.stopped[name] += output is None
            record.with_graph[name] += (output is not None and torch.is_grad_enabled()
                                        and getattr(output, "sample", output).requires_grad)
        return hook

    def optimizer_end(*_):
        synchronize(device)
        record.optimizer_ms += 1e3 * (time.perf_counter() - started["optimizer"])

    def timed_backward(*args, **kwargs):
        record.backward_ms += elapsed_ms(lambda: backward(*args, **kwargs), device)

    handles = []
    for name, net in trainer.nets.present().items():
        model = network_model(net)
        handles += [model.register_forward_pre_hook(stopwatch_start(name)),
                    model.register_forward_hook(pass_end(name), always_call=True)]
    for optimizer in filter(None, trainer.optimizers.values()):
        handles += [optimizer.register_step_pre_hook(stopwatch_start("optimizer")),
                    optimizer.register_step_post_hook(optimizer_end)]
    backward = trainer.acc.backward
    trainer.acc.backward = timed_backward
    try:
        yield record
    finally:
        del trainer.acc.backward
        for handle in handles:
            handle.remove()


def peak_live_bytes(prof: profile) -> int:
    """The highest running sum of the allocations (positive) and frees (negative) the profiler recorded."""
    sizes, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        event = stack.pop()
        stack.extend(event.children)
        if event.tag == _EventType.Allocation:
            sizes.append((event.start_time_ns, event.extra_fields.alloc_size))
    live = peak = 0
    for _, size in sorted(sizes):
        live += size
        peak = max(peak, live)
    return peak


def step_peak_mib(trainer: Trainer, step: int) -> float:
    """Peak live tensor memory during one training step above what was live when it began."""
    device = trainer.acc.device
    if device.type == "cuda":
        synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        trainer.train_step(step)
        synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / MIB
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        trainer.train_step(step)
    return peak_live_bytes(prof) / MIB


def steady_state_steps(objective) -> dict[str, int]:
    """The first step index of each kind from :data:`STEADY_STATE_STEP` on, the critic first."""
    steps: dict[str, int] = {}
    for step in range(STEADY_STATE_STEP, STEADY_STATE_STEP + 100):
        steps.setdefault(objective.step_kind(step), step)
    return dict(sorted(steps.items()))


def critic_per_generator(objective, window: int = 60) -> float:
    """Critic steps per generator step in steady state (60 steps hold a whole number of cycles up to 6)."""
    kinds = Counter(objective.step_kind(s) for s in range(STEADY_STATE_STEP, STEADY_STATE_STEP + window))
    return kinds["critic"] / kinds["generator"]


def overhead_row(plain: list[float], records: list[list[PassRecord]], peak_mib: float) -> dict:
    """Timings of one step kind, or of several summed per repeat (``records[i]`` holds repeat i's steps)."""
    def per_repeat(measure) -> list[float]:
        return [sum(measure(r) for r in rs) for rs in records]

    forward = per_repeat(lambda r: sum(r.forward_ms.values()))
    backward = per_repeat(lambda r: r.backward_ms)
    overhead = [100 * (p - f - b) / p for p, f, b in zip(plain, forward, backward, strict=True)]
    passes = {name: {"forward": sum(r.forwards[name] for r in records[0]),
                     "with_graph": sum(r.with_graph[name] for r in records[0]),
                     "stopped": sum(r.stopped[name] for r in records[0])}
              for name in NETWORK_LETTERS if any(r.forwards[name] for r in records[0])}
    return {"step_ms": spread(plain), "instrumented_step_ms": spread(per_repeat(lambda r: r.step_ms)),
            "forward_ms": spread(forward), "backward_ms": spread(backward),
            "optimizer_ms": spread(per_repeat(lambda r: r.optimizer_ms)), "overhead_percent": spread(overhead),
            "forward_ms_by_network": {name: statistics.median(per_repeat(lambda r, name=name: r.forward_ms[name]))
                                      for name in passes},
            "passes": passes, "peak_mib": peak_mib}


def training(name: str, args) -> dict:
    cfg, options, nets, objective, task = quickstart_experiment(name, args.batch_size)
    trainer = Trainer(nets, objective, task.batches(objective.needs_real_data), cfg, make_accelerator(args.device),
                      progress=False)
    device, steps = trainer.acc.device, steady_state_steps(objective)
    for step in steps.values():
        for _ in range(WARMUP):
            trainer.train_step(step)
    plain = {kind: [] for kind in steps}
    records = {kind: [] for kind in steps}
    for _ in range(args.repeats):
        for kind, step in steps.items():
            plain[kind].append(elapsed_ms(lambda step=step: trainer.train_step(step), device))
            with recorded_passes(trainer) as record:
                record.step_ms = elapsed_ms(lambda step=step: trainer.train_step(step), device)
            records[kind].append(record)
    peaks = {kind: step_peak_mib(trainer, step) for kind, step in steps.items()}
    rows = {kind: overhead_row(plain[kind], [[r] for r in records[kind]], peaks[kind]) for kind in steps}
    if len(steps) > 1:
        summed = [sum(ms) for ms in zip(*plain.values(), strict=True)]
        rows["iteration"] = overhead_row(summed, [list(rs) for rs in zip(*records.values(), strict=True)],
                                         max(peaks.values()))
    return {"objective": name, "options": asdict(options), "step_index": steps,
            "critic_per_generator": critic_per_generator(objective), "batch_size": args.batch_size,
            "seed": cfg.run.seed, "rows": rows}


# ------------------------------------------------------------------------------------ features-only passes
FEATURE_LOSS_STEPS = 20  # training steps whose losses are compared between the two ways of reading features


@contextmanager
def full_feature_passes():
    """Features read as before the early stop: every features-only pass runs the whole network."""
    with mock.patch.object(DiffusersDenoiser, "features", Denoiser.features):
        yield


def feature_passes(args) -> list[dict]:
    """For each objective whose discriminator reads the teacher's features: its critic step with the
    features-only teacher passes stopped at the last feature block (as fdistill runs) and run whole, on one trainer
    each from the same seed. The losses of both trainers' first :data:`FEATURE_LOSS_STEPS` steps must be equal (the
    features are the same tensors, so training, and with it the FD, is unchanged); then critic steps are timed,
    the two ways alternating."""
    modes = {"stopped": nullcontext, "whole": full_feature_passes}
    rows = []
    for name in sorted(OBJECTIVES):
        if not quickstart_experiment(name, args.batch_size)[3].needs_discriminator:
            continue
        trainers, losses = {}, {}
        for mode, context in modes.items():
            cfg, options, nets, objective, task = quickstart_experiment(name, args.batch_size)
            trainers[mode] = Trainer(nets, objective, task.batches(objective.needs_real_data), cfg,
                                     make_accelerator(args.device), progress=False)
            with context():
                losses[mode] = [trainers[mode].train_step(step)[1] for step in range(FEATURE_LOSS_STEPS)]
        step = steady_state_steps(objective)["critic"]
        plain, records = defaultdict(list), defaultdict(list)
        for _ in range(args.repeats):
            for mode, context in modes.items():
                trainer = trainers[mode]
                with context():
                    plain[mode].append(elapsed_ms(partial(trainer.train_step, step), trainer.acc.device))
                    with recorded_passes(trainer) as record:
                        record.step_ms = elapsed_ms(partial(trainer.train_step, step), trainer.acc.device)
                records[mode].append([record])
        differences = [abs(a[k] - b[k]) for a, b in zip(losses["stopped"], losses["whole"], strict=True) for k in a]
        rows.append({"objective": name,
                     "discriminator_features": cfg.objective["discriminator_features"] or ["teacher's default"],
                     "critic_step": {mode: overhead_row(plain[mode], records[mode], float("nan")) for mode in modes},
                     "loss_steps_compared": FEATURE_LOSS_STEPS, "largest_loss_difference": max(differences),
                     "batch_size": args.batch_size, "seed": cfg.run.seed})
    return rows


def print_feature_passes(rows: list[dict], device: str) -> None:
    print("\n5. critic steps whose discriminator reads the teacher's features: features-only teacher passes stopped "
          "at the last feature block (fdistill) or run whole (before); T passes: all / stopped early")
    print(f"{'objective':13s} {'features':16s} {'passes':8s} {'step ms':>15s} {'T fwd ms':>9s} {'T passes':>9s} "
          f"{'step / whole':>12s} {'loss diff':>9s} {'batch':>5s} {'seed':>4s} {'device':>7s}")
    for r in rows:
        whole = r["critic_step"]["whole"]["step_ms"]["median"]
        for mode, t in r["critic_step"].items():
            teacher = t["passes"].get("teacher", {"forward": 0, "stopped": 0})
            print(f"{r['objective']:13s} {','.join(r['discriminator_features']):16s} {mode:8s} "
                  f"{shown(t['step_ms']):>15s} {t['forward_ms_by_network'].get('teacher', 0.0):9.1f} "
                  f"{teacher['forward']:>5d} / {teacher['stopped']:<1d} {t['step_ms']['median'] / whole:12.3f} "
                  f"{r['largest_loss_difference']:9.1e} {r['batch_size']:5d} {r['seed']:4d} {device:>7s}")


# -------------------------------------------------------------------------------------------------- JVP
def relative_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    return float((approx.double() - exact.double()).norm() / exact.double().norm())


def jvp_comparison(args, device: torch.device) -> dict:
    cfg, options, nets, objective, task = quickstart_experiment("scm", args.batch_size)
    nets.to(device)
    objective.to(device)
    torch.manual_seed(cfg.run.seed)
    batch = next(iter(task.batches(objective.needs_real_data))).to(device)
    with mock.patch.object(scm, "time_jvp", wraps=time_jvp) as captured:
        objective.generator_loss(batch, nets, STEADY_STATE_STEP)
    # the function (the student's velocity), the point, the tangent, the network and its forward's RNG state
    arguments = inspect.signature(time_jvp).bind(*captured.call_args.args, **captured.call_args.kwargs).arguments
    fn, x, t = arguments["fn"], arguments["x"], arguments["t"]

    def jvp(mode: str, relative_step: float = options.fd_step):
        return time_jvp(**{**arguments, "mode": mode, "relative_step": relative_step})

    exact = jvp("exact")
    errors = {h: relative_error(jvp("finite_difference", h), exact) for h in FD_RELATIVE_STEPS}
    with torch.no_grad():
        calls = {"forward": lambda: fn(x, t), **{mode: lambda mode=mode: jvp(mode) for mode in MODES}}
        for call in calls.values():
            for _ in range(WARMUP):
                call()
        call_ms = {name: [] for name in calls}
        for _ in range(args.repeats):
            for name, call in calls.items():
                call_ms[name].append(elapsed_ms(call, device))
    overrides = ["teacher.kind=embedded", "data.kind=digits", TRIGFLOW_TIMES["scm"]]
    iterations = {mode: SCMIteration(None, overrides, args.batch_size, mode, device) for mode in MODES}
    for run in iterations.values():
        seconds_per_iteration(run, WARMUP)
    iteration_ms = {mode: [] for mode in MODES}
    for _ in range(args.repeats):
        for mode, run in iterations.items():
            iteration_ms[mode].append(1e3 * seconds_per_iteration(run, 1))
    rows = [{"mode": mode, "jvp_ms": spread(call_ms[mode]),
             "jvp_over_forward": statistics.median(call_ms[mode]) / statistics.median(call_ms["forward"]),
             "scm_iteration_ms": spread(iteration_ms[mode]),
             "relative_error_vs_exact": {str(h): errors[h] for h in FD_RELATIVE_STEPS} if mode != "exact" else None}
            for mode in MODES]
    return {"forward_ms": spread(call_ms["forward"]), "rows": rows, "batch_size": args.batch_size,
            "seed": cfg.run.seed, "student_time": TRIGFLOW_TIMES["scm"], "fd_relative_steps": FD_RELATIVE_STEPS}


# ------------------------------------------------------------------------------------------------ report
def print_sampling(s: dict, device: str) -> None:
    print(f"\n1. sampling (one batch; teacher {s['teacher_sampler']} ODE, student untrained copy)")
    print(f"{'sampler':22s} {'NFE':>4s} {'samples/s':>15s} {'speed-up':>13s} {'ideal':>6s} {'/ideal':>6s} "
          f"{'n':>4s} {'seed':>5s} {'device':>7s}")
    for r in s["rows"]:
        print(f"{r['sampler']:22s} {r['nfe']:4d} {shown(r['samples_per_second']):>15s} "
              f"{shown(r['speedup'], 2):>13s} {r['ideal_speedup']:6.1f} {r['speedup_over_ideal']:6.2f} "
              f"{r['samples']:4d} {r['seed']:5d} {device:>7s}")


def print_training_header() -> None:
    print("\n2./3. training steps (Trainer.train_step): plain step, network forwards, backward, optimizer, "
          "overhead = (step - forwards - backward) / step, peak = step's peak tensor memory above its start")
    print("passes: forward passes / of them keeping a graph for backward; T teacher, S student, F fake score, "
          "D discriminator; iteration = critic + generator step")
    print(f"{'objective':13s} {'step':9s} {'step ms':>15s} {'fwd ms':>8s} {'bwd ms':>8s} {'opt ms':>7s} "
          f"{'overhead %':>12s} {'passes':22s} {'peak MiB':>8s} {'batch':>5s} {'seed':>4s} {'device':>7s}")


def print_training(o: dict, device: str) -> None:
    for kind, r in o["rows"].items():
        passes = " ".join(f"{NETWORK_LETTERS[n]}{p['forward']}/{p['with_graph']}" for n, p in r["passes"].items())
        print(f"{o['objective']:13s} {kind:9s} {shown(r['step_ms']):>15s} {r['forward_ms']['median']:8.1f} "
              f"{r['backward_ms']['median']:8.1f} {r['optimizer_ms']['median']:7.1f} "
              f"{shown(r['overhead_percent']):>12s} {passes:22s} {r['peak_mib']:8.1f} {o['batch_size']:5d} "
              f"{o['seed']:4d} {device:>7s}")


def print_jvp(j: dict, device: str) -> None:
    print(f"\n4. sCM tangent JVP dF/dt of the student at {j['student_time']}, against one forward pass; relative "
          f"errors of the finite difference at steps {', '.join(f'{h:g}' for h in j['fd_relative_steps'])}")
    print(f"{'call':18s} {'ms':>13s} {'x fwd':>6s} {'sCD iteration ms':>17s}  {'rel. error vs exact':28s} "
          f"{'batch':>5s} {'seed':>4s} {'device':>7s}")
    print(f"{'forward':18s} {shown(j['forward_ms']):>13s} {1:6.2f} {'-':>17s}  {'-':28s} {j['batch_size']:5d} "
          f"{j['seed']:4d} {device:>7s}")
    for r in j["rows"]:
        errors = r["relative_error_vs_exact"]
        agreement = "  ".join(f"{errors[str(h)]:.1e}" for h in j["fd_relative_steps"]) if errors else "-"
        print(f"{r['mode']:18s} {shown(r['jvp_ms']):>13s} {r['jvp_over_forward']:6.2f} "
              f"{shown(r['scm_iteration_ms']):>17s}  {agreement:28s} {j['batch_size']:5d} {j['seed']:4d} {device:>7s}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the quickstart's train.batch_size")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--teacher-steps", type=int, default=None, help="default: the quickstart's eval.teacher_steps")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--only", action="append", choices=SECTIONS, help="run only this section (repeatable)")
    args = parser.parse_args(argv)
    sections = args.only or SECTIONS
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    start = time.perf_counter()
    quickstart, _ = load_config(str(QUICKSTART))
    args.batch_size = args.batch_size or quickstart.train.batch_size
    args.teacher_steps = args.teacher_steps or quickstart.eval.teacher_steps
    accelerator = make_accelerator(args.device)
    device = str(accelerator.device)
    kept = json.loads(args.out.read_text()) if args.only and args.out.is_file() else {}
    result = {**kept, "environment": environment(accelerator, quickstart), "device": device,
              "repeats": args.repeats, "warmup": WARMUP, "batch_size": args.batch_size,
              "steady_state_step": STEADY_STATE_STEP}
    env = result["environment"]
    print(f"device: {env['device']}, {env['threads']} threads, torch {env['torch']}; ms and samples/s are "
          f"median ±half-range of {args.repeats} repeats")
    if "sampling" in sections:
        result["sampling"] = sampling(args, accelerator.device)
        print_sampling(result["sampling"], device)
    if "training" in sections:
        print_training_header()
        result["training"] = []
        for name in sorted(OBJECTIVES):
            result["training"].append(training(name, args))
            print_training(result["training"][-1], device)
    if "jvp" in sections:
        result["jvp"] = jvp_comparison(args, accelerator.device)
        print_jvp(result["jvp"], device)
    if "features" in sections:
        result["feature_passes"] = feature_passes(args)
        print_feature_passes(result["feature_passes"], device)
    result["wall_seconds"] = time.perf_counter() - start
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out} ({result['wall_seconds']:.0f} s in all)")


if __name__ == "__main__":
    main()
