"""What a run shows and records, on the main process only: a progress bar with it/s and the named loss terms,
scalars in ``RUN_DIR/train_log.csv`` and TensorBoard (through accelerate's trackers), and at the end a plot of
them, ``RUN_DIR/losses.png``."""

from __future__ import annotations

import csv
from collections import defaultdict
from pathlib import Path

from tqdm import tqdm

from fdistill.config import LogConfig

CSV_FILE = "train_log.csv"
PLOT_FILE = "losses.png"
CSV_HEADER = ["step", "name", "value"]


class RunLogger:
    """Averages each named scalar over the last ``log.every`` steps and reports it."""

    def __init__(self, accelerator, run_dir: Path | None, cfg: LogConfig, steps: int, start: int,
                 progress: bool):
        self.acc, self.every, self.steps = accelerator, cfg.every, steps
        self.main = accelerator.is_main_process
        self.sums, self.counts = defaultdict(float), defaultdict(int)
        self.bar = tqdm(total=steps, initial=start, disable=not (progress and self.main), dynamic_ncols=True,
                        desc="train")
        self.run_dir = run_dir
        self.csv = _open_csv(run_dir / CSV_FILE, start) if self.main and run_dir is not None else None
        if cfg.tensorboard and run_dir is not None:
            accelerator.init_trackers("tensorboard")
        self.last: dict[str, float] = {}

    def update(self, step: int, logs: dict[str, float]) -> None:
        """Record the scalars of the step that just finished (``step`` steps done)."""
        for k, v in logs.items():
            self.sums[k] += v
            self.counts[k] += 1
        self.bar.update(1)
        if step % self.every == 0 or step == self.steps:
            self._flush(step)

    def record(self, step: int, values: dict[str, float]) -> None:
        """Scalars measured at ``step`` outside the loss (training-time metrics): trackers, CSV and a note."""
        if not values:
            return
        self.last.update(values)
        self.acc.log(values, step=step)
        if self.csv is not None:
            csv.writer(self.csv).writerows([step, k, repr(v)] for k, v in sorted(values.items()))
            self.csv.flush()
        self.note(f"step {step}: " + ", ".join(f"{k} {v:.4g}" for k, v in sorted(values.items())))

    def note(self, message: str) -> None:
        if self.main:
            self.bar.write(message)

    def _flush(self, step: int) -> None:
        means = {k: self.sums[k] / self.counts[k] for k in self.sums}
        self.last.update(means)
        self.sums.clear()
        self.counts.clear()
        shown = {k.split("/")[-1]: f"{v:.3g}" for k, v in sorted(means.items()) if "_bin_" not in k}  # bins: CSV only
        self.bar.set_postfix(shown, refresh=False)
        self.acc.log(means, step=step)
        if self.csv is not None:
            csv.writer(self.csv).writerows([step, k, repr(v)] for k, v in sorted(means.items()))
            self.csv.flush()

    def close(self) -> None:
        self.bar.close()
        if self.csv is not None:
            self.csv.close()
            plot_scalars(self.run_dir / CSV_FILE, self.run_dir / PLOT_FILE)
        for tracker in self.acc.trackers:
            tracker.finish()


def _open_csv(path: Path, start: int):
    """Open the CSV for appending; rows from past ``start`` (an interrupted run's last steps) are dropped."""
    rows = []
    if path.is_file():
        with path.open(newline="") as f:
            rows = [r for r in csv.reader(f) if r and r[0].isdigit() and int(r[0]) <= start]
    f = path.open("w", newline="")
    csv.writer(f).writerows([CSV_HEADER, *rows])
    return f


def plot_scalars(csv_path: Path, png_path: Path) -> None:
    """One panel per scalar of a ``train_log.csv`` (step against value), written atomically to ``png_path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = defaultdict(list)
    with csv_path.open(newline="") as f:
        for row in csv.DictReader(f):
            series[row["name"]].append((int(row["step"]), float(row["value"])))
    panels = defaultdict(list)  # a family of per-bin scalars (name_bin_k) shares one panel
    for name in sorted(n for n in series if n != "nonfinite_fraction"):
        panels[name.split("_bin_")[0] + (" bins" if "_bin_" in name else "")].append(name)
    if not panels:
        return
    cols = min(4, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.4 * rows), squeeze=False)
    for ax, (title, names) in zip(axes.flat, panels.items(), strict=False):
        for name in names:
            steps, values = zip(*series[name], strict=True)
            ax.plot(steps, values, lw=1, marker="." if len(steps) < 20 else None)  # few points stay visible
        ax.set_title(title, fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    tmp = png_path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(png_path)
