"""Resuming is bit-exact on CPU in fp32: after a planned stop, a SIGTERM, or a crash while a checkpoint is
being written, the run ends with the same weights, optimizer state and EMAs as an uninterrupted one."""

import csv
import os
import signal
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState

from fdistill.errors import ConfigError
from fdistill.objectives.f_distill import FDistill
from fdistill.recipes import load_config
from fdistill.run import run_experiment
from fdistill.training import checkpoint
from fdistill.training.trainer import Interrupted

TINY = str(Path(__file__).parents[1] / "configs" / "ring_tiny.yaml")
STEPS = 20  # f-distill with critic_steps=1: 10 critic and 10 generator updates, checkpoints every 5


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


def _run(run_dir: Path, steps: int = STEPS, resume=None):
    cfg, options = load_config(TINY, [f"run.dir={run_dir}", f"train.steps={steps}", "checkpoint.every=5",
                                      "eval.num_samples=64"])
    return run_experiment(cfg, options, progress=False, resume=resume)


def _final_state(run_dir: Path) -> dict:
    state = torch.load(checkpoint.checkpoint_dirs(run_dir)[-1] / checkpoint.STATE_FILE, weights_only=False)
    state["counters"].pop("wall_seconds")
    return state


def assert_identical(a, b, where="state"):
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_identical(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_identical(x, y, f"{where}[{i}]")
    elif torch.is_tensor(a):
        assert a.dtype == b.dtype and torch.equal(a, b), where
    else:
        assert a == b, where


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    AcceleratorState._reset_state(True)
    run_dir = tmp_path_factory.mktemp("straight") / "run"
    metrics = _run(run_dir)
    return run_dir, metrics, _final_state(run_dir)


@pytest.mark.slow
def test_stop_and_resume_is_bit_exact(straight, tmp_path):
    run_dir, metrics, state = straight
    _run(tmp_path / "run", steps=STEPS // 2)
    AcceleratorState._reset_state(True)
    resumed = _run(tmp_path / "run", resume="latest")
    final = _final_state(tmp_path / "run")
    assert_identical(final, state)
    assert set(final["ema"]) == {"const", "power"} and final["ema"]["power"]["updates"] == STEPS // 2
    assert "ratio_normalizer.bins" in final["modules"]["objective"]  # the objective's own state travels too
    student = "student.safetensors"
    assert (tmp_path / "run" / student).read_bytes() == (run_dir / student).read_bytes()
    timeless = lambda results: [{k: v for k, v in r.items() if k != "samples_per_second"} for r in results]  # noqa
    assert timeless(resumed["results"]) == timeless(metrics["results"])


@pytest.mark.slow
def test_sigterm_writes_a_checkpoint_and_resume_matches(straight, tmp_path, monkeypatch):
    original = FDistill.generator_loss

    def signalling(self, batch, nets, step):
        if step == 7:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, batch, nets, step)

    monkeypatch.setattr(FDistill, "generator_loss", signalling)
    with pytest.raises(Interrupted, match="by SIGTERM at step 8; wrote checkpoint .*step-00000008"):
        _run(tmp_path / "run")
    monkeypatch.setattr(FDistill, "generator_loss", original)
    AcceleratorState._reset_state(True)
    _run(tmp_path / "run", resume="latest")
    assert_identical(_final_state(tmp_path / "run"), straight[2])
    with (tmp_path / "run" / "train_log.csv").open() as f:
        rows = [(r["step"], r["name"]) for r in csv.DictReader(f)]
    assert len(rows) == len(set(rows)) and ("20", "generator/vsd") in rows  # nothing repeated after resuming


@pytest.mark.slow
def test_crash_while_writing_a_checkpoint_keeps_the_previous_one(straight, tmp_path, monkeypatch):
    real_fsync = checkpoint._fsync_tree

    def crash_on_second_write(folder):
        if folder.name.endswith("00000010"):
            (folder / checkpoint.STATE_FILE).write_bytes(b"truncated")
            raise OSError("simulated crash in the middle of a checkpoint write")
        real_fsync(folder)

    monkeypatch.setattr(checkpoint, "_fsync_tree", crash_on_second_write)
    with pytest.raises(checkpoint.CheckpointWriteError, match="could not write checkpoint step-00000010 .*"
                       "step-00000005 is intact"):
        _run(tmp_path / "run")
    monkeypatch.setattr(checkpoint, "_fsync_tree", real_fsync)
    root = tmp_path / "run" / "checkpoints"
    assert [p.name for p in checkpoint.checkpoint_dirs(tmp_path / "run")] == ["step-00000005"]
    assert not (root / ".tmp-step-00000010").exists()  # the partial write is removed at once
    previous = torch.load(root / "step-00000005" / checkpoint.STATE_FILE, weights_only=False)
    assert previous["counters"]["step"] == 5

    AcceleratorState._reset_state(True)
    _run(tmp_path / "run", resume="latest")
    assert_identical(_final_state(tmp_path / "run"), straight[2])
    assert not list(root.glob(".tmp-*"))
    kept = [p.name for p in checkpoint.checkpoint_dirs(tmp_path / "run")]
    assert kept == ["step-00000015", "step-00000020"]


@pytest.mark.slow
def test_resume_from_a_given_checkpoint(straight, tmp_path):
    _run(tmp_path / "run", steps=STEPS // 2)
    first = checkpoint.checkpoint_dirs(tmp_path / "run")[0]
    assert first.name == "step-00000005"
    AcceleratorState._reset_state(True)
    _run(tmp_path / "run", resume=str(first))
    assert_identical(_final_state(tmp_path / "run"), straight[2])


def test_resume_errors_and_fresh_start(tmp_path):
    with pytest.raises(ConfigError, match="not a checkpoint directory"):
        checkpoint.resolve(tmp_path, str(tmp_path / "nowhere"))
    assert checkpoint.resolve(tmp_path, "latest") is None  # --resume on a run without checkpoints starts over
