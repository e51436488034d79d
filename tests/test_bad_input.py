"""Bad input a new user meets: each ends in one ``error:`` line naming the fix and exit code 2 (or, where the run
can go on, a note saying what happened), and the files already in the run directory are left as they were."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--config", "configs/ring_tiny.yaml", "--no-progress", "train.steps=12", "checkpoint.every=5",
        "eval.num_samples=64"]


def run(*args):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, capture_output=True, text=True, env=env,
                          timeout=300)


def assert_user_error(proc, *fragments):
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-2000:]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A 12-step ring run with checkpoints at steps 5, 10 and 12 (the last two kept)."""
    run_dir = tmp_path_factory.mktemp("bad_input") / "run"
    proc = run("train.py", *TINY, f"run.dir={run_dir}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    return run_dir


@pytest.mark.slow
def test_list_element_override_sets_one_field_or_names_the_fix():
    proc = run("train.py", *TINY, "ema.averages.0.decay=0.5", "--dry-run")
    assert proc.returncode == 0 and "decay: 0.5" in proc.stdout, proc.stderr
    assert_user_error(run("train.py", *TINY, "ema.averages.5.decay=0.5", "--dry-run"),
                      "ema.averages has no element 5 (2 elements here)", "set the whole list")


@pytest.mark.slow
@pytest.mark.parametrize("args, fragments", [
    (["--config", "configs/quickstart.yaml", "--no-progress", "generator.times=[2000]"],
     ["generator.times=[2000.0]", "range [0, 999]"]),
    ([*TINY, "teacher.pretrained=some/model"], ["teacher.pretrained is not read by teacher.kind=ring",
                                                "teacher.kind=pretrained reads it"]),
    ([*TINY, "data.path=images"], ["data.path is not read by a teacher.kind=ring run"]),
    (["--config", "configs/quickstart.yaml", "--no-progress", "model.hidden=64"],
     ["model.hidden is not read by a teacher.kind=embedded run"]),
])
def test_keys_and_times_the_run_cannot_use_are_errors(tmp_path, args, fragments):
    existing = tmp_path / "keep.txt"
    existing.write_text("mine")
    assert_user_error(run("train.py", *args, f"run.dir={tmp_path}/run"), *fragments)
    assert existing.read_text() == "mine" and not (tmp_path / "run" / "config.yaml").exists()


@pytest.mark.slow
def test_resume_without_a_checkpoint_says_it_starts_from_step_0(tmp_path):
    proc = run("train.py", *TINY, "checkpoint.every=0", "train.steps=4", f"run.dir={tmp_path / 'run'}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    shutil.rmtree(tmp_path / "run" / "checkpoints")  # as if it had crashed before its first checkpoint
    proc = run("train.py", *TINY, "checkpoint.every=0", "train.steps=4", f"run.dir={tmp_path / 'run'}", "--resume")
    assert proc.returncode == 0 and "no checkpoint in" in proc.stdout and "starting from step 0" in proc.stdout


@pytest.mark.slow
def test_a_corrupt_latest_checkpoint_is_skipped_with_a_note(finished_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run, run_dir)
    newest = run_dir / "checkpoints" / "step-00000012" / "custom_checkpoint_0.pkl"
    newest.write_bytes(newest.read_bytes()[:1000])  # truncated, as by a crash of the disk or a copy
    proc = run("train.py", *TINY, f"run.dir={run_dir}", "--resume")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "skipping unreadable checkpoint" in proc.stdout and "step-00000012" in proc.stdout
    assert "resumed from" in proc.stderr + proc.stdout and "step-00000010" in proc.stderr + proc.stdout


@pytest.mark.slow
def test_no_readable_checkpoint_is_one_line_naming_resume_from(finished_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run, run_dir)
    for state in (run_dir / "checkpoints").glob("*/custom_checkpoint_0.pkl"):
        state.write_bytes(b"not a checkpoint")
    before = snapshot(run_dir)
    assert_user_error(run("train.py", *TINY, f"run.dir={run_dir}", "--resume"), "no checkpoint", "--resume-from")
    assert snapshot(run_dir) == before


@pytest.mark.slow
def test_resuming_with_another_micro_batch_layout_is_refused_before_anything_is_written(finished_run, tmp_path):
    """A layout that cannot continue the run (here 1 process and 2 accumulation micro-batches resuming a run of
    1 micro-batch per step; tests/test_distributed.py resumes 2 processes with 1) stops at once with the fix."""
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run, run_dir)
    before = snapshot(run_dir)
    proc = run("train.py", *TINY, f"run.dir={run_dir}", "--resume-from", run_dir / "checkpoints" / "step-00000010",
               "train.device_batch_size=32")
    assert_user_error(proc, "1 micro-batches per step", "this launch has 2", "train.device_batch_size=64")
    assert snapshot(run_dir) == before


# a full disk as the OS reports it, and as PyTorch's zip writer does (a short write inside its C++ stream)
FULL_DISK = {"os": (OSError(28, "No space left on device"), "No space left on device"),
             "torch": (RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 120821184 vs "
                                    "120821072"), "PyTorch could not finish writing a file")}


@pytest.mark.parametrize("reported_as", sorted(FULL_DISK))
def test_a_checkpoint_that_cannot_be_written_leaves_the_previous_one_and_ends_in_one_line(tmp_path, capsys,
                                                                                          monkeypatch, reported_as):
    from accelerate import Accelerator

    from fdistill.commands import train
    from fdistill.training import checkpoint

    real_save, calls = Accelerator.save_state, []

    def full_disk(self, output_dir=None, **kwargs):
        calls.append(output_dir)
        if len(calls) == 2:  # write part of the second checkpoint, then run out of space
            Path(output_dir).mkdir(parents=True, exist_ok=True)
            (Path(output_dir) / "custom_checkpoint_0.pkl").write_bytes(b"partial")
            raise FULL_DISK[reported_as][0]
        return real_save(self, output_dir, **kwargs)

    monkeypatch.setattr(Accelerator, "save_state", full_disk)
    with pytest.raises(SystemExit) as e:
        train.main([*TINY[:2], "--no-progress", "train.steps=12", "checkpoint.every=5", f"run.dir={tmp_path}/run"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1, err
    assert f"could not write checkpoint step-00000010 ({FULL_DISK[reported_as][1]}" in err[0]
    assert "checkpoint step-00000005 is intact" in err[0] and "--resume" in err[0]
    kept = checkpoint.checkpoint_dirs(tmp_path / "run")
    assert [p.name for p in kept] == ["step-00000005"] and checkpoint.unreadable(kept[0]) is None
    assert not list((tmp_path / "run" / "checkpoints").glob(".tmp-*"))


@pytest.mark.slow
def test_fid_refuses_fewer_images_than_the_features_need(tmp_path):
    folder = tmp_path / "two"
    folder.mkdir()
    for i in range(2):
        Image.fromarray(np.full((16, 16), 40 * i, np.uint8)).save(folder / f"{i}.png")
    assert_user_error(run("eval/fid.py", "--samples", folder, "--ref", "digits", "--no-progress"),
                      "2 images", "at least 65", "64-d")


@pytest.mark.slow
def test_a_run_records_its_environment_and_draws_its_losses(finished_run):
    metrics = json.loads((finished_run / "metrics.json").read_text())
    env = metrics["environment"]
    assert env["processes"] == 1 and env["device"].startswith("cpu") and env["torch"] and env["diffusers"]
    assert env["mixed_precision"] == "no" and "fdistill" in env and "commit" in env
    plot = Image.open(finished_run / "losses.png")
    assert plot.width > 300 and plot.height > 200


@pytest.mark.slow
def test_push_to_hub_offline_is_one_line_before_anything_is_written(finished_run, tmp_path):
    out = tmp_path / "export"
    assert_user_error(run("export.py", "--run", finished_run, "--out", out, "--push-to-hub", "me/student"),
                      "--push-to-hub me/student", "HF_HUB_OFFLINE")
    assert not out.exists()
