import torch

from fdistill.metrics.toy import energy_distance, mode_statistics
from fdistill.networks.denoisers import GaussianMixtureDenoiser, ring_mixture
from fdistill.schedules import EDMSchedule


def ring(weights=None):
    return GaussianMixtureDenoiser(**ring_mixture(8, 2.0, 0.1, weights), schedule=EDMSchedule())


def stats(x, teacher):
    return mode_statistics(x, teacher.means, teacher.variances.sqrt().mean(1), teacher.weights)


def test_exact_samples_cover_all_modes_with_small_tv_and_energy_distance():
    teacher = ring()
    g = torch.Generator().manual_seed(0)
    x, y = teacher.sample(4000, g)[0], teacher.sample(4000, g)[0]
    s = stats(x, teacher)
    assert s["modes_covered"] == 8 and s["mode_weight_tv"] < 0.03 and s["off_mode_fraction"] < 0.01
    assert abs(energy_distance(x, y)) < 0.005


def test_collapsed_samples_are_detected():
    teacher = ring()
    x = teacher.sample(4000, torch.Generator().manual_seed(0))[0]
    x = x[torch.cdist(x, teacher.means.float()).argmin(1) < 2]  # keep modes 0 and 1 only
    s = stats(x, teacher)
    assert s["modes_covered"] == 2
    assert abs(s["mode_weight_tv"] - 0.75) < 0.02
    y = teacher.sample(4000, torch.Generator().manual_seed(1))[0]
    assert energy_distance(x, y) > 0.3


def test_min_share_rule_and_blurred_samples():
    teacher = ring([0.3, 0.2, 0.15, 0.1, 0.08, 0.07, 0.07, 0.03])
    x = teacher.sample(4000, torch.Generator().manual_seed(0))[0]
    assert stats(x, teacher)["modes_covered"] == 8
    blurred = x + 0.5 * torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    assert stats(blurred, teacher)["off_mode_fraction"] > 0.5
