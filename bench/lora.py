"""Full fine-tuning against LoRA (``student.lora``) on a quickstart: trainable parameters, memory, step time and,
from two finished runs, the students' quality.

    python bench/lora.py [--config configs/quickstart.yaml] [--lora KEY=VALUE ...] [--device cpu|cuda]
                         [--batch-size 48] [--repeats 5] [--runs FULL_RUN_DIR LORA_RUN_DIR]
                         [--out bench/results/lora.json]

Both variants are ``--config`` (by default ``configs/quickstart.yaml``: f-distill JS, the embedded digits
teacher; ``configs/quickstart_t2i_flow.yaml`` is the flow-matching transformer), the second with ``--lora``'s
overrides (default ``student.lora={}``: rank 8, diffusers' default target layers; the fake score stays a full
copy), built and stepped as ``bench/speed.py`` does. Per variant:

* trainable parameters of the student and of the whole run (student, fake score, discriminator), and all
  parameters of the student;
* optimizer state (AdamW's two moments of every trained parameter) after a generator and a critic step, in MiB;
* the peak of live tensor memory during a generator step above what was live before it (activations and
  gradients; ``bench/speed.py`` explains how it is measured), and the student's weights;
* the generator step's time, median of ``--repeats``.

``--runs`` names two finished run directories (e.g. ``train.py --config configs/quickstart.yaml`` and the same
with ``student.lora={}``) whose ``metrics.json`` give each student's FD beside the teacher's (and, for
text-to-image, CLIP score and compositional accuracy on the training prompts).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import speed
from speed import MIB, elapsed_ms, make_accelerator, quickstart_experiment, steady_state_steps, step_peak_mib

from fdistill.recipes import load_config
from fdistill.run import build_experiment
from fdistill.training.trainer import Trainer

RESULTS = speed.ROOT / "bench" / "results" / "lora.json"
QUALITY = ("fd", "clip_score", "compositional_accuracy")


def numel(params) -> int:
    return sum(p.numel() for p in params)


def experiment(overrides: tuple[str, ...], args):
    """``(cfg, nets, objective, task)`` of the digits quickstart as ``bench/speed.py`` builds it, or of
    ``--config`` as it stands."""
    if args.config.resolve() == speed.QUICKSTART:
        cfg, _, nets, objective, task = quickstart_experiment("f_distill", args.batch_size, overrides)
        return cfg, nets, objective, task
    cfg, options = load_config(str(args.config), [f"train.batch_size={args.batch_size}", *overrides])
    return cfg, *build_experiment(cfg, options)


def measure(overrides: tuple[str, ...], args) -> dict:
    cfg, nets, objective, task = experiment(overrides, args)
    trainer = Trainer(nets, objective, task.batches(objective.needs_real_data), cfg, make_accelerator(args.device),
                      progress=False)
    steps = steady_state_steps(objective)
    for step in steps.values():
        for _ in range(speed.WARMUP):
            trainer.train_step(step)
    generator_ms = [elapsed_ms(lambda: trainer.train_step(steps["generator"]), trainer.acc.device)
                    for _ in range(args.repeats)]
    optimizer_bytes = sum(t.numel() * t.element_size() for opt in trainer.optimizers.values() if opt
                          for state in opt.state.values() for t in state.values() if hasattr(t, "numel"))
    trained = [p for opt in trainer.optimizers.values() if opt for group in opt.param_groups for p in group["params"]]
    student, student_trained = nets.student, {id(p) for p in trained}
    return {"overrides": list(overrides),
            "student_parameters": numel(student.parameters()),
            "student_trainable_parameters": numel(p for p in student.parameters() if id(p) in student_trained),
            "trainable_parameters": numel(trained),
            "student_weights_mib": numel(student.parameters()) * 4 / MIB,
            "optimizer_state_mib": optimizer_bytes / MIB,
            "generator_step_peak_mib": step_peak_mib(trainer, steps["generator"]),
            "generator_step_ms": statistics.median(generator_ms)}


def quality(run_dir: Path) -> dict:
    """The one-step student's and the teacher's metrics of a finished run (the training prompts of a text run)."""
    metrics = json.loads((run_dir / "metrics.json").read_text())
    training = [r for r in metrics["results"] if r.get("prompts", "training prompts") == "training prompts"]
    student = next(r for r in training if r["model"] == "student" and r["nfe"] == 1)
    teacher = next(r for r in training if r["model"] == "teacher")
    result = {"run": str(run_dir), "wall_seconds": metrics["wall_seconds"], "environment": metrics["environment"]}
    for key in QUALITY:
        if key in student:
            result |= {f"student_{key}": student[key], f"teacher_{key}": teacher[key]}
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=speed.QUICKSTART)
    parser.add_argument("--lora", nargs="+", default=["student.lora={}"], metavar="KEY=VALUE",
                        help="the LoRA variant's overrides")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--batch-size", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--runs", type=Path, nargs=2, metavar=("FULL", "LORA"))
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    variants = {"full": (), "lora": tuple(args.lora)}
    result = {"config": str(args.config), "batch_size": args.batch_size, "repeats": args.repeats,
              "device": args.device}
    for name, overrides in variants.items():
        result[name] = measure(overrides, args)
    if args.runs:
        for name, run_dir in zip(variants, args.runs, strict=True):
            result[name]["quality"] = quality(run_dir)
    keys = ["student_parameters", "student_trainable_parameters", "trainable_parameters", "optimizer_state_mib",
            "generator_step_peak_mib", "generator_step_ms"]
    shown = [k for k in QUALITY if args.runs and f"student_{k}" in result["full"]["quality"]]
    print("| variant | " + " | ".join(keys + [f"student / teacher {k}" for k in shown]) + " |")
    print("|---" * (len(keys) + 1 + len(shown)) + "|")
    for name in variants:
        row = result[name]
        cells = [f"{row[k]:.1f}" if isinstance(row[k], float) else str(row[k]) for k in keys]
        cells += [f"{row['quality'][f'student_{k}']:.3f} / {row['quality'][f'teacher_{k}']:.3f}" for k in shown]
        print(f"| {name} | " + " | ".join(cells) + " |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
