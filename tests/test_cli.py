"""The CLIs end bad input with one ``error:`` line and exit code 2, and the ring job writes its results."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(*args, cwd=ROOT):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, env=env, timeout=300)


def assert_user_error(proc, *fragments):
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.mark.slow
@pytest.mark.parametrize(
    "args, fragments",
    [
        (["--config", "configs/missing.yaml"], ["not found"]),
        (["--config", "configs/ring_dmd.yaml", "train.stpes=3"], ["train.stpes", "train.steps"]),
        (["--config", "configs/ring_dmd.yaml", "train.steps=many"], ["train.steps"]),
        (["--config", "configs/ring_dmd.yaml", "objective.name=dmdd"], ["dmdd", "dmd"]),
        (["--config", "configs/ring_f_distill_js.yaml", "objective.divergence=wasserstein"], ["wasserstein"]),
        (["--config", "configs/ring_dmd.yaml", "objective.gan_wieght=1"], ["objective.gan_weight"]),
        (["--config", "configs/ring_dmd.yaml", "run.dir=/proc/fdistill_run"], ["not writable"]),
    ],
)
def test_train_bad_input_is_one_line_and_exit_code_2(args, fragments):
    assert_user_error(run("train.py", *args), *fragments)


@pytest.mark.slow
def test_sample_bad_input(tmp_path):
    assert_user_error(run("sample.py", "--run", str(tmp_path), "--out", str(tmp_path / "x.npz")), "not found")


@pytest.mark.slow
def test_ring_run_writes_config_metrics_and_samples(tmp_path):
    run_dir = tmp_path / "ring"
    proc = run("train.py", "--config", "configs/ring_f_distill_js.yaml", "--no-progress", "train.steps=12",
               "train.batch_size=64", "eval.num_samples=300", "eval.teacher_steps=8", f"run.dir={run_dir}")
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["objective"] == "f_distill" and metrics["steps"] == 12 and metrics["wall_seconds"] > 0
    models = [(r["model"], r["nfe"]) for r in metrics["results"]]
    assert models == [("student", 1), ("teacher", 8)]
    for entry in metrics["results"]:
        assert {"modes_covered", "num_modes", "mode_weight_tv", "energy_distance"} <= set(entry)
    assert "divergence: js" in (run_dir / "config.yaml").read_text()
    out = tmp_path / "s.npz"
    assert run("sample.py", "--run", str(run_dir), "--num", "50", "--out", str(out)).returncode == 0
    import numpy as np

    assert np.load(out)["samples"].shape == (50, 2)


def test_the_fdistill_command_dispatches_to_each_script(capsys):
    from fdistill.commands import COMMANDS, main

    assert main(["--help"]) == 0
    usage = capsys.readouterr().out
    assert all(name in usage for name in COMMANDS)
    assert main(["train", "--config", "configs/ring_dmd.yaml", "--dry-run", "train.steps=7"]) == 0
    assert "steps: 7" in capsys.readouterr().out
    assert main(["trian"]) == 2 and "unknown command 'trian'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["fid", "--help"])
    assert e.value.code == 0 and "fdistill fid" in capsys.readouterr().out
