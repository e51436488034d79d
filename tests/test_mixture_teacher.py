"""Analytic Gaussian-mixture teachers from the configuration (``teacher.kind=mixture``, the ring as a preset):
equal to the ring on its parameters, exact scores, samples that follow the configuration, mode metrics in any
dimension, a preview in 8-D and one-line errors that name the fix."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from scipy.stats import chi2, ncx2

from fdistill.config import dump_config
from fdistill.errors import ConfigError
from fdistill.metrics.toy import mode_statistics, nearest_mode, off_mode_threshold
from fdistill.recipes import load_config
from fdistill.run import build_experiment
from fdistill.teachers import build_teacher

ROOT = Path(__file__).resolve().parents[1]
MIXTURE_8D = str(ROOT / "configs" / "mixture_8d.yaml")
RING_UNEQUAL = str(ROOT / "configs" / "ring_unequal.yaml")
TWO_MODES = ["teacher.kind=mixture", "teacher.means=[[0, 0], [3, 0]]", "teacher.stds=0.2"]
# 3 modes in 8-D whose stds differ eightfold between coordinates and between modes
ANISOTROPIC_MEANS = [[6.0 * (k == i) for i in range(8)] for k in range(3)]
ANISOTROPIC_STDS = [[0.05 * (1 + (i + k) % 4) ** 1.5 for i in range(8)] for k in range(3)]
ANISOTROPIC = ["teacher.kind=mixture", f"teacher.means={ANISOTROPIC_MEANS}", f"teacher.stds={ANISOTROPIC_STDS}",
               "teacher.weights=[0.5, 0.3, 0.2]"]


def teacher_of(path=None, *overrides):
    return build_teacher(load_config(path, list(overrides))[0])


def probe(teacher, n=256, seed=0):
    """Noisy inputs at times across the EDM range and the teacher's x0-predictions on them."""
    g = torch.Generator().manual_seed(seed)
    t = torch.exp(torch.empty(n, dtype=torch.float64).uniform_(-5, 4.4, generator=g))
    x = teacher.sample(n, generator=g)[0] + t[:, None].float() * torch.randn(n, teacher.sample_shape[0], generator=g)
    return x, t, teacher(x, t)


@pytest.mark.parametrize("ring_config, ring_overrides", [
    (None, []),
    (None, ["teacher.num_modes=5", "teacher.radius=3.5", "teacher.std=0.25"]),
    (RING_UNEQUAL, []),
])
def test_the_ring_preset_is_the_mixture_with_the_same_parameters(ring_config, ring_overrides):
    ring = teacher_of(ring_config, *ring_overrides)
    tc = load_config(ring_config, ring_overrides)[0].teacher
    weights = [] if tc.weights is None else [f"teacher.weights={tc.weights}"]
    mixture = teacher_of(None, "teacher.kind=mixture", f"teacher.means={ring.means.tolist()}",
                         f"teacher.stds={tc.std}", *weights)
    for name in ("weights", "means", "variances"):
        assert torch.equal(getattr(ring, name), getattr(mixture, name)), name
    x, t, ring_x0 = probe(ring)
    assert torch.equal(mixture(x, t), ring_x0)
    assert torch.equal(ring.sample(100, torch.Generator().manual_seed(1))[0],
                       mixture.sample(100, torch.Generator().manual_seed(1))[0])


def test_the_unequal_ring_config_weighs_its_modes_as_given():
    ring = teacher_of(RING_UNEQUAL)
    assert ring.num_modes == 8
    assert torch.allclose(ring.weights, torch.tensor([0.3, 0.2, 0.15, 0.1, 0.08, 0.07, 0.07, 0.03],
                                                     dtype=torch.float64))


@pytest.mark.parametrize("path, overrides", [(MIXTURE_8D, []), (None, ANISOTROPIC)])
def test_exact_score_is_the_gradient_of_the_log_density_and_tweedie_holds(path, overrides):
    teacher = teacher_of(path, *overrides)
    x, t, _ = probe(teacher, n=64)
    x = x.double().requires_grad_(True)
    (grad,) = torch.autograd.grad(teacher.log_prob(x, t).sum(), x)
    score = teacher.score(x.detach(), t)
    assert torch.allclose(score, grad, rtol=1e-9, atol=1e-9)
    x0 = teacher.forward_with_features(x.detach(), t)[0]  # EDM: alpha = 1, sigma = t
    assert torch.allclose(x0, x.detach() + t[:, None] ** 2 * score, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("path, overrides", [(MIXTURE_8D, []), (None, ANISOTROPIC)])
def test_samples_follow_the_configured_means_stds_and_weights(path, overrides):
    tc = load_config(path, overrides)[0].teacher
    teacher = build_teacher(load_config(path, overrides)[0])
    means = torch.tensor(tc.means, dtype=torch.float64)
    stds = torch.tensor(tc.stds, dtype=torch.float64)
    stds = (stds[:, None] if stds.dim() == 1 else stds).expand_as(means)
    weights = torch.tensor(tc.weights, dtype=torch.float64) / sum(tc.weights)
    x, modes = teacher.sample(100_000, generator=torch.Generator().manual_seed(0))
    assert x.shape == (100_000, 8)
    freq = torch.bincount(modes, minlength=len(weights)).double() / len(modes)
    assert (freq - weights).abs().max() < 0.005
    for k in range(len(weights)):
        own = x[modes == k].double()
        assert (own.mean(0) - means[k]).abs().max() < 6 * stds[k].max() / len(own) ** 0.5, k
        assert (own.std(0) / stds[k] - 1).abs().max() < 0.05, k


def test_metrics_of_exact_8d_samples_show_every_mode_and_no_off_mode_samples():
    teacher = teacher_of(MIXTURE_8D)
    x = teacher.sample(4000, generator=torch.Generator().manual_seed(0))[0]
    stats = mode_statistics(x, teacher.means, teacher.variances.sqrt(), teacher.weights)
    assert stats["modes_covered"] == stats["num_modes"] == 16
    assert stats["mode_weight_tv"] < 0.03
    assert stats["off_mode_fraction"] < 0.003


def test_shifted_samples_give_the_expected_off_mode_fraction():
    """Every coordinate of an exact sample moved by ``shift`` of its mode's stds: its squared distance from its
    mode, in stds, is noncentral chi-square with D degrees of freedom and noncentrality ``D shift^2``."""
    teacher = teacher_of(None, *ANISOTROPIC)
    stds = teacher.variances.sqrt()
    x, modes = teacher.sample(8000, generator=torch.Generator().manual_seed(0))
    dim, threshold = x.shape[1], off_mode_threshold(x.shape[1], 4.0)
    for shift in (1.0, 1.5, 2.0):  # expected fractions 0.05, 0.35, 0.82
        moved = x + (shift * stds[modes]).float()
        stats = mode_statistics(moved, teacher.means, stds, teacher.weights)
        expected = ncx2.sf(threshold**2, dim, dim * shift**2)
        assert abs(stats["off_mode_fraction"] - expected) < 0.025, (shift, stats, expected)
        assert stats["mode_weight_tv"] < 0.03  # still assigned to their own modes


def test_the_off_mode_distance_is_as_rare_in_d_dimensions_as_4_stds_in_2():
    assert off_mode_threshold(2, 4.0) == pytest.approx(4.0, rel=1e-12)
    for dim in (1, 3, 8, 16, 64):
        assert chi2.sf(off_mode_threshold(dim, 4.0) ** 2, dim) == pytest.approx(chi2.sf(16, 2), rel=1e-6)


def test_modes_are_assigned_by_distance_in_units_of_each_modes_stds():
    means = torch.tensor([[0.0, 0.0], [3.0, 0.0]])
    sample = torch.tensor([[1.0, 0.0]])  # 1 from a mode of std 0.1 (10 stds), 2 from one of std 2 (1 std)
    index, distance = nearest_mode(sample, means, torch.tensor([0.1, 2.0]))
    assert index.tolist() == [1] and distance.item() == pytest.approx(1.0)
    # per coordinate: the second mode is wide along x only, so a sample off along y is the first mode's
    index, _ = nearest_mode(torch.tensor([[1.0, 0.5]]), means, torch.tensor([[0.5, 0.5], [2.0, 0.01]]))
    assert index.tolist() == [0]


def test_an_8d_mixture_run_builds_previews_and_round_trips_its_config(tmp_path):
    cfg, options = load_config(MIXTURE_8D, ["train.batch_size=16"])
    (tmp_path / "config.yaml").write_text(dump_config(cfg))
    assert load_config(str(tmp_path / "config.yaml"))[0].teacher == cfg.teacher
    nets, _, task = build_experiment(cfg, options)
    assert nets.student.sample_shape == (8,)
    task.preview(nets, tmp_path / "preview.png")
    assert (tmp_path / "preview.png").stat().st_size > 1000


@pytest.mark.parametrize("overrides, message", [
    (["teacher.kind=mixture", "teacher.stds=0.1"], "teacher.kind=mixture needs teacher.means: K means of D"),
    (["teacher.kind=mixture", "teacher.means=[[0, 0], [1, 1]]"], "teacher.kind=mixture needs teacher.stds: one "
     "number, 2 numbers (one per mode) or 2 rows of 2 (one per mode and coordinate)"),
    ([*TWO_MODES, "teacher.means=[[0, 0], [3]]"],
     "teacher.means is ragged: mean 1 has 1 coordinates but mean 0 has 2; give every mean the same number"),
    ([*TWO_MODES, "teacher.stds=[0.1, 0.2, 0.3]"],
     "teacher.stds (3 entries) must be one number, 2 numbers (one per mode) or 2 rows of 2"),
    ([*TWO_MODES, "teacher.stds=[[0.1, 0.2], [0.3]]"], "teacher.stds (2 entries (rows of 1 or 2)) must be"),
    ([*TWO_MODES, "teacher.stds=wide"], "teacher.stds ('wide') must be one number"),
    ([*TWO_MODES, "teacher.stds=0"], "teacher.stds must be positive and finite, got 0; give every mode a positive"),
    ([*TWO_MODES, "teacher.stds=[[0.1, 0.2], [0.3, -0.1]]"], "teacher.stds must be positive and finite, got -0.1"),
    ([*TWO_MODES, "teacher.weights=[1, 2, 3]"], "teacher.weights has 3 entries but teacher.means gives 2 modes; "
     "give one weight per mode, or leave teacher.weights out"),
    ([*TWO_MODES, "teacher.weights=[1, -1]"], "teacher.weights=[1.0, -1.0] must be non-negative and not all zero"),
    ([*TWO_MODES, "teacher.weights=[0, 0]"], "teacher.weights=[0.0, 0.0] must be non-negative and not all zero"),
    (["teacher.weights=[1, 2]"], "teacher.weights has 2 entries but teacher.num_modes=8 gives 8 modes"),
    (["teacher.weights=[1, 1, 1, 1, 1, 1, 1, -1]"], "must be non-negative and not all zero"),
    (["teacher.std=0"], "teacher.std must be positive and finite, got 0.0"),
    (["teacher.num_modes=0"], "teacher.num_modes must be at least 1, got 0"),
    ([*TWO_MODES, "teacher.num_modes=2"], "teacher.num_modes is not read by teacher.kind=mixture (teacher.kind=ring "
     "reads it); remove it or change teacher.kind"),
    ([*TWO_MODES, "teacher.radius=3"], "teacher.radius is not read by teacher.kind=mixture"),
    ([*TWO_MODES, "teacher.std=0.3"], "teacher.std is not read by teacher.kind=mixture"),
    (["teacher.means=[[0, 0]]"], "teacher.means is not read by teacher.kind=ring (teacher.kind=mixture reads it); "
     "remove it or change teacher.kind"),
    (["teacher.stds=0.2"], "teacher.stds is not read by teacher.kind=ring (teacher.kind=mixture reads it)"),
    (["teacher.kind=mixtures"], "unknown teacher.kind 'mixtures'; choose one of ring, mixture, unet"),
])
def test_each_configuration_error_names_its_fix(overrides, message):
    with pytest.raises(ConfigError) as info:
        build_teacher(load_config(None, overrides)[0])
    assert message in str(info.value) and "\n" not in str(info.value), str(info.value)


@pytest.mark.slow
def test_train_stops_with_one_error_line_on_a_bad_mixture(tmp_path):
    proc = subprocess.run([sys.executable, "train.py", "--config", MIXTURE_8D, "--no-progress",
                           "teacher.stds=[0.1, 0.2]", f"run.dir={tmp_path / 'run'}"], cwd=ROOT, capture_output=True,
                          text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert lines == ["error: teacher.stds (2 entries) must be one number, 16 numbers (one per mode) or 16 rows of 8 "
                     "(one per mode and coordinate) to fit teacher.means"], proc.stderr[-2000:]
