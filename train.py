"""Train a one-step (or few-step) student: ``python train.py --config configs/X.yaml [key=value ...]``."""

import argparse
import json

from fdistill.cli import user_errors
from fdistill.config import dump_config, load_config
from fdistill.run import run_experiment


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", required=True, help="experiment YAML file")
    parser.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.steps=100")
    args = parser.parse_args(argv)
    with user_errors():
        cfg, options = load_config(args.config, args.overrides)
        if args.dry_run:
            print(dump_config(cfg), end="")
            return
        metrics = run_experiment(cfg, options, progress=not args.no_progress)
    print(json.dumps(metrics["results"], indent=1))
    print(f"wrote {cfg.run.dir}/metrics.json")


if __name__ == "__main__":
    main()
