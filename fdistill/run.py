"""One experiment end to end: build, train (on any number of processes), export, evaluate, write the run dir.

``RUN_DIR/config.yaml`` holds the resolved configuration, ``RUN_DIR/student.safetensors`` the student's
trained weights (a LoRA student's adapter weights alone, :mod:`fdistill.networks.lora`) and
``RUN_DIR/student_ema_<name>.safetensors`` each EMA of them, ``RUN_DIR/checkpoints/`` the resumable state,
``RUN_DIR/train_log.csv`` and ``RUN_DIR/tensorboard/`` the training scalars, and ``RUN_DIR/metrics.json`` the
results (one entry per sampler, computed with the ``eval.ema`` weights), the objective, steps and wall time; image
runs add ``RUN_DIR/samples/`` (each sampler's PNGs and a student-vs-teacher grid) and ``RUN_DIR/pipeline/``, the
student as a diffusers pipeline (``fdistill.pipelines.export``). Only the main process writes; evaluation runs on it
alone.

The run is where the parts meet: it builds the teacher, the task (:func:`fdistill.tasks.build_task`), the
objective and the networks, hands the trainer the task's batches and hooks, and afterwards asks the task to
evaluate and export.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, ProjectConfiguration
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

from fdistill.config import Config, dump_config
from fdistill.containers import Networks
from fdistill.errors import ConfigError
from fdistill.networks.denoisers import Denoiser
from fdistill.networks.discriminator import discriminator_for
from fdistill.networks.generator import student_times
from fdistill.networks.lora import (
    FAKE_SCORE_ADAPTER,
    STUDENT_ADAPTER,
    SharedBase,
    load_student_file,
    lora_network,
    student_file_weights,
)
from fdistill.objectives import Objective, build_objective
from fdistill.pipelines.export import portable_path
from fdistill.preflight import GIB, check_device, check_fits, estimate_memory
from fdistill.recipes import load_config
from fdistill.tasks import Task, build_task
from fdistill.teachers import build_teacher, frozen_dtype, teacher_name, with_guidance
from fdistill.training import checkpoint as checkpoints
from fdistill.training.trainer import Trainer, TrainSummary

STUDENT_FILE = "student.safetensors"


def student_file(ema: str | None) -> str:
    return STUDENT_FILE if ema is None else f"student_ema_{ema}.safetensors"


def save_student_files(run_dir: Path, weights, write: bool = True) -> None:
    """Write the student's weights, ``(name, state dict)`` pairs (``Trainer.student_weights``: trained under
    ``None``, EMAs by name), to their student files; a LoRA student's files hold its adapter weights alone. Every
    process iterates (gathering sharded weights is collective); those with ``write`` false write nothing."""
    for name, state in weights:
        if write:
            kept = student_file_weights(state)
            save_file({k: v.contiguous() for k, v in kept.items()}, str(run_dir / student_file(name)))
        del state


def make_accelerator(cfg: Config) -> Accelerator:
    """Devices, processes and mixed precision come from accelerate; ``train.mixed_precision`` decides."""
    project = ProjectConfiguration(project_dir=cfg.run.dir, logging_dir=cfg.run.dir)
    accelerator = Accelerator(mixed_precision=cfg.train.mixed_precision, project_config=project,
                              log_with="tensorboard" if cfg.log.tensorboard else None)
    if cfg.train.mixed_precision == "fp16" and (accelerator.scaler is None or cfg.train.fsdp):
        raise ConfigError("train.mixed_precision=fp16 needs a GPU and no FSDP; use bf16")
    if accelerator.distributed_type == DistributedType.FSDP:
        raise ConfigError("launch without accelerate's FSDP options and set train.fsdp=true instead")
    return accelerator


def prepare_run_dir(run_dir: Path, accelerator, resume: str | None = None,
                    overwrite: bool = False) -> Path | None:
    """Check the run directory before any training: returns the checkpoint to resume from, if any.

    An existing run (one with a ``config.yaml``) is continued only with ``resume`` and replaced only with
    ``overwrite``. Every process checks, so that an error stops all of them alike.
    """
    if resume and overwrite:
        raise ConfigError("--resume and --overwrite exclude each other")
    existing = (run_dir / "config.yaml").is_file()
    if existing and not (resume or overwrite):
        raise ConfigError(f"{run_dir} already holds a run; continue it with --resume, replace it with "
                          f"--overwrite, or choose another run.dir")
    note = print if accelerator.is_main_process else (lambda message: None)
    start = checkpoints.resolve(run_dir, resume, note) if resume else None
    accelerator.wait_for_everyone()
    if overwrite and existing and accelerator.is_main_process:
        shutil.rmtree(run_dir)
    accelerator.wait_for_everyone()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write_test_{accelerator.process_index}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"run directory {run_dir} is not writable ({e.strerror}); set run.dir=PATH") \
            from None
    return start


def changed_keys(old_yaml: str, cfg: Config) -> list[str]:
    """Dotted keys whose values differ between a saved config and ``cfg``."""
    def flat(d, prefix=""):
        return {k: v for key, val in d.items() for k, v in
                (flat(val, f"{prefix}{key}.").items() if isinstance(val, dict) else [(prefix + key, val)])}

    old = flat(OmegaConf.to_container(OmegaConf.create(old_yaml)))
    new = flat(OmegaConf.to_container(OmegaConf.structured(cfg)))
    return sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))


def build_networks(cfg: Config, teacher: Denoiser, objective: Objective, task: Task) -> Networks:
    """Student (and fake score / discriminator when the objective uses them) for the unguided ``teacher``; the
    networks' teacher is the one objectives read, guided when ``teacher.guidance_scale`` asks for it.

    A network is a full trainable copy of the teacher, or with ``student.lora`` / ``fake_score.lora`` an adapter
    on the teacher's own network, which then holds the frozen weights of all three
    (:class:`fdistill.networks.lora.SharedBase`). Full copies are made before the teacher's weights are cast to
    their frozen dtype (``teacher.dtype``)."""
    times = student_times(teacher, cfg.generator.times, cfg.generator.noise_level)
    if cfg.fake_score.lora is not None and not objective.needs_fake_score:
        raise ConfigError(f"fake_score.lora: objective {objective.name} trains no fake score; remove it")
    student_net = task.trainable_copy() if cfg.student.lora is None else None
    fake_score = task.trainable_copy() if objective.needs_fake_score and cfg.fake_score.lora is None else None
    if hasattr(teacher, "keep_weights_in"):
        teacher.keep_weights_in(frozen_dtype(cfg))
    base = None
    if cfg.student.lora is not None or cfg.fake_score.lora is not None:
        base = SharedBase(teacher, "student.lora" if cfg.student.lora is not None else "fake_score.lora")
    if student_net is None:
        student_net = lora_network(base, STUDENT_ADAPTER, cfg.student.lora, "student.lora")
    if objective.needs_fake_score and fake_score is None:
        fake_score = lora_network(base, FAKE_SCORE_ADAPTER, cfg.fake_score.lora, "fake_score.lora")
    if cfg.train.gradient_checkpointing:
        checkpoint_activations([teacher, student_net, fake_score], base)
    try:
        student = objective.build_student(student_net, times)
        served = student.servable()  # e.g. an sCM student's times matched to the teacher's timesteps
    except ValueError as e:
        raise ConfigError(f"generator.times={times}: {str(e).splitlines()[0]}") from None
    if served.stock is not None and cfg.eval.renoise not in (None, served.renoise_mode):
        raise ConfigError(f"eval.renoise={cfg.eval.renoise}: this student re-noises as its exported pipeline's "
                          f"scheduler does ({served.renoise_mode}); remove eval.renoise")
    discriminator = None
    if objective.discriminator_features is not None:
        if not objective.needs_discriminator:
            raise ConfigError("objective.discriminator_features is read only when the objective trains a "
                              "discriminator on teacher features; remove it or give objective.gan_weight > 0")
        try:
            teacher.read_features(objective.discriminator_features)
        except ValueError as e:
            raise ConfigError(f"objective.discriminator_features: {str(e).splitlines()[0]}") from None
    if objective.needs_discriminator:
        probe = torch.zeros(2, *teacher.sample_shape)
        t = torch.full((2,), teacher.schedule.t_max, dtype=torch.float64)
        with torch.no_grad():
            _, features = teacher.forward_with_features(probe, t, task.condition_probe(2))
        discriminator = discriminator_for(features)
    return Networks(teacher=with_guidance(teacher, cfg, task.unconditional), student=student, fake_score=fake_score,
                    discriminator=discriminator)


def checkpoint_activations(nets: list[Denoiser | None], base: SharedBase | None) -> None:
    """``train.gradient_checkpointing``: every diffusers model among ``nets`` recomputes its blocks' activations in
    the backward pass; the shared base with the adapter each block first ran with."""
    models = {id(net.network): net.network for net in nets if getattr(net, "network", None) is not None}
    if not models:
        raise ConfigError("train.gradient_checkpointing acts on diffusers UNets and transformers, and this run has "
                          "none; remove it")
    for model in models.values():
        if not getattr(model, "_supports_gradient_checkpointing", False):
            raise ConfigError(f"train.gradient_checkpointing: diffusers' {type(model).__name__} does not support it; "
                              "remove it")
        shared = base is not None and model is base.model
        model.enable_gradient_checkpointing(base.checkpoint if shared else None)


def build_experiment(cfg: Config, options) -> tuple[Networks, Objective, Task]:
    """Teacher, task, objective and networks; an objective's ``ValueError`` about its options is a user error."""
    torch.manual_seed(cfg.run.seed)
    teacher = build_teacher(cfg)
    task = build_task(cfg, teacher)
    try:
        objective = build_objective(options, teacher.schedule)
    except ValueError as e:
        raise ConfigError(f"objective {options.name}: {str(e).splitlines()[0]}") from None
    return build_networks(cfg, teacher, objective, task), objective, task


def _write_config(run_dir: Path, cfg: Config, resuming: bool) -> str | None:
    """Write ``config.yaml``; on resume, returns a note naming the keys that changed."""
    path, note = run_dir / "config.yaml", None
    if resuming and path.is_file():
        diff = changed_keys(path.read_text(), cfg)
        note = f"resuming with changed config keys: {', '.join(diff)}" if diff else None
    path.write_text(dump_config(cfg))
    return note


def run_experiment(cfg: Config, options, progress: bool = True, resume: str | None = None,
                   overwrite: bool = False) -> dict | None:
    """Train and evaluate; returns the metrics on the main process and ``None`` on the others.

    ``resume`` is ``"latest"`` (the newest checkpoint of ``run.dir``, or a fresh start if it has none) or a
    checkpoint directory.
    """
    accelerator = make_accelerator(cfg)
    run_dir = Path(cfg.run.dir)
    start = prepare_run_dir(run_dir, accelerator, resume, overwrite)
    check_device(cfg, accelerator.device)  # before any weight loads
    estimate = estimate_memory(cfg, options, accelerator.num_processes, device=accelerator.device.type)
    if estimate is not None:
        if accelerator.is_main_process and progress:
            print(estimate.table())
        check_fits(cfg, options, estimate, accelerator.device, accelerator.num_processes)
    summary = _train(cfg, options, accelerator, run_dir, start, resume is not None, progress)
    gc.collect()  # the training networks hold reference cycles (a shared base and its checkpointing function)
    if not accelerator.is_main_process:
        return None
    if estimate is not None:
        print(f"training peak memory {summary.peak_memory / GIB:.2f} GiB per process (pre-flight estimate "
              f"{estimate.total / GIB:.2f} GiB)")
    _, eval_nets, task = load_run(run_dir, device=accelerator.device)
    metrics = {
        "objective": options.name,
        "steps": summary.steps,
        "wall_seconds": summary.wall_seconds,
        "final_losses": summary.last_logs,
        "nonfinite_steps": summary.nonfinite_steps,
        "memory": {"training_peak_bytes": summary.peak_memory,
                   "estimated_peak_bytes": None if estimate is None else estimate.total},
        "protocol": {"num_samples": cfg.eval.num_samples, "seed": cfg.eval.seed, "ema": cfg.eval.ema},
        "environment": environment(accelerator, cfg),
        "results": task.evaluate(eval_nets, run_dir, progress),
    }
    tmp = run_dir / "metrics.json.tmp"
    tmp.write_text(json.dumps(metrics, indent=2))
    os.replace(tmp, run_dir / "metrics.json")
    metadata = export_metadata(cfg, options, summary.steps, cfg.eval.ema, str(run_dir))
    metadata["results"] = metrics["results"]
    try:
        task.export(eval_nets.student, run_dir / "pipeline", metadata, in_place=True)
    except (ValueError, NotImplementedError) as e:
        print(f"no pipeline written: {e}")
    return metrics


def _train(cfg: Config, options, accelerator: Accelerator, run_dir: Path, start: Path | None, resuming: bool,
           progress: bool) -> TrainSummary:
    """Build and train, and write the student files; the training networks are gone when it returns, before the
    evaluation builds its own."""
    nets, objective, task = build_experiment(cfg, options)
    batches = task.batches(objective.needs_real_data, accelerator.device)
    trainer = Trainer(nets, objective, batches, cfg, accelerator, run_dir, progress,
                      preview=task.preview, metrics=task.training_metrics)
    if start is not None:
        trainer.load_checkpoint(start)
    if accelerator.is_main_process:  # only once the experiment builds and resumes: a run dir with a config is a run
        note = _write_config(run_dir, cfg, resuming)
        if note:
            print(note)
    summary = trainer.fit()
    save_student_files(run_dir, trainer.student_weights(), accelerator.is_main_process)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    trainer.release()
    return summary


def environment(accelerator: Accelerator, cfg: Config) -> dict:
    """Where the run's numbers come from: device, processes, precision, library versions, fdistill's version and
    the commit of its checkout (``None`` outside a git checkout)."""
    import platform
    import subprocess
    from importlib.metadata import PackageNotFoundError, version

    def package(name):
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    device = accelerator.device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    try:
        root = Path(__file__).resolve().parent.parent
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {"device": f"{device.type} ({name})", "processes": accelerator.num_processes,
            "threads": torch.get_num_threads(), "mixed_precision": cfg.train.mixed_precision,
            "python": platform.python_version(), "torch": torch.__version__, "diffusers": package("diffusers"),
            "accelerate": package("accelerate"), "fdistill": package("fdistill"), "commit": commit}


def load_run(run_dir: str | Path, ema: str | None = "auto", device=None) -> tuple[Config, Networks, Task]:
    """Rebuild a finished run's networks and task from ``RUN_DIR/config.yaml`` and load the student's weights.

    ``ema="auto"`` loads the weights the run was evaluated with (``eval.ema``), ``None`` the trained weights,
    a name that EMA.
    """
    run_dir = Path(run_dir)
    cfg, options = _run_config(run_dir)
    weights = run_dir / student_file(cfg.eval.ema if ema == "auto" else ema)
    if not weights.is_file():
        raise ConfigError(f"{weights} not found; is {run_dir} a finished run directory?")
    nets, _, task = build_experiment(cfg, options)
    load_student_file(nets.student, load_file(str(weights)))
    if device is not None:
        nets.to(device)
    return cfg, nets, task


def _run_config(run_dir: Path):
    if not (run_dir / "config.yaml").is_file():
        raise ConfigError(f"{run_dir / 'config.yaml'} not found; is {run_dir} a run directory?")
    return load_config(str(run_dir / "config.yaml"))


def export_metadata(cfg: Config, options, steps: int, ema: str | None, source: str) -> dict:
    """What an exported pipeline records about the run it came from (``source``: the run or checkpoint directory,
    recorded by :func:`portable_path`)."""
    return {
        "objective": options.name,
        "training_steps": steps,
        "ema": ema,
        "teacher": {"kind": cfg.teacher.kind, "source": teacher_name(cfg),
                    "guidance_scale": cfg.teacher.guidance_scale, "negative_prompt": cfg.teacher.negative_prompt},
        "exported_from": portable_path(source),
    }


def export_run(run_dir: str | Path, out_dir: str | Path | None = None, checkpoint: str | None = None,
               ema: str | None = "auto") -> Path:
    """Export the student of a run: its final weights (default) or those of a checkpoint.

    ``checkpoint`` is ``None`` (the finished run's weights), ``"latest"``, a checkpoint's name
    (``step-00001000``) or directory; ``ema`` is ``"auto"`` (``eval.ema``, the weights the run is evaluated with),
    ``None`` (the trained weights) or an EMA name. ``out_dir`` defaults to ``RUN_DIR/pipeline``. Errors are
    :class:`ConfigError`.
    """
    run_dir = Path(run_dir)
    cfg, options = _run_config(run_dir)
    ema_name = cfg.eval.ema if ema == "auto" else ema
    extra = {}
    if checkpoint is None:
        _, nets, task = load_run(run_dir, ema=ema_name)
        metrics_file = run_dir / "metrics.json"
        metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
        steps, source = metrics.get("steps", cfg.train.steps), str(run_dir)
        if ema_name == cfg.eval.ema and "results" in metrics:  # the weights metrics.json describes
            extra = {"results": metrics["results"]}
    else:
        nets, _, task = build_experiment(cfg, options)
        path = checkpoints.find(run_dir, str(checkpoint))
        steps, source = checkpoints.load_student(path, nets.student, ema_name), str(path)
    try:
        out = task.export(nets.student, Path(out_dir or run_dir / "pipeline"),
                          export_metadata(cfg, options, steps, ema_name, source) | extra, in_place=True)
    except (ValueError, NotImplementedError) as e:
        raise ConfigError(f"cannot export {run_dir}: {e}") from None
    if out is None:
        raise ConfigError(f"cannot export {run_dir}: its students ({cfg.teacher.kind} teacher) have no diffusers "
                          "pipeline form")
    return out
