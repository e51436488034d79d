"""Write docs/results.md and its plots from the benchmark results in bench/results/.

    python bench/report.py [--results bench/results] [--out docs/results.md]

Reads what the benchmarks wrote (each file names the command and the machine that made it) and takes seconds:

* ``quality_digits.json``: ``python bench/quality.py digits`` (33 runs; about 8 minutes on an H200 machine with 16
  CPU cores and ``--jobs 33``, about 3 hours on 2 CPU cores);
* ``quality_imbalanced.json``: ``python bench/quality.py imbalanced`` (12 runs, about 55 minutes on 2 cores);
* ``quality_ring_divergences.json``: ``python bench/quality.py ring_divergences`` (12 runs, about 15 minutes);
* ``quality_analytic.json`` (optional): ``python bench/quality.py analytic``;
* ``quickstart_long_gpu.json``: the quickstart at batch 256 for longer, on an H200 GPU (commands in the file);
* ``digits_gpu.json`` (optional): digits recipes at bigger batches and over seeds on an H200 GPU (commands in the
  file);
* ``consistency_probes_gpu.json`` (optional): sCM and rCM recipes with one option changed, on an H200 GPU;
* ``speed.json``: ``python bench/speed.py`` (about 3 minutes on 2 cores).

The headline table is also written between the ``results-headline`` markers of README.md.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
HEADLINE = re.compile(r"(<!-- results-headline -->\n).*?(<!-- /results-headline -->)", re.S)


def load(results: Path, name: str) -> dict | None:
    path = results / name
    return json.loads(path.read_text()) if path.exists() else None


def saved_plot(fig, plots: Path, file: str, caption: str) -> list[str]:
    """Write ``fig`` to ``plots/file`` and return the markdown lines that show it."""
    fig.tight_layout()
    fig.savefig(plots / file, dpi=120)
    plt.close(fig)
    return ["", f"![{caption}](results/{file})", ""]


def rows_of(quality: dict) -> dict[tuple[str, str], dict]:
    return {(row["name"], row["sampler"]): row for row in quality["summary"]}


def mean_std(cell: dict | None, digits: int = 1) -> str:
    return "-" if not cell else f"{cell['mean']:.{digits}f} ± {cell['std']:.{digits}f}"


def devices(quality: dict) -> str:
    names = {run["environment"]["device"] for run in quality["runs"] if run.get("environment")}
    return ", ".join(sorted(names)) or "unknown"


def teacher_fd(rows: dict) -> float:
    cells = [row["fd"]["mean"] for (_, sampler), row in rows.items() if sampler.startswith("teacher") and "fd" in row]
    return sum(cells) / len(cells)


def digits_section(quality: dict, plots: Path) -> tuple[list[str], list[str]]:
    rows = rows_of(quality)
    teacher = teacher_fd(rows)
    names = list(dict.fromkeys(name for name, _ in rows))
    seeds = quality["seeds"]
    unfinished = sorted(f"{r['name']} seed {r['seed']}" for r in quality["runs"] if r["status"] != "ok")
    lines = ["## Every objective on the digits teacher", "",
             f"`configs/digits_<objective>.yaml`, seeds {seeds}, 600 steps at batch 48 (f_distill, the quickstart's "
             f"recipe: batch 96; scm, rcm: batch 96, EMA 0.99; diff_instruct: 1200 steps; `<objective>_4_step`: "
             f"4-step students trained by backward simulation of all four steps, whose 1- and 2-step samples are "
             f"untrained) ({devices(quality)}). FD of "
             "1000 samples (seed 1234) in the digits classifier's 64-d features against the 1797 scikit-learn "
             f"digits; the teacher's 35-step Euler sampler scores {teacher:.2f}. Mean ± standard deviation over "
             "seeds; x teacher is the mean's ratio to the teacher's FD. Regenerate with "
             "`python bench/quality.py digits`.", "",
             "| recipe | NFE | FD | x teacher | class accuracy | seeds | device |", "|---|---|---|---|---|---|---|"]
    device_of = {}
    for run in quality["runs"]:
        if run.get("environment"):
            device_of.setdefault(run["name"], set()).add(run["environment"]["device"])
    curves: dict[str, list[tuple[int, float]]] = {}
    for name in names:
        for (row_name, sampler), row in rows.items():
            if row_name != name or not sampler.startswith("student") or "fd" not in row:
                continue
            nfe = int(sampler.split()[1])
            curves.setdefault(name, []).append((nfe, row["fd"]["mean"]))
            lines.append(f"| {name} | {nfe} | {mean_std(row['fd'])} | {row['fd']['mean'] / teacher:.2f} | "
                         f"{mean_std(row.get('class_accuracy'), 3)} | {row['fd']['n']} | "
                         f"{', '.join(sorted(device_of.get(name, ())))} |")
    if unfinished:
        lines += ["", f"Runs without a result (each one's status is in the JSON): {', '.join(unfinished)}."]
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for name, points in curves.items():
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=name)
    ax.axhline(teacher, color="k", ls="--", lw=1, label="teacher, 35 NFE")
    ax.set(xlabel="student NFE", ylabel="FD (digits features)", yscale="log", xticks=[1, 2, 4])
    ax.legend(fontsize=6)
    lines += saved_plot(fig, plots, "fd_vs_nfe.png", "FD against NFE")
    headline = []
    for name in ("f_distill", "dmd"):
        fd = rows.get((name, "student 1 NFE"), {}).get("fd")
        if fd:
            headline.append(f"| digits, one-step student of configs/digits_{name}.yaml ({fd['n']} seeds) | "
                            f"{fd['mean'] / teacher:.2f}x the teacher's FD |")
    for name in ("f_distill", "dmd"):
        fd = rows.get((f"{name}_4_step", "student 4 NFE"), {}).get("fd")
        if fd:
            headline.append(f"| digits, 4-step student of configs/digits_{name}.yaml ({fd['n']} seeds) | "
                            f"{fd['mean'] / teacher:.2f}x the teacher's FD |")
    for name in ("scm", "rcm"):  # the consistency recipe's best sampler
        best = min(((int(sampler.split()[1]), row["fd"]) for (row_name, sampler), row in rows.items()
                    if row_name == name and sampler.startswith("student") and "fd" in row),
                   key=lambda entry: entry[1]["mean"], default=None)
        if best:
            nfe, fd = best
            headline.append(f"| digits, {nfe}-step student of configs/digits_{name}.yaml, its best step count "
                            f"({fd['n']} seeds) | {fd['mean'] / teacher:.2f}x the teacher's FD |")
    return lines, headline


def tv_floor(quality: dict) -> tuple[int, float] | None:
    """``(samples, TV)``: the class-frequency TV that exact samples from the data's frequencies show at the runs'
    sample count (``class_tv_floor`` in each run's results), or None when the runs do not record it."""
    floors = [(r["num_samples"], r["class_tv_floor"]) for run in quality["runs"] for r in run.get("results", [])
              if "class_tv_floor" in r]
    return (floors[0][0], statistics.fmean(f for _, f in floors)) if floors else None


def imbalanced_section(quality: dict, plots: Path) -> tuple[list[str], list[str]]:
    rows = rows_of(quality)
    divergences = list(dict.fromkeys(name for name, _ in rows))
    floor = tv_floor(quality)
    floor_text = (f"; sampling {floor[0]} images from the data's own frequencies gives about {floor[1]:.3f}"
                  if floor else "")
    lines = ["## Class frequencies under imbalance, per divergence", "",
             "`configs/digits_imbalanced.yaml`: an unconditional one-step f-distill student of the imbalanced "
             "digits teacher, data classes at frequencies 0.3 ... 0.02; class frequencies of 1000 samples from the "
             f"digits classifier; seeds {quality['seeds']} ({devices(quality)}). TV is the total variation between "
             f"the samples' class frequencies and the data's{floor_text}. Regenerate with "
             "`python bench/quality.py imbalanced`.", "",
             "| divergence | TV to data | TV to teacher | seeds |", "|---|---|---|---|"]
    teacher_tv = None
    for name in divergences:
        row = rows.get((name, "student 1 NFE"))
        if row and "class_tv_to_data" in row:
            lines.append(f"| {name} | {mean_std(row['class_tv_to_data'], 3)} | "
                         f"{mean_std(row.get('class_tv_to_teacher'), 3)} | {row['class_tv_to_data']['n']} |")
        teacher_row = next((r for (n, s), r in rows.items() if n == name and s.startswith("teacher")), None)
        if teacher_row and "class_tv_to_data" in teacher_row:
            teacher_tv = teacher_row["class_tv_to_data"]["mean"]
    if teacher_tv is not None:
        lines += ["", f"The teacher's own 35-step samples: TV {teacher_tv:.3f} to the data."]
    frequencies: dict[str, list[list[float]]] = {}
    for run in quality["runs"]:
        for result in run.get("results", []):
            if result["model"] == "student" and "class_frequencies" in result:
                frequencies.setdefault(run["name"], []).append(result["class_frequencies"])
    target = [0.3, 0.2, 0.14, 0.1, 0.08, 0.06, 0.045, 0.03, 0.025, 0.02]
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    width = 0.8 / (len(frequencies) + 1)
    ax.bar([c - 0.4 + width / 2 for c in range(10)], target, width, label="data", color="k")
    for i, (name, runs) in enumerate(frequencies.items(), start=1):
        mean = [sum(r[c] for r in runs) / len(runs) for c in range(10)]
        ax.bar([c - 0.4 + width / 2 + i * width for c in range(10)], mean, width, label=name)
    ax.set(xlabel="digit class", ylabel="frequency", xticks=range(10))
    ax.legend(fontsize=7)
    lines += saved_plot(fig, plots, "class_frequencies.png", "Class frequencies per divergence")
    headline = []
    for name in ("rkl", "js", "kl"):
        row = rows.get((name, "student 1 NFE"))
        if row and "class_tv_to_data" in row:
            tv = mean_std(row["class_tv_to_data"], 3)
            headline.append(f"| imbalanced digits, class-frequency TV, {name} | {tv} |")
    return lines, headline


def ring_divergences_section(quality: dict, plots: Path) -> tuple[list[str], list[str]]:
    rows = rows_of(quality)
    lines = ["## Mode weights on the unequal ring, per divergence", "",
             "`configs/ring_f_distill_js.yaml` on the 8-mode ring with weights 0.3 ... 0.03 and the divergence "
             f"changed; 4000 one-step samples, seeds {quality['seeds']} ({devices(quality)}). Regenerate with "
             "`python bench/quality.py ring_divergences`.", "",
             "| divergence | mode-weight TV | off-mode fraction | energy distance | seeds |", "|---|---|---|---|---|"]
    headline = []
    for (name, sampler), row in rows.items():
        if "mode_weight_tv" not in row:
            continue
        label = name if sampler.startswith("student") else f"teacher ({sampler})"
        lines.append(f"| {label} | {mean_std(row['mode_weight_tv'], 3)} | "
                     f"{mean_std(row.get('off_mode_fraction'), 3)} | {mean_std(row.get('energy_distance'), 3)} | "
                     f"{row['mode_weight_tv']['n']} |")
        if sampler.startswith("student") and name in ("rkl", "js", "kl"):
            headline.append(f"| unequal ring, mode-weight TV, {name} | {mean_std(row['mode_weight_tv'], 3)} |")
    return lines + [""], headline


def long_run_section(long_run: dict) -> tuple[list[str], list[str]]:
    student = next(r for r in long_run["results"] if r["model"] == "student")
    teacher = next(r for r in long_run["results"] if r["model"] == "teacher")
    trace = ", ".join(f"{p['fd']:.1f} ({p['step']})" for p in long_run["fd_during_training"])
    device = long_run["environment"]["device"]
    lines = ["## A longer quickstart on a GPU", "", long_run["description"] + f" ({device}).", "",
             f"* End of the {long_run['steps']}-step run: one-step FD {student['fd']:.2f} against the teacher's "
             f"{teacher['fd']:.2f} ({student['fd'] / teacher['fd']:.2f}x), "
             f"{long_run['wall_seconds']:.0f} s of training; discriminator loss over the second half "
             f"{long_run['discriminator_loss_second_half']:.3f}.",
             f"* One-step FD during the run (step): {trace}."]
    for variant in long_run["variants"]:
        fds = ", ".join(f"{r['fd']:.1f} at {r['nfe']} step{'s' * (r['nfe'] > 1)}" for r in variant["results"]
                        if r["model"] == "student")
        lines.append(f"* {variant['label']}: FD {fds}.")
    return lines + ["", "Commands: " + "; ".join(f"`{c}`" for c in long_run["commands"]) + ".", ""], [
        f"| digits, one-step student of the quickstart at batch 256, {long_run['steps']} steps ({device}) | "
        f"{student['fd'] / teacher['fd']:.2f}x the teacher's FD |"]


def seed_cell(values: list[float]) -> str:
    """``mean ± sample std (n)`` over seeds, or the value alone for one seed."""
    if len(values) == 1:
        return f"{values[0]:.1f}"
    mean = statistics.fmean(values)
    return f"{mean:.1f} ± {statistics.stdev(values):.1f} ({len(values)})"


def gpu_runs_section(gpu: dict) -> tuple[list[str], list[str]]:
    """One row per recipe with its FD at 1, 2 and 4 steps over seeds; the headline takes each step count's best
    among the recipes run with several seeds."""
    device = gpu["environment"]["device"]
    lines = ["## Digits recipes on a GPU: bigger batches and seeds", "", f"{gpu['description']} ({device}).", "",
             "| run | steps | FD 1 step | FD 2 steps | FD 4 steps | best vs teacher |", "|---|---|---|---|---|---|"]
    best: dict[str, tuple[float, str, int]] = {}
    for run in gpu["runs"]:
        seeds = run["seeds"]
        teacher = statistics.fmean(s["teacher_fd"] for s in seeds)
        cells, means = [], {}
        for nfe in ("1", "2", "4"):
            values = [s["fd_by_nfe"][nfe] for s in seeds if nfe in s["fd_by_nfe"]]
            cells.append(seed_cell(values) if values else "-")
            if values:
                means[nfe] = statistics.fmean(values) / teacher
                if len(values) > 1 and means[nfe] < best.get(nfe, (float("inf"),))[0]:
                    best[nfe] = (means[nfe], run["label"], len(values))
        top = min(means, key=means.get)
        lines.append(f"| {run['label']} | {seeds[0]['steps']} | " + " | ".join(cells)
                     + f" | {means[top]:.2f}x at {top} step{'s' * (top != '1')} |")
    lines += ["", f"The teacher's 35-step FD there: {teacher:.2f}. A student trained on its 4-step path alone "
              "(`backward_simulation_steps=last`) is a 4-step sampler: its 1- and 2-step samples are untrained. "
              "Commands (`<seed>` 0, 1, 2):", ""]
    lines += [f"* {run['label']}: `{run['command']}`" for run in gpu["runs"]]
    headline = [f"| digits, best {nfe}-step student on a GPU, {n} seeds: {label} ({device}) | {ratio:.2f}x the "
                "teacher's FD |" for nfe, (ratio, label, n) in sorted(best.items()) if nfe != "2"]
    return lines + [""], headline


def consistency_probes_section(probes: dict) -> list[str]:
    lines = ["## Consistency recipes: one-option probes on a GPU", "",
             f"{probes['description']} ({probes['environment']['device']}). `{probes['command']}`.", "",
             "| run | steps | FD 1 step | FD 2 steps | FD 4 steps |", "|---|---|---|---|---|"]
    for probe in probes["probes"]:
        fd = probe["fd_by_nfe"]
        lines.append(f"| {probe['label']} | {probe['steps']} | " + " | ".join(f"{fd[k]:.1f}" for k in ("1", "2", "4"))
                     + " |")
    return lines + ["", f"The teacher's 35-step FD on that machine: {probes['probes'][0]['teacher_fd']:.2f}.", ""]


def speed_section(speed: dict, plots: Path) -> tuple[list[str], list[str]]:
    rows = speed["sampling"]["rows"]
    lines = ["## Sampling speed", "",
             f"Samples per second of one batch of {speed['batch_size']} on {speed['device']} (median of "
             f"{speed['repeats']} repeats; `python bench/speed.py`, where the training-step overhead, peak memory and "
             "JVP tables are).", "", "| sampler | NFE | samples/s | speed-up | of ideal |", "|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['sampler']} | {row['nfe']} | {row['samples_per_second']['median']:.1f} | "
                     f"{row['speedup']['median']:.2f} | {row['speedup_over_ideal']:.2f} |")
    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    ax.plot([r["nfe"] for r in rows], [r["samples_per_second"]["median"] for r in rows], marker="o")
    ax.set(xlabel="NFE", ylabel="samples/s", xscale="log", yscale="log")
    lines += saved_plot(fig, plots, "samples_per_second.png", "Samples per second against NFE")
    lines += feature_passes_section(speed)
    one = next(r for r in rows if r["nfe"] == 1)
    return lines, [f"| sampling speed-up, one step vs 35-step teacher ({speed['device']}) | "
                   f"{one['speedup']['median']:.1f}x |"]


def feature_passes_section(speed: dict) -> list[str]:
    """Critic steps whose discriminator reads the teacher's features, with the features-only teacher passes
    stopped at the last feature block against run whole (``bench/speed.py`` section 5)."""
    if not speed.get("feature_passes"):
        return []
    lines = ["", "### Features-only teacher passes", "",
             f"Critic steps of the digits quickstart (batch {speed['batch_size']}, {speed['device']}, median of "
             f"{speed['repeats']} alternating repeats) whose discriminator reads the teacher's features: the teacher's "
             "features-only passes stopped at the last feature block (as fdistill runs them) against run whole. The "
             "losses of both ways' first steps are compared: equal features give equal losses, so training and its FD "
             "are unchanged.", "",
             "| objective | features | teacher passes (stopped early) | step ms, stopped | step ms, whole | "
             "stopped / whole | teacher forward ms, stopped / whole | largest loss difference |",
             "|---|---|---|---|---|---|---|---|"]
    for row in speed["feature_passes"]:
        stopped, whole = row["critic_step"]["stopped"], row["critic_step"]["whole"]
        passes = stopped["passes"].get("teacher", {"forward": 0, "stopped": 0})
        teacher = (stopped["forward_ms_by_network"].get("teacher", 0.0),
                   whole["forward_ms_by_network"].get("teacher", 0.0))
        lines.append(f"| {row['objective']} | {', '.join(row['discriminator_features'])} | {passes['forward']} "
                     f"({passes['stopped']}) | {stopped['step_ms']['median']:.1f} | {whole['step_ms']['median']:.1f} | "
                     f"{stopped['step_ms']['median'] / whole['step_ms']['median']:.3f} | {teacher[0]:.1f} / "
                     f"{teacher[1]:.1f} | {row['largest_loss_difference']:.1e} over {row['loss_steps_compared']} "
                     "steps |")
    return lines


def analytic_section(quality: dict) -> list[str]:
    metrics = ["energy_distance", "mode_weight_tv", "off_mode_fraction", "modes_covered"]
    lines = ["## Analytic teachers", "",
             "Every `configs/ring_<objective>.yaml` on three teachers with exact scores: the equal 8-mode ring, the "
             "unequal ring (mode weights 0.3 ... 0.03) and the 16-mode Gaussian mixture in 8 dimensions of "
             "`configs/mixture_8d.yaml`; 4000 samples per run, mean ± standard deviation over seeds "
             f"{quality['seeds']}. Regenerate with `python bench/quality.py analytic` ({len(quality['runs'])} runs).",
             "",
             "| teacher/objective | sampler | " + " | ".join(metrics) + " |", "|---" * (len(metrics) + 2) + "|"]
    for row in quality["summary"]:
        lines.append(f"| {row['name']} | {row['sampler']} | " + " | ".join(mean_std(row.get(m), 3) for m in metrics)
                     + " |")
    return lines + [""]


def _largest_deviation(scale: dict) -> float:
    """The largest relative difference between another objective's estimate and DMD2's in the same setting."""
    dmd2 = {(r["architecture"], r["levers"]): r["estimated_peak_gib"] for r in scale["estimates"]
            if r["objective"] == "DMD2"}
    return max(abs(r["estimated_peak_gib"] / dmd2[r["architecture"], r["levers"]] - 1) for r in scale["estimates"])


def scale_section(scale: dict, _plots) -> tuple[list[str], list[str]]:
    """Peak memory per process at real size: the pre-flight's estimates (DMD2; the other objectives are in the
    JSON) and the measured runs beside their estimates."""
    lines = ["## Memory at real size", "",
             "Estimated peak memory per process of one-step DMD2 (with its GAN term) on published architectures with "
             "random weights, by the run's own pre-flight: weights and adapters counted on the meta device, "
             "activations measured there for the objective's kept passes, attention as a fused kernel keeps it, "
             "`train.mixed_precision=bf16`, on a GPU: the text encoders and the VAE there only between steps "
             "(counted where they outweigh the activations), the cached real latents in CPU memory, no EMA, the "
             "process itself left out (`python bench/scale.py`; f-distill and rCM are in `bench/results/scale.json`, "
             f"within {_largest_deviation(scale):.0%} of these). Every number in this table is an estimate.", "",
             "| architecture | params | px | batch | full/full fp32 | full/LoRA bf16 ckpt | LoRA/LoRA bf16 ckpt |",
             "|---|---|---|---|---|---|---|"]
    rows: dict[str, dict] = {}
    for row in scale["estimates"]:
        if row["objective"] == "DMD2":
            rows.setdefault(row["architecture"], row)[row["levers"]] = row["estimated_peak_gib"]
    for name, row in rows.items():
        lines.append(f"| {name} | {row['parameters'] / 1e9:.2f}B | {row['resolution']} | {row['batch']} | "
                     + " | ".join(f"{row[lever]:.1f} GiB" for lever in
                                  ("full/full fp32", "full/LoRA bf16 ckpt", "LoRA/LoRA bf16 ckpt")) + " |")
    lines += [""]
    if scale["measured"]:
        lines += ["Measured on a CPU (2 cores, 24 GiB): the SD 1.5 architecture with random weights at 256 px as a "
                  "user's own pipeline, the text-to-image DMD2 recipe without its GAN term, batch 1, 5 steps (4 "
                  "critic, 1 generator); the peak resident memory of loading and training, beside the pre-flight's "
                  "estimate printed before any weight loaded (`python bench/scale.py --measure-cpu PIPELINE`):", "",
                  "| levers | measured peak | estimate | estimate / measured |", "|---|---|---|---|"]
        for run in scale["measured"]:
            if "refused" in run:
                lines.append(f"| {run['levers']} | refused before loading: `{run['refused']}` | | |")
            else:
                lines.append(f"| {run['levers']} | {run['measured_peak_gib']:.2f} GiB | "
                             f"{run['estimated_peak_gib']:.2f} GiB | {run['estimate_over_measured']:.3f} |")
        lines += [""]
    sdxl = rows.get("sdxl", {})
    head = [f"| SDXL 1024 px, batch 2, one-step DMD2, LoRA/LoRA on one bf16 base, checkpointed (estimate) | "
            f"{sdxl['LoRA/LoRA bf16 ckpt']:.1f} GiB |"] if sdxl else []
    return lines, head


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "results.md")
    args = parser.parse_args(argv)
    plots = args.out.parent / "results"
    plots.mkdir(parents=True, exist_ok=True)
    body: list[str] = []
    headline = ["| result | value |", "|---|---|"]
    sections = [("quality_digits.json", digits_section), ("quickstart_long_gpu.json", lambda d, _: long_run_section(d)),
                ("digits_gpu.json", lambda d, _: gpu_runs_section(d)),
                ("quality_imbalanced.json", imbalanced_section),
                ("quality_ring_divergences.json", ring_divergences_section), ("speed.json", speed_section),
                ("scale.json", scale_section)]
    for name, section in sections:
        data = load(args.results, name)
        if data is None:
            print(f"note: {args.results / name} is missing; its section is left out", file=sys.stderr)
            continue
        lines, head = section(data, plots)
        body += lines
        headline += head
    probes = load(args.results, "consistency_probes_gpu.json")
    if probes is not None:
        body += consistency_probes_section(probes)
    analytic = load(args.results, "quality_analytic.json")
    if analytic is not None:
        body += analytic_section(analytic)
    text = ["# Results", "", "Written by `python bench/report.py` from the files in `bench/results/`; each section "
            "names the command that measures it again.", "", "## Headline", "", *headline, "", *body]
    args.out.write_text("\n".join(text).rstrip() + "\n")
    readme = ROOT / "README.md"
    table = "\n".join(headline) + "\n"
    if HEADLINE.search(readme.read_text()):
        readme.write_text(HEADLINE.sub(lambda m: m.group(1) + table + m.group(2), readme.read_text()))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
