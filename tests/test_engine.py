"""The engine on one CPU process: batch slicing and seeds, EMAs, NaN/inf faults, run-directory errors, mixed
precision, previews and the run directory's files."""

import math
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState
from safetensors.torch import load_file

import train
from fdistill.config import EMASpec
from fdistill.containers import Batch
from fdistill.objectives.f_distill import FDistill
from fdistill.recipes import load_config
from fdistill.run import load_run, make_accelerator, run_experiment
from fdistill.tasks import ToyTask
from fdistill.training import checkpoint
from fdistill.training.ema import EMA, power_exponent
from fdistill.training.trainer import Trainer, step_seed
from tests.helpers import batches as helper_batches
from tests.helpers import tiny_unet_experiment

TINY = str(Path(__file__).parents[1] / "configs" / "ring_tiny.yaml")


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


def _cfg(run_dir, *overrides):
    common = [f"run.dir={run_dir or 'null'}", "train.steps=12", "checkpoint.every=5", "eval.num_samples=64"]
    return load_config(TINY, [*common, *overrides])


def test_split_batch_and_step_seeds():
    batch = Batch(size=6, real=torch.arange(12.0).reshape(6, 2), cond={"ids": torch.arange(6), "k": 3})
    parts = batch.split(3)
    assert [p.size for p in parts] == [2, 2, 2] and parts[2].cond["k"] == 3
    assert torch.equal(torch.cat([p.real for p in parts]), batch.real)
    assert parts[1].cond["ids"].tolist() == [2, 3]
    assert Batch(size=6, real=batch.real).split(2)[1].cond is None
    moved = parts[1].to("meta")
    assert moved.real.is_meta and moved.cond["ids"].is_meta and moved.cond["k"] == 3
    with pytest.raises(ValueError, match="does not split into 4"):
        batch.split(4)
    assert step_seed(0, 5, 1) == step_seed(0, 5, 1) != step_seed(0, 5, 2) != step_seed(1, 5, 1)
    assert 0 <= step_seed(0, 5, "data") < 2**63


def test_ema_kinds():
    assert power_exponent(0.10) == pytest.approx(6.94, abs=0.01)  # EDM2's sigma_rel 0.10 <-> gamma 6.94
    for sigma in (0.05, 0.2):
        g = power_exponent(sigma)
        assert math.sqrt((g + 1) / ((g + 2) ** 2 * (g + 3))) == pytest.approx(sigma)
    p = {"w": torch.zeros(3)}
    const = EMA(EMASpec(name="c", decay=0.9), p, batch_size=8)
    power = EMA(EMASpec(name="p", sigma_rel=0.1), p, batch_size=8)
    half = EMA(EMASpec(name="h", half_life_kimg=1.0, rampup=None), p, batch_size=500)
    for ema in (const, power, half):
        ema.update({"w": torch.ones(3)})
    assert torch.allclose(const.shadow["w"], torch.full((3,), 0.1))
    assert torch.equal(power.shadow["w"], torch.ones(3))  # the first power-function update takes the weights
    assert half.beta() == pytest.approx(0.5**0.5)  # 500 samples per update, 1000-sample half-life


def _nan_grad(loss):
    class NaNGrad(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, g):
            return g * float("nan")

    return NaNGrad.apply(loss)


@pytest.mark.slow
def test_nonfinite_steps_are_skipped_counted_and_never_checkpointed(tmp_path, monkeypatch):
    original = FDistill.generator_loss

    def faulty(self, batch, nets, step):
        loss, logs = original(self, batch, nets, step)
        if step in (3, 5):
            return loss * float("nan"), logs  # NaN loss
        return (_nan_grad(loss), logs) if step == 7 else (loss, logs)  # finite loss, NaN gradient

    monkeypatch.setattr(FDistill, "generator_loss", faulty)
    metrics = run_experiment(*_cfg(tmp_path / "run"), progress=False)
    assert metrics["nonfinite_steps"] == 3 and metrics["steps"] == 12
    for ckpt in checkpoint.checkpoint_dirs(tmp_path / "run"):
        checkpoint.assert_finite(torch.load(ckpt / checkpoint.STATE_FILE, weights_only=False))
    log = (tmp_path / "run" / "train_log.csv").read_text()
    assert "10,nonfinite_fraction,0.3" in log  # 3 of the first 10 steps skipped


def _nan_from(first_step, loss_fn):
    def broken(self, batch, nets, step):
        loss, logs = loss_fn(self, batch, nets, step)
        return (loss * float("nan") if step >= first_step else loss), logs

    return broken


def test_too_many_nonfinite_steps_abort_cleanly(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(FDistill, "critic_loss", _nan_from(6, FDistill.critic_loss))
    monkeypatch.setattr(FDistill, "generator_loss", _nan_from(6, FDistill.generator_loss))
    with pytest.raises(SystemExit) as info:
        train.main(["--config", TINY, "--no-progress", f"run.dir={tmp_path / 'run'}", "train.steps=12",
                    "checkpoint.every=5", "train.max_nonfinite_in_a_row=3"])
    assert info.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: 3 non-finite steps in a row") and "at step 8" in err
    assert [p.name for p in checkpoint.checkpoint_dirs(tmp_path / "run")] == ["step-00000005"]


def test_nonfinite_weights_are_not_written(tmp_path):
    cfg, options = _cfg(tmp_path / "run")
    trainer = _trainer(cfg, options, tmp_path / "run")
    with torch.no_grad():
        next(trainer.nets.student.parameters())[0] = float("inf")
    with pytest.raises(checkpoint.NonFiniteState, match="modules.student"):
        trainer.save_checkpoint()
    assert checkpoint.checkpoint_dirs(tmp_path / "run") == []


def _trainer(cfg, options, run_dir=None, nets=None, batches=None):
    from fdistill.run import build_experiment

    built, objective, task = build_experiment(cfg, options)
    nets = nets or built
    batches = batches or task.batches(objective.needs_real_data)
    return Trainer(nets, objective, batches, cfg, make_accelerator(cfg), run_dir, progress=False,
                   preview=task.preview)


@pytest.mark.parametrize("flags, message", [
    ([], "already holds a run; continue it with --resume, replace it with --overwrite"),
    (["--resume", "--overwrite"], "--resume and --overwrite exclude each other"),
])
def test_existing_run_needs_resume_or_overwrite(tmp_path, capsys, flags, message):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("old")
    with pytest.raises(SystemExit) as info:
        train.main(["--config", TINY, "--no-progress", f"run.dir={tmp_path / 'run'}", *flags])
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.startswith("error: ") and message in err
    assert len(err.splitlines()) == 1
    assert (tmp_path / "run" / "config.yaml").read_text() == "old"


def test_unwritable_run_dir_fails_before_training(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit) as info:
        train.main(["--config", TINY, "--no-progress", f"run.dir={tmp_path / 'file' / 'run'}"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.startswith("error: run directory") and "not writable" in err


@pytest.mark.slow
def test_overwrite_replaces_the_run_and_files_are_complete(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(ToyTask, "preview", lambda self, nets, path: calls.append(path))
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("old")
    (tmp_path / "run" / "stale.txt").write_text("old")
    cfg, options = _cfg(tmp_path / "run", "log.sample_every=6")
    metrics = run_experiment(cfg, options, progress=False, overwrite=True)
    run = tmp_path / "run"
    assert not (run / "stale.txt").exists()
    assert [p.name for p in calls] == ["step-00000006.png", "step-00000012.png"]
    assert {"results", "objective", "steps", "wall_seconds"} <= set(metrics)
    assert metrics["protocol"]["ema"] == "power"
    raw = load_file(str(run / "student.safetensors"))
    power = load_file(str(run / "student_ema_power.safetensors"))
    _, nets, _ = load_run(run)  # eval.ema=power: the weights metrics.json was computed with
    assert all(torch.equal(v, power[k]) for k, v in nets.student.state_dict().items())
    _, nets, _ = load_run(run, ema=None)
    assert all(torch.equal(v, raw[k]) for k, v in nets.student.state_dict().items())
    assert not all(torch.equal(v, power[k]) for k, v in raw.items())


def test_scatter_preview_for_2d_data(tmp_path):
    cfg, options = _cfg(tmp_path / "run")
    trainer = _trainer(cfg, options, tmp_path / "run")
    trainer.write_preview(tmp_path / "p" / "x.png")
    assert (tmp_path / "p" / "x.png").stat().st_size > 1000


def test_bf16_casts_the_frozen_teacher_and_keeps_trainable_weights_fp32():
    """Under ``train.mixed_precision=bf16`` the teacher's weights are bfloat16 (``teacher.dtype`` unset) and the full
    copies trained from it float32, made from its weights before the cast."""
    cfg, (nets, objective) = tiny_unet_experiment("dmd", "train.mixed_precision=bf16", "log.tensorboard=false",
                                                  "train.steps=5", "train.batch_size=4")
    _, (fp32, _) = tiny_unet_experiment("dmd")
    assert {p.dtype for p in nets.teacher.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in nets.student.parameters()} == {torch.float32}
    assert all(torch.equal(p, q) for p, q in zip(nets.student.parameters(), fp32.teacher.parameters(), strict=True))
    summary = Trainer(nets, objective, helper_batches(), cfg, progress=False).fit()
    assert {p.dtype for p in nets.student.parameters()} == {torch.float32}
    assert summary.nonfinite_steps == 0 and math.isfinite(summary.last_logs["generator/loss"])


def test_learning_rate_warms_up_then_decays_over_each_optimizers_updates(tmp_path):
    """f-distill with ``critic_steps: 1`` alternates critic and generator: 12 steps give each optimizer 6 updates.
    The ``k``-th update uses ``lr * (k + 1) / warmup`` during the warm-up, then the decay from 1 to 0 over the
    remaining updates: ``(1 + cos(pi p)) / 2`` (cosine) or ``1 - p`` (linear), ``p = (k - warmup) / (6 - warmup)``."""
    cfg, options = _cfg(None, "student_optim.lr=0.01", "student_optim.warmup_steps=2", "student_optim.lr_decay=cosine",
                        "critic_optim.lr=0.02", "critic_optim.lr_decay=linear")
    trainer = _trainer(cfg, options)
    used = {"generator": [], "critic": []}
    for step in range(12):
        kind = trainer.objective.step_kind(step)
        used[kind].append(trainer.optimizers[kind].param_groups[0]["lr"])
        trainer.train_step(step)
    cosine = [0.005, 0.01, *(0.005 * (1 + math.cos(math.pi * k / 4)) for k in range(4))]
    assert used["generator"] == pytest.approx(cosine)
    assert used["critic"] == pytest.approx([0.02 * (1 - k / 6) for k in range(6)])
    assert used["critic"][-1] > 0 and trainer.optimizers["generator"].param_groups[0]["lr"] == pytest.approx(0)


def test_constant_learning_rate_is_the_default(tmp_path):
    cfg, options = _cfg(None, "student_optim.lr=0.01")
    trainer = _trainer(cfg, options)
    for step in range(12):
        trainer.train_step(step)
    assert trainer.optimizers["generator"].param_groups[0]["lr"] == 0.01
