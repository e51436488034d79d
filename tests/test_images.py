"""Image runs end to end: diffusers teachers, image batches, the image evaluation protocol and its metrics."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from fdistill.data.images import DigitsDataset, ImageBatches
from fdistill.errors import ConfigError
from fdistill.evaluation import class_statistics
from fdistill.networks.generator import default_student_times
from fdistill.pipelines.loading import load_diffusers_teacher
from fdistill.recipes import load_config
from fdistill.run import build_experiment
from fdistill.teachers import EMBEDDED_TEACHER_DIR

ROOT = Path(__file__).resolve().parent.parent


def test_embedded_teacher_maps_its_scheduler():
    from diffusers import DDPMScheduler

    from fdistill.teachers import build_teacher

    teacher = build_teacher(load_config(None, ["teacher.kind=embedded"])[0])

    scheduler = DDPMScheduler.from_pretrained(EMBEDDED_TEACHER_DIR, subfolder="scheduler")
    t = torch.tensor([0.0, 500.0, 999.0], dtype=torch.float64)
    alpha_bar = scheduler.alphas_cumprod[[0, 500, 999]].double()
    assert teacher.prediction_type == "v_prediction" and teacher.sample_shape == (1, 16, 16)
    torch.testing.assert_close(teacher.schedule.alpha(t) ** 2, alpha_bar, rtol=1e-6, atol=0)
    assert not any(p.requires_grad for p in teacher.parameters())


def test_default_one_step_time_is_well_conditioned_for_every_prediction_type():
    v_teacher = load_diffusers_teacher(EMBEDDED_TEACHER_DIR)
    eps_teacher = load_diffusers_teacher(EMBEDDED_TEACHER_DIR, prediction_type="epsilon")
    assert default_student_times(v_teacher) == [999.0]
    (t_eps,) = default_student_times(eps_teacher)
    s = eps_teacher.schedule
    assert t_eps == int(t_eps)  # the nearest timestep: students of diffusers teachers sample at integer ones
    below, at, above = (float(s.sigma(t) / s.alpha(t)) for t in (t_eps - 1, t_eps, t_eps + 1))
    assert below < at < above and abs(at - 2.5) <= min(2.5 - below, above - 2.5)
    # the x0 read-out of an epsilon net divides its error by alpha: 1/alpha stays below 3 instead of ~156
    assert 1 / float(s.alpha(t_eps)) < 3 < 100 < 1 / float(s.alpha(999.0))


def test_image_batches_carry_labels_as_conditions_and_replay_under_a_seed():
    data = DigitsDataset(size=16)
    stream = iter(ImageBatches(data, 8, with_real=True, conditional=True))
    torch.manual_seed(3)
    a = next(stream)
    torch.manual_seed(3)
    b = next(stream)
    assert a.real.shape == (8, 1, 16, 16) and a.cond.dtype == torch.long
    assert torch.equal(a.real, b.real) and torch.equal(a.cond, b.cond)
    # each image comes with its own label
    index = [int(torch.nonzero((data.images == img).all(dim=(1, 2, 3)))[0]) for img in a.real]
    assert torch.equal(data.labels[index], a.cond)
    no_real = next(iter(ImageBatches(data, 4, with_real=False, conditional=False)))
    assert no_real.real is None and no_real.cond is None


def test_class_statistics_closed_form():
    labels = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    predicted = torch.tensor([0, 1, 2, 2, 0, 1, 2, 2])  # class 3 is never produced
    logits = torch.nn.functional.one_hot(predicted, 4).float()
    stats = class_statistics(logits, labels, 4)
    assert stats["class_accuracy"] == 0.75 and stats["class_coverage"] == 0.75


def test_image_config_errors_name_the_fix():
    cfg, options = load_config(None, ["teacher.kind=embedded", "data.kind=folder"])
    _, objective, task = build_experiment(cfg, options)
    with pytest.raises(ConfigError, match="data.path"):
        task.batches(objective.needs_real_data)
    cfg.data.kind = "shapes"
    with pytest.raises(ConfigError, match="channel"):
        task.batches(objective.needs_real_data)
    with pytest.raises(ConfigError, match="teacher.pretrained"):
        build_experiment(*load_config(None, ["teacher.kind=pretrained"]))


def test_shipped_teacher_reproduces_its_recorded_metric():
    """The provenance protocol (1000 samples, 35-step DDIM, seed 1) run again with the shipped files."""
    spec = importlib.util.spec_from_file_location("train_digits_teacher", ROOT / "scripts/train_digits_teacher.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    from diffusers import DDPMScheduler, UNet2DModel

    provenance = json.loads((EMBEDDED_TEACHER_DIR / "provenance.json").read_text())
    unet = UNet2DModel.from_pretrained(EMBEDDED_TEACHER_DIR, subfolder="unet").eval()
    scheduler = DDPMScheduler.from_pretrained(EMBEDDED_TEACHER_DIR, subfolder="scheduler")
    metric = script.evaluate(unet, scheduler, DigitsDataset(size=16), OmegaConf.create(provenance["config"]))
    recorded = provenance["metric"]
    assert metric["fd"] == pytest.approx(recorded["fd"], rel=0.02)
    assert metric["label_accuracy"] == pytest.approx(recorded["label_accuracy"], abs=0.01)


@pytest.mark.slow
def test_tiny_image_run_reports_protocol_writes_samples_and_pipeline(tmp_path):
    """A few steps of the quickstart: metrics for student and teacher under one protocol, the PNG folders that
    eval/fid.py reproduces the FD from, the comparison grid and the exported pipeline."""
    run = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "train.py"), "--config", str(ROOT / "configs/quickstart.yaml"), "--no-progress",
           f"run.dir={run}", "train.steps=3", "eval.num_samples=80", "eval.teacher_steps=3", "eval.student_steps=[1,2]",
           "generator.times=[999,500]", "log.sample_every=3", "checkpoint.every=0", "log.fd_every=3",
           "log.fd_samples=80"]
    subprocess.run(cmd, check=True, cwd=tmp_path, capture_output=True, text=True)
    results = json.loads((run / "metrics.json").read_text())["results"]
    assert [(r["model"], r["nfe"]) for r in results] == [("student", 1), ("student", 2), ("teacher", 3)]
    for r in results:
        assert r["num_samples"] == 80 and r["seed"] == 1234 and r["feature_net"] == "fdistill-digits"
        assert r["fd"] > 0 and 0 <= r["class_accuracy"] <= 1 and 0 <= r["class_coverage"] <= 1
        assert r["samples_per_second"] > 0
    grid = Image.open(run / "samples" / "student_vs_teacher.png")
    assert grid.width >= 2 * 10 * 64 and grid.height >= 4 * 64  # 10 digits a row per side, upscaled to 64 px
    assert Image.open(run / "samples" / "step-00000003.png").width > 4 * 16 * 10
    folder = run / "samples" / "student_nfe1"
    assert len(list(folder.glob("*.png"))) == 80
    out = subprocess.run([sys.executable, str(ROOT / "eval/fid.py"), "--samples", str(folder), "--ref", "digits",
                          "--features", "fdistill-digits", "--json", "--no-progress"],
                         check=True, capture_output=True, text=True).stdout
    assert json.loads(out)["value"] == pytest.approx(results[0]["fd"], rel=1e-3)
    fd_rows = [line for line in (run / "train_log.csv").read_text().splitlines() if ",eval/fd," in line]
    assert len(fd_rows) == 1 and fd_rows[0].startswith("3,") and float(fd_rows[0].split(",")[2]) > 0
    info = json.loads((run / "pipeline" / "fdistill.json").read_text())
    assert info["objective"] == "f_distill" and info["student_times"] == [999, 500]


def test_generator_noise_level_sets_the_one_step_time():
    cfg, options = load_config(None, ["teacher.kind=embedded", "generator.noise_level=2.5"])
    nets, _, _ = build_experiment(cfg, options)
    (t0,) = nets.student.times
    s = nets.teacher.schedule
    assert float(s.sigma(t0) / s.alpha(t0)) == pytest.approx(2.5, rel=2e-3) and 400 < t0 < 480 and t0 == int(t0)
    with pytest.raises(ConfigError, match="keep one"):
        load_config(None, ["generator.noise_level=2.5", "generator.times=[999]"])
    with pytest.raises(ConfigError, match="positive"):
        load_config(None, ["generator.noise_level=0"])
