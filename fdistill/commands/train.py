"""Train a one-step (or few-step) student: ``python train.py --config configs/X.yaml [key=value ...]``.

Several processes: ``accelerate launch --num_processes N train.py ...`` or ``torchrun --nproc_per_node N
train.py ...`` (docs/engine.md). Exit codes: 0 done, 1 aborted on non-finite steps, 2 configuration or
run-directory error or a checkpoint that could not be written, 128+signal after SIGINT/SIGTERM (a checkpoint
was written).
"""

import argparse
import json
import sys

from accelerate import PartialState

from fdistill.cli import user_errors
from fdistill.config import dump_config
from fdistill.preflight import estimate_memory
from fdistill.recipes import load_config
from fdistill.run import run_experiment
from fdistill.training.checkpoint import CheckpointWriteError
from fdistill.training.trainer import Interrupted, NonFiniteTraining


def main(argv=None):
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--config", required=True, help="experiment YAML file")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the resolved config and the memory pre-flight's estimate, and exit")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.add_argument("--resume", action="store_const", const="latest",
                        help="continue run.dir from its newest checkpoint (a fresh start if it has none)")
    parser.add_argument("--resume-from", dest="resume", metavar="CHECKPOINT",
                        help="continue run.dir from this checkpoint directory")
    parser.add_argument("--overwrite", action="store_true", help="delete an existing run in run.dir first")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.steps=100")
    args = parser.parse_intermixed_args(argv)  # overrides may come before or after the options
    with user_errors():
        cfg, options = load_config(args.config, args.overrides)
        if args.dry_run:
            print(dump_config(cfg), end="")
            state = PartialState()
            estimate = estimate_memory(cfg, options, state.num_processes, device=state.device.type)
            if estimate is not None:
                print(estimate.table())
            return
        try:
            metrics = run_experiment(cfg, options, not args.no_progress, args.resume, args.overwrite)
        except (Interrupted, NonFiniteTraining, CheckpointWriteError) as e:
            if PartialState().is_main_process:
                print(str(e) if isinstance(e, Interrupted) else f"error: {e}", file=sys.stderr)
            sys.exit(128 + e.signum if isinstance(e, Interrupted) else 1 if isinstance(e, NonFiniteTraining) else 2)
    if metrics is not None:
        print(json.dumps(metrics["results"], indent=1))
        print(f"wrote {cfg.run.dir}/metrics.json")


if __name__ == "__main__":
    main()
