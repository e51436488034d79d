"""Cost of sCM's JVP: one training iteration with the exact (forward-mode AD) JVP vs the finite difference.

    python bench/jvp_cost.py [--iters 10] [--rounds 3] [--threads 1]

Both modes are timed in one process, round-robin (a block of ``--iters`` sCD generator iterations of each mode
per round), so that load on a shared machine affects both alike; the table shows the median over rounds of
the seconds per iteration (loss, backward, AdamW step) and their ratio. Setups: the ring MLP student of
``configs/ring_scm.yaml`` and a tiny diffusers UNet with attention (16x16x3) teacher/student, both fed a
fixed random batch (the cost does not depend on the data) with the task's probe conditions. Writes
``bench/results/jvp_cost.json``. ``bench/speed.py`` reuses :class:`SCMIteration` on the shipped digits teacher.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from fdistill.containers import Batch
from fdistill.recipes import load_config
from fdistill.run import build_experiment

MODES = ("exact", "finite_difference")
ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "jvp_cost.json"
TINY_UNET = [
    "teacher.kind=unet",
    "teacher.unet={sample_size: 16, in_channels: 3, out_channels: 3, block_out_channels: [16, 32, 32],"
    " layers_per_block: 1, down_block_types: [DownBlock2D, AttnDownBlock2D, DownBlock2D],"
    " up_block_types: [UpBlock2D, AttnUpBlock2D, UpBlock2D], norm_num_groups: 8, attention_head_dim: 8}",
]
SETUPS = {  # name: (config file, overrides, batch size)
    "ring MLP (3x128)": ("configs/ring_scm.yaml", [], 512),
    "tiny UNet 16x16x3 (attention)": (None, TINY_UNET + ["generator.times=[1.55,1.3,1.0,0.6]",
                                                         "objective.fd_step=3e-5"], 16),
}


class SCMIteration:
    """One sCD generator iteration (loss, backward, optimizer step) of a setup in one JVP mode."""

    def __init__(self, config, overrides, batch_size: int, mode: str, device: str | torch.device = "cpu"):
        path = str(ROOT / config) if config else None
        cfg, options = load_config(path, overrides + ["objective.name=scm", f"objective.jvp={mode}"])
        self.nets, self.objective, task = build_experiment(cfg, options)
        self.nets.to(device)
        self.objective.to(device)
        params = list(self.nets.student.parameters()) + list(self.objective.generator_parameters())
        self.optimizer = torch.optim.AdamW(params, lr=1e-5)
        self.parameters = sum(p.numel() for p in self.nets.student.parameters())
        shape = (batch_size, *self.nets.teacher.sample_shape)
        real = torch.randn(shape, generator=torch.Generator().manual_seed(0))
        self.batch = Batch(size=batch_size, real=real, cond=task.condition_probe(batch_size)).to(device)
        self.step = 0

    def __call__(self):
        loss, _ = self.objective.generator_loss(self.batch, self.nets, self.step)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.step += 1


def synchronize(device: torch.device) -> None:
    """Wait for the queued GPU work, so that the clock measures it (a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds_per_iteration(run: SCMIteration, iters: int) -> float:
    device = run.batch.real.device
    synchronize(device)
    start = time.perf_counter()
    for _ in range(iters):
        run()
    synchronize(device)
    return (time.perf_counter() - start) / iters


def measure(name, config, overrides, batch_size, iters, rounds) -> dict:
    runs = {mode: SCMIteration(config, overrides, batch_size, mode) for mode in MODES}
    for run in runs.values():  # warm-up: first-call allocations and kernel selection
        seconds_per_iteration(run, 2)
    times = {mode: [] for mode in runs}
    for _ in range(rounds):
        for mode, run in runs.items():
            times[mode].append(seconds_per_iteration(run, iters))
    exact, fd = (statistics.median(times[m]) for m in MODES)
    return {"setup": name, "student_parameters": runs["exact"].parameters, "batch": batch_size,
            "exact_s_per_iter": exact, "finite_difference_s_per_iter": fd, "ratio_exact_over_fd": exact / fd,
            "rounds_s_per_iter": times}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=10, help="iterations per timed block")
    parser.add_argument("--rounds", type=int, default=3, help="timed blocks per mode (median reported)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = [measure(name, *setup, args.iters, args.rounds) for name, setup in SETUPS.items()]
    print(f"{'setup':32s} {'params':>8s} {'batch':>5s} {'exact s/it':>10s} {'FD s/it':>9s} {'exact/FD':>8s}")
    for r in rows:
        print(f"{r['setup']:32s} {r['student_parameters']:8d} {r['batch']:5d} {r['exact_s_per_iter']:10.4f} "
              f"{r['finite_difference_s_per_iter']:9.4f} {r['ratio_exact_over_fd']:8.2f}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    meta = {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": platform.machine(),
            "iters": args.iters, "rounds": args.rounds}
    RESULTS.write_text(json.dumps({"environment": meta, "results": rows}, indent=2))
    print(f"wrote {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
