"""Draw samples from a trained student (or its teacher): ``python sample.py --run RUN_DIR --num N --out FILE``.

``FILE`` ending in ``.npz`` stores the samples (key ``samples``); ``.png`` draws a scatter plot (2-D data).
"""

import argparse
import time
from pathlib import Path

import numpy as np

from fdistill.cli import user_errors
from fdistill.config import ConfigError
from fdistill.evaluation import student_samples, teacher_samples
from fdistill.run import load_run


def scatter_png(samples: np.ndarray, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if samples.shape[1] != 2:
        raise ConfigError(f"a scatter plot needs 2-D samples, these have {samples.shape[1]} dimensions; use .npz")
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.scatter(samples[:, 0], samples[:, 1], s=2, alpha=0.5)
    ax.set_aspect("equal")
    ax.set_title(title)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--run", required=True, help="a finished run directory")
    parser.add_argument("--num", type=int, default=4000)
    parser.add_argument("--out", required=True, help="output file: .npz or .png")
    parser.add_argument("--steps", type=int, default=1, help="student sampling steps (1-4 where trained)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--teacher", action="store_true", help="sample the teacher's ODE sampler instead")
    args = parser.parse_args(argv)
    with user_errors():
        out = Path(args.out)
        if out.suffix not in (".npz", ".png"):
            raise ConfigError(f"--out must end in .npz or .png, got {out.name}")
        cfg, nets = load_run(args.run)
        start = time.time()
        if args.teacher:
            x, nfe = teacher_samples(nets, args.num, cfg.eval.teacher_steps, cfg.eval.teacher_sampler, args.seed)
        else:
            nets.student.eval()
            try:
                x, nfe = student_samples(nets, args.num, args.steps, args.seed, cfg.eval.renoise), args.steps
            except ValueError as e:
                raise ConfigError(str(e)) from None
        rate = args.num / (time.time() - start)
        samples = x.float().numpy()
        out.parent.mkdir(parents=True, exist_ok=True)
        if out.suffix == ".npz":
            np.savez(out, samples=samples, nfe=nfe, seed=args.seed)
        else:
            scatter_png(samples, out, f"{'teacher' if args.teacher else 'student'}, {nfe} NFE")
    print(f"wrote {args.num} samples ({nfe} NFE, {rate:.0f} samples/s) to {out}")


if __name__ == "__main__":
    main()
