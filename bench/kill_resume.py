"""SIGKILL a toy run at random moments (some while a checkpoint is being written), resume it each time, and
check that it ends bit-identical to an uninterrupted run with no corrupt checkpoint left behind.

    python bench/kill_resume.py [--kills 10] [--steps 300] [--seed 0]

Prints one row per kill and writes ``bench/results/kill_resume.json``. Every run is
``train.py --config configs/ring_tiny.yaml --resume`` on one CPU process (f-distill with its discriminator,
two EMAs, a checkpoint every 10 steps). Half of the kills land at a random time after training has
(re)started, drawn so that the kills spread over the run; half the moment a new checkpoint's temporary
directory appears, i.e. in the middle of writing it.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from fdistill.training import checkpoint  # noqa: E402

CONFIG = ROOT / "configs" / "ring_tiny.yaml"
OVERRIDES = ["model.hidden=256", "checkpoint.every=10", "checkpoint.keep_last=2", "eval.num_samples=512"]


def command(run_dir: Path, steps: int) -> list[str]:
    return [sys.executable, str(ROOT / "train.py"), "--config", str(CONFIG), "--no-progress", "--resume",
            f"run.dir={run_dir}", f"train.steps={steps}", *OVERRIDES]


def final_state(run_dir: Path) -> dict:
    state = torch.load(checkpoint.checkpoint_dirs(run_dir)[-1] / checkpoint.STATE_FILE, weights_only=False)
    state["counters"].pop("wall_seconds")
    return state


def identical(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(identical(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(identical(x, y) for x, y in zip(a, b, strict=True))
    if torch.is_tensor(a):
        return a.dtype == b.dtype and torch.equal(a, b)
    return a == b


def checkpoints_load(run_dir: Path) -> bool:
    """Every complete checkpoint opens and holds finite values."""
    for ckpt in checkpoint.checkpoint_dirs(run_dir):
        state = torch.load(ckpt / checkpoint.STATE_FILE, weights_only=False)
        checkpoint.assert_finite(state)
        torch.load(ckpt / "random_states_0.pkl", weights_only=False)
    return True


def latest_step(run_dir: Path) -> int:
    found = checkpoint.checkpoint_dirs(run_dir)
    return int(found[-1].name.split("-")[1]) if found else 0


def writing(root: Path, before: int, launched: float) -> list[Path]:
    """Temporary checkpoint directories this process is writing (stale ones from a killed run excluded)."""
    found = list(root.glob(".tmp-*")) if root.is_dir() else []
    return [p for p in found if int(p.name.rsplit("-", 1)[1]) > before and _mtime(p) >= launched]


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:  # renamed or removed meanwhile
        return 0.0


def wait_then_kill(proc: subprocess.Popen, run_dir: Path, mode: str, delay: float) -> dict:
    """Kill ``proc`` with SIGKILL: ``delay`` seconds after training starts, or as a checkpoint is written."""
    root, before, launched = run_dir / "checkpoints", latest_step(run_dir), time.time()
    log = run_dir / "train_log.csv"  # rewritten when training (re)starts
    while proc.poll() is None and not (log.exists() and log.stat().st_mtime >= launched):
        time.sleep(0.005)
    start = time.time()
    while proc.poll() is None:
        if (mode == "during write" and writing(root, before, launched)) or (
                mode == "random" and time.time() - start >= delay):
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            return {"mode": mode, "killed": True, "tmp_dirs_left": len(list(root.glob(".tmp-*"))),
                    "during_write": bool(writing(root, before, launched))}
        time.sleep(0.0005 if mode == "during write" else 0.01)
    return {"mode": mode, "killed": False, "tmp_dirs_left": 0, "during_write": False}


def main(argv=None):
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "kill_resume.json"))
    args = parser.parse_args(argv)
    rng, work = random.Random(args.seed), Path(tempfile.mkdtemp(prefix="kill_resume_"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}

    reference = work / "reference"
    t0 = time.time()
    subprocess.run(command(reference, args.steps), check=True, env=env, capture_output=True)
    train_seconds = json.loads((reference / "metrics.json").read_text())["wall_seconds"]
    print(f"uninterrupted: {args.steps} steps, {train_seconds:.1f} s of training, "
          f"{time.time() - t0:.1f} s in all")

    run_dir, rows = work / "killed", []
    print(f"{'#':>2} {'mode':<12} {'delay_s':>7} {'killed':>6} {'resumed_from':>12} {'ckpt_after':>10} "
          f"{'during_write':>12} {'tmp_left':>8} {'ckpts_load':>10}")
    for i in range(args.kills):
        mode = "during write" if i % 2 else "random"
        delay = rng.uniform(0.0, 2 * train_seconds / args.kills)  # about one kill's share of the steps
        resumed_from = latest_step(run_dir)
        proc = subprocess.Popen(command(run_dir, args.steps), env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        row = {"kill": i + 1, "delay_s": round(delay, 2) if mode == "random" else None,
               "resumed_from": resumed_from, **wait_then_kill(proc, run_dir, mode, delay)}
        row.update(checkpoint_after=latest_step(run_dir), checkpoints_load=checkpoints_load(run_dir))
        rows.append(row)
        print(f"{i + 1:>2} {mode:<12} {row['delay_s'] or '-':>7} {str(row['killed']):>6} {resumed_from:>12} "
              f"{row['checkpoint_after']:>10} {str(row['during_write']):>12} {row['tmp_dirs_left']:>8} "
              f"{str(row['checkpoints_load']):>10}")

    finish = subprocess.run(command(run_dir, args.steps), env=env, capture_output=True, text=True)
    student = "student.safetensors"
    same_weights = (run_dir / student).read_bytes() == (reference / student).read_bytes()
    same_state = identical(final_state(run_dir), final_state(reference))
    result = {
        "config": str(CONFIG.relative_to(ROOT)), "overrides": OVERRIDES, "steps": args.steps,
        "seed": args.seed, "reference_train_seconds": train_seconds,
        "kills": rows, "final_returncode": finish.returncode,
        "identical_student_weights": same_weights, "identical_final_checkpoint": same_state,
        "no_tmp_dirs_left": not list((run_dir / "checkpoints").glob(".tmp-*")),
        "all_checkpoints_load": checkpoints_load(run_dir),
        "kills_during_checkpoint_write": sum(r["during_write"] for r in rows),
    }
    print(f"final run rc={finish.returncode}; identical student weights: {same_weights}; identical final "
          f"checkpoint (weights, optimizers, schedules, EMAs, objective state, counters): {same_state}; "
          f"kills during a checkpoint write: {result['kills_during_checkpoint_write']}/{args.kills}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")
    passed = same_weights and same_state and result["no_tmp_dirs_left"]
    if passed:
        shutil.rmtree(work)
    else:
        print(f"run directories kept in {work}")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
