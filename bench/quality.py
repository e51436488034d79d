"""Sample quality of every objective over several seeds: the distilled students against their teachers.

    python bench/quality.py SUITE [--seeds 0 1 2] [--jobs 2] [--threads 1] [--deadline SECONDS]
                                  [--only NAME ...] [--work DIR] [--out PATH] [--set key=value ...]

Each run is ``train.py --config CONFIG run.seed=S run.dir=WORK/NAME/seed-S [overrides]``, started as its own
process (``--jobs`` at once, ``--threads`` torch threads each); the student and the teacher are evaluated by the
run itself (its ``metrics.json``), so the numbers are the ones a user gets from the same command. Suites:

* ``analytic``: every ``configs/ring_<objective>.yaml`` on three analytic teachers with exact scores: the equal
  8-mode ring, the unequal ring (mode weights 0.3 ... 0.03) and the 16-mode Gaussian mixture in 8 dimensions of
  ``configs/mixture_8d.yaml``; modes covered, mode-weight TV, off-mode fraction and energy distance of 4000
  samples. A teacher is swapped in by a generated config that includes the objective's ring config and
  replaces its ``teacher`` section.
* ``digits``: every ``configs/digits_<objective>.yaml`` on the embedded digits teacher: FD in the digits
  classifier's features, class accuracy and coverage of 1000 samples (seed 1234), against the teacher's
  35-step Euler sampler. Consistency students (sCM, rCM) sample at 1, 2 and 4 steps; DMD and f-distill also
  train 4-step students (``<objective>_4_step``: sampling times 999, 749, 499, 249, trained by backward
  simulation of all four steps, ``objective.backward_simulation_steps=last``, at batch 48), evaluated at 1, 2
  and 4 steps.
* ``ring_divergences``: ``configs/ring_f_distill_js.yaml`` on the unequal ring with the divergences KL, JS,
  Jeffreys and reverse KL: how well each reproduces the mode weights.
* ``imbalanced``: ``configs/digits_imbalanced.yaml`` (an unconditional one-step student; data classes at
  frequencies 0.3 ... 0.02) with the divergences KL, JS, Jeffreys and reverse KL: FD and the total variation
  between the class frequencies of the samples and those of the data.

``--set key=value`` overrides go to every run (e.g. ``train.batch_size=256`` on a GPU). With
``--deadline``, runs not started by then are skipped and runs still going are stopped, so that what finished is
kept. ``--collect`` trains nothing and summarises the run directories already in ``--work``, e.g. copied back
from another machine. Results are written after every run to ``bench/results/quality_<suite>.json`` (or
``--out``): each run's metrics, and per configuration and sampler the mean and standard deviation over
seeds. With ``--only``, the runs of the suite's other configurations already in that file are kept, so one
recipe can be measured again without losing the rest. The table prints ``mean ± std (n seeds)``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"

RING_OBJECTIVES = ["dmd", "f_distill_js", "diff_instruct", "sid", "sim", "uni_instruct_js", "uni_instruct_fkl",
                   "uni_instruct_rkl", "scm", "rcm"]
DIGITS_OBJECTIVES = ["dmd", "f_distill", "diff_instruct", "sid", "sim", "uni_instruct_js", "uni_instruct_fkl",
                     "scm", "rcm"]
# Few-step students of the distribution-matching family: trained by backward simulation through all these times.
FEW_STEP_OBJECTIVES = ["dmd", "f_distill"]
FEW_STEP_TIMES = "[999,749,499,249]"
FEW_STEP_BATCH = 48  # the same batch for every few-step student (the quickstart's own is larger)
IMBALANCED_DIVERGENCES = ["kl", "js", "jf", "rkl"]
UNEQUAL_RING_WEIGHTS = [0.3, 0.2, 0.15, 0.1, 0.08, 0.07, 0.07, 0.03]

# Metrics summarised per (configuration, sampler); the rest of each run's metrics stays in the JSON.
SUMMARY_METRICS = {
    "analytic": ["energy_distance", "mode_weight_tv", "off_mode_fraction", "modes_covered"],
    "digits": ["fd", "class_accuracy", "class_coverage"],
    "imbalanced": ["fd", "class_tv_to_data", "class_tv_to_teacher"],
    "ring_divergences": ["mode_weight_tv", "off_mode_fraction", "energy_distance", "modes_covered"],
}


def analytic_teachers(work: Path) -> dict[str, Path | None]:
    """Teacher name -> a config fragment replacing the ring config's teacher (None: the equal ring itself)."""
    import yaml  # PyYAML comes with omegaconf

    mixture = yaml.safe_load((ROOT / "configs" / "mixture_8d.yaml").read_text())["teacher"]
    fragments = {"ring": None, "ring_unequal": {"weights": UNEQUAL_RING_WEIGHTS}, "mixture_8d": mixture}
    paths: dict[str, Path | None] = {}
    for name, teacher in fragments.items():
        paths[name] = None
        if teacher is not None:
            paths[name] = work / "teachers" / f"{name}.yaml"
            paths[name].parent.mkdir(parents=True, exist_ok=True)
            paths[name].write_text(yaml.safe_dump({"teacher": teacher}))
    return paths


def plan(suite: str, work: Path) -> list[dict]:
    """The configurations of a suite: name, config file and overrides of each."""
    configs = ROOT / "configs"
    if suite == "digits":
        entries = [{"name": o, "config": configs / f"digits_{o}.yaml", "overrides": []} for o in DIGITS_OBJECTIVES]
        return entries + [{"name": f"{o}_4_step", "config": configs / f"digits_{o}.yaml",
                           "overrides": [f"generator.times={FEW_STEP_TIMES}",
                                         "objective.backward_simulation_steps=last", "eval.student_steps=[1,2,4]",
                                         f"train.batch_size={FEW_STEP_BATCH}"]}
                          for o in FEW_STEP_OBJECTIVES]
    if suite == "imbalanced":
        return [{"name": d, "config": configs / "digits_imbalanced.yaml", "overrides": [f"objective.divergence={d}"]}
                for d in IMBALANCED_DIVERGENCES]
    if suite == "ring_divergences":
        unequal = work / "configs" / "ring_unequal_f_distill.yaml"
        unequal.parent.mkdir(parents=True, exist_ok=True)
        unequal.write_text(f"include: {configs / 'ring_f_distill_js.yaml'}\n"
                           f"teacher: {{weights: {UNEQUAL_RING_WEIGHTS}}}\n")
        return [{"name": d, "config": unequal, "overrides": [f"objective.divergence={d}"]}
                for d in IMBALANCED_DIVERGENCES]
    if suite == "analytic":
        entries = []
        for teacher, fragment in analytic_teachers(work).items():
            for objective in RING_OBJECTIVES:
                config = configs / f"ring_{objective}.yaml"
                if fragment is not None:  # the objective's ring config with this teacher
                    config = work / "configs" / f"{teacher}_{objective}.yaml"
                    config.parent.mkdir(parents=True, exist_ok=True)
                    config.write_text(f"include: {configs / f'ring_{objective}.yaml'}\n" + fragment.read_text())
                entries.append({"name": f"{teacher}/{objective}", "config": config,
                                "overrides": ["eval.student_steps=[1,2,4]"]})
        return entries
    raise SystemExit(f"error: unknown suite {suite!r}; use one of {sorted(SUMMARY_METRICS)}")


def run_one(entry: dict, seed: int, work: Path, overrides: list[str], threads: int, stop_at: float) -> dict:
    """Train and evaluate one configuration at one seed; its metrics, or why it has none."""
    run_dir = work / entry["name"] / f"seed-{seed}"
    record = run_record(entry, seed, overrides)
    remaining = stop_at - time.time()
    if remaining <= 0:
        return record | {"status": "skipped (deadline)"}
    command = [sys.executable, str(ROOT / "train.py"), "--config", str(entry["config"]), f"run.seed={seed}",
               f"run.dir={run_dir}", "log.sample_every=0", "checkpoint.every=0", *record["overrides"]]
    env = os.environ | {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
    run_dir.mkdir(parents=True, exist_ok=True)
    start = time.time()
    with open(run_dir / "train.log", "w") as log:
        try:
            code = subprocess.run(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                  timeout=None if math.isinf(remaining) else remaining).returncode
        except subprocess.TimeoutExpired:
            return record | {"status": "stopped (deadline)", "seconds": time.time() - start}
    if code != 0 or not (run_dir / "metrics.json").exists():
        tail = (run_dir / "train.log").read_text(errors="replace").strip().splitlines()[-1:] or [""]
        return record | {"status": f"failed (exit {code}): {tail[0][:300]}", "seconds": time.time() - start}
    return read_run(record, run_dir) | {"seconds": time.time() - start}


def run_record(entry: dict, seed: int, overrides: list[str]) -> dict:
    config = entry["config"]
    return {"name": entry["name"], "seed": seed,
            "config": str(config.relative_to(ROOT)) if config.is_relative_to(ROOT) else str(config),
            "overrides": entry["overrides"] + overrides}


def read_run(record: dict, run_dir: Path) -> dict:
    """A finished run's record from its ``metrics.json``."""
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return record | {"status": "ok", "wall_seconds": metrics.get("wall_seconds"),
                     "nonfinite_steps": metrics.get("nonfinite_steps"), "environment": metrics.get("environment"),
                     "results": metrics["results"]}


def collect(entry: dict, seed: int, work: Path, overrides: list[str]) -> dict:
    """The record of a run already in ``work`` (``--collect``), or why there is none."""
    run_dir = work / entry["name"] / f"seed-{seed}"
    record = run_record(entry, seed, overrides)
    if not (run_dir / "metrics.json").exists():
        return record | {"status": "no metrics.json (unfinished or not run)"}
    return read_run(record, run_dir)


def sampler_name(result: dict) -> str:
    return f"{result['model']} {result['nfe']} NFE" + (f" ({result['sampler']})" if "sampler" in result else "")


def summarise(runs: list[dict], metrics: list[str]) -> list[dict]:
    """Mean and standard deviation over seeds per (configuration, sampler) and metric."""
    groups: dict[tuple[str, str], dict[str, list[float]]] = {}
    for run in runs:
        for result in run.get("results", []):
            values = groups.setdefault((run["name"], sampler_name(result)), {m: [] for m in metrics})
            for m in metrics:
                if isinstance(result.get(m), (int, float)):
                    values[m].append(float(result[m]))
    rows = []
    for (name, sampler), values in groups.items():
        row = {"name": name, "sampler": sampler}
        for m, v in values.items():
            if v:
                mean = sum(v) / len(v)
                std = math.sqrt(sum((x - mean) ** 2 for x in v) / (len(v) - 1)) if len(v) > 1 else 0.0
                row[m] = {"mean": mean, "std": std, "n": len(v)}
        rows.append(row)
    return rows


def format_cell(cell: dict | None) -> str:
    if not cell:
        return "-"
    digits = 3 if abs(cell["mean"]) < 10 else 1
    return f"{cell['mean']:.{digits}f} ± {cell['std']:.{digits}f} ({cell['n']})"


def table(rows: list[dict], metrics: list[str]) -> str:
    lines = ["| configuration | sampler | " + " | ".join(metrics) + " |", "|---" * (len(metrics) + 2) + "|"]
    for row in rows:
        lines.append(f"| {row['name']} | {row['sampler']} | " + " | ".join(format_cell(row.get(m)) for m in metrics)
                     + " |")
    return "\n".join(lines)


def kept_runs(out: Path, measured: set[str]) -> list[dict]:
    """The runs in an earlier results file whose configuration is not measured again now."""
    if not out.exists():
        return []
    return [run for run in json.loads(out.read_text())["runs"] if run["name"] not in measured]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("suite", choices=sorted(SUMMARY_METRICS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--only", nargs="+", help="configuration names of the suite to run (default: all)")
    parser.add_argument("--jobs", type=int, default=2, help="runs at once")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--deadline", type=float, help="seconds from now after which no run starts or goes on")
    parser.add_argument("--work", type=Path, help="run directories (default: runs/bench_quality_<suite>)")
    parser.add_argument("--collect", action="store_true",
                        help="train nothing: summarise the runs already in --work (e.g. copied from another machine)")
    parser.add_argument("--out", type=Path, help="results JSON (default: bench/results/quality_<suite>.json)")
    parser.add_argument("--set", nargs="+", default=[], dest="overrides", metavar="KEY=VALUE",
                        help="config overrides for every run")
    args = parser.parse_args(argv)
    work = (args.work or ROOT / "runs" / f"bench_quality_{args.suite}").resolve()
    out = args.out or RESULTS / f"quality_{args.suite}.json"
    entries = plan(args.suite, work)
    order = {e["name"]: i for i, e in enumerate(entries)}  # the suite's order, also for runs kept from before
    if args.only:
        unknown = set(args.only) - {e["name"] for e in entries}
        if unknown:
            print(f"error: --only names {sorted(unknown)} are not in suite {args.suite}; "
                  f"choose from {[e['name'] for e in entries]}", file=sys.stderr)
            return 2
        entries = [e for e in entries if e["name"] in args.only]
    stop_at = time.time() + args.deadline if args.deadline else math.inf
    metrics = SUMMARY_METRICS[args.suite]
    runs: list[dict] = kept_runs(out, {e["name"] for e in entries}) if args.only else []
    started = time.time()

    def write():
        out.parent.mkdir(parents=True, exist_ok=True)
        how = {"collected from": str(work)} if args.collect else {"jobs": args.jobs, "threads": args.threads}
        out.write_text(json.dumps({"suite": args.suite, "seeds": args.seeds, **how, "overrides": args.overrides,
                                   "seconds": time.time() - started, "summary": summarise(runs, metrics),
                                   "runs": runs}, indent=1))

    jobs = [(entry, seed) for seed in args.seeds for entry in entries]
    with ThreadPoolExecutor(args.jobs) as pool:
        if args.collect:
            futures = [pool.submit(collect, e, s, work, args.overrides) for e, s in jobs]
        else:
            futures = [pool.submit(run_one, e, s, work, args.overrides, args.threads, stop_at) for e, s in jobs]
        for future in futures:
            run = future.result()
            runs.append(run)
            runs.sort(key=lambda r: (order.get(r["name"], len(order)), r["seed"]))
            print(f"{run['name']} seed {run['seed']}: {run['status']}", flush=True)
            write()
    print(table(summarise(runs, metrics), metrics))
    print(f"wrote {out}")
    return 0 if all(r["status"] == "ok" for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
