"""One experiment end to end: build, train, evaluate, and write the run directory.

``RUN_DIR/config.yaml`` holds the resolved configuration, ``RUN_DIR/student.safetensors`` the student's
weights and ``RUN_DIR/metrics.json`` the results (one entry per sampler), the objective, steps and wall time.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from fdistill.config import Config, ConfigError, dump_config, load_config
from fdistill import tasks
from fdistill.objectives import Networks, build_objective
from fdistill.teachers import build_networks, build_teacher
from fdistill.training.trainer import Trainer

STUDENT_FILE = "student.safetensors"


def prepare_run_dir(run_dir: Path) -> Path:
    """Create the run directory and check that it is writable, before any training starts."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write_test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"run directory {run_dir} is not writable ({e.strerror}); set run.dir=PATH") from None
    return run_dir


def build_experiment(cfg: Config, options) -> tuple[Networks, torch.nn.Module]:
    torch.manual_seed(cfg.run.seed)
    teacher = build_teacher(cfg)
    objective = build_objective(options, teacher.schedule)
    return build_networks(cfg, teacher, objective), objective


def run_experiment(cfg: Config, options, progress: bool = True) -> dict:
    run_dir = prepare_run_dir(Path(cfg.run.dir))
    (run_dir / "config.yaml").write_text(dump_config(cfg))
    nets, objective = build_experiment(cfg, options)
    trainer = Trainer(nets, objective, tasks.training_batches(cfg, nets, objective), cfg.student_optim,
                      cfg.critic_optim, cfg.train.steps, cfg.train.log_every, progress)
    summary = trainer.fit()
    save_file(nets.student.state_dict(), str(run_dir / STUDENT_FILE))
    metrics = {
        "objective": options.name,
        "steps": summary.steps,
        "wall_seconds": summary.wall_seconds,
        "final_losses": summary.last_logs,
        "protocol": {"num_samples": cfg.eval.num_samples, "seed": cfg.eval.seed},
        "results": tasks.evaluate(cfg, nets, run_dir),
    }
    tmp = run_dir / "metrics.json.tmp"
    tmp.write_text(json.dumps(metrics, indent=2))
    os.replace(tmp, run_dir / "metrics.json")
    return metrics


def load_run(run_dir: str | Path) -> tuple[Config, Networks]:
    """Rebuild a finished run's networks from ``RUN_DIR/config.yaml`` and load the student's weights."""
    run_dir = Path(run_dir)
    for name in ("config.yaml", STUDENT_FILE):
        if not (run_dir / name).is_file():
            raise ConfigError(f"{run_dir / name} not found; is {run_dir} a finished run directory?")
    cfg, options = load_config(str(run_dir / "config.yaml"))
    nets, _ = build_experiment(cfg, options)
    nets.student.load_state_dict(load_file(str(run_dir / STUDENT_FILE)))
    return cfg, nets
