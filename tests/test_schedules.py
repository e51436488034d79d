import math

import pytest
import torch

from fdistill.schedules import (
    DiscreteVPSchedule,
    EDMSchedule,
    RectifiedFlowSchedule,
    TrigFlowSchedule,
    VPSchedule,
    from_x0,
    matched_time,
    sample_time,
    to_x0,
)


def ddpm_alphas_cumprod():
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    return torch.cumprod(1 - betas, 0)


SCHEDULES = {
    "vp": VPSchedule(),
    "discrete_vp": DiscreteVPSchedule(ddpm_alphas_cumprod()),
    "edm": EDMSchedule(),
    "rf": RectifiedFlowSchedule(),
    "trigflow": TrigFlowSchedule(sigma_data=0.5),
}
KINDS = {"vp": ["eps", "v", "flow", "score"], "discrete_vp": ["eps", "v", "flow", "score"],
         "edm": ["eps", "flow", "score"], "rf": ["eps", "flow", "score"],
         "trigflow": ["eps", "flow", "score", "trigflow"]}


def interior_times(s, n=16):
    lo, hi = s.t_min, s.t_max
    return lo + (hi - lo) * torch.linspace(0.05, 0.95, n, dtype=torch.float64)


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_every_parameterisation_round_trips(name):
    s = SCHEDULES[name]
    t = interior_times(s)
    x_t = torch.randn(16, 3, dtype=torch.float64)
    x0 = torch.randn(16, 3, dtype=torch.float64)
    a, sg = s.coefficients(t, x_t)
    da, ds = s.dalpha(t)[:, None], s.dsigma(t)[:, None]
    for kind in KINDS[name]:
        pred = from_x0(x0, kind, x_t, a, sg, da, ds)
        back = to_x0(pred, kind, x_t, a, sg, da, ds)
        assert torch.allclose(back, x0, atol=1e-8, rtol=1e-8), kind
        for other in KINDS[name]:  # kind -> x0 -> other -> x0
            via = to_x0(from_x0(back, other, x_t, a, sg, da, ds), other, x_t, a, sg, da, ds)
            assert torch.allclose(via, x0, atol=1e-8), (kind, other)


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_conversions_match_the_definitions(name):
    s = SCHEDULES[name]
    t = interior_times(s)
    x0, eps = torch.randn(16, 2, dtype=torch.float64), torch.randn(16, 2, dtype=torch.float64)
    a, sg = s.coefficients(t, x0)
    x_t = a * x0 + sg * eps
    assert torch.allclose(from_x0(x0, "eps", x_t, a, sg), eps, atol=1e-9)
    assert torch.allclose(from_x0(x0, "score", x_t, a, sg), -eps / sg, atol=1e-9)
    da, ds = s.dalpha(t)[:, None], s.dsigma(t)[:, None]
    assert torch.allclose(from_x0(x0, "flow", x_t, a, sg, da, ds), da * x0 + ds * eps, atol=1e-6)


def test_v_prediction_definition():
    s = SCHEDULES["discrete_vp"]
    t = torch.tensor([10.0, 500.0, 999.0], dtype=torch.float64)
    x0, eps = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    a, sg = s.coefficients(t, x0)
    x_t = a * x0 + sg * eps
    assert torch.allclose(from_x0(x0, "v", x_t, a, sg), a * eps - sg * x0, atol=1e-10)


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_t_from_snr_inverts_alpha_over_sigma(name):
    s = SCHEDULES[name]
    t = interior_times(s)
    back = s.t_from_snr(s.alpha(t) / s.sigma(t))
    assert torch.allclose(back, t, rtol=1e-6, atol=1e-6)


def test_discrete_vp_matches_diffusers_at_integer_steps():
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(num_train_timesteps=1000)
    s = DiscreteVPSchedule.from_diffusers(sched)
    k = torch.tensor([0, 1, 250, 998, 999])
    ac = sched.alphas_cumprod.double()[k]
    assert torch.allclose(s.alpha(k.double()), ac.sqrt(), rtol=1e-6)
    assert torch.allclose(s.sigma(k.double()), (1 - ac).sqrt(), rtol=1e-6)


@pytest.mark.parametrize("name", ["vp", "discrete_vp", "edm", "rf"])
def test_trigflow_snr_matching(name):
    """A TrigFlow time and input map to a teacher time with the same SNR; the x0 seen is unchanged."""
    src, trig = SCHEDULES[name], TrigFlowSchedule(sigma_data=0.5)
    t = interior_times(src, 8)
    t_trig, scale = matched_time(src, t, trig)
    snr_src, snr_trig = src.alpha(t) / src.sigma(t), trig.alpha(t_trig) / trig.sigma(t_trig)
    assert torch.allclose(snr_src, snr_trig, rtol=1e-8)
    x0, eps = torch.randn(8, 3, dtype=torch.float64), torch.randn(8, 3, dtype=torch.float64)
    x_src = src.diffuse(x0, t, eps)
    x_trig = trig.diffuse(x0, t_trig, eps)
    assert torch.allclose(scale[:, None] * x_src, x_trig, atol=1e-8)


def test_trigflow_edm_closed_form():
    t = torch.tensor([0.1, 0.7, 1.5], dtype=torch.float64)
    trig = TrigFlowSchedule(sigma_data=0.5)
    t_edm, _ = matched_time(trig, t, EDMSchedule())
    assert torch.allclose(t_edm, 0.5 * torch.tan(t))
    assert torch.allclose(EDMSchedule().t_from_snr(1 / t_edm).double(), t_edm)
    assert torch.allclose(trig.t_from_snr(1 / t_edm), torch.atan2(t_edm, torch.tensor(0.5, dtype=torch.float64)))


def test_rf_to_trigflow_matches_rcm_map():
    """sigma_d = 1: RF time s = sin t / (sin t + cos t), x_RF = x_trig / (sin t + cos t) (docs/objectives.md §1.1)."""
    t = torch.tensor([0.2, 0.9, 1.4], dtype=torch.float64)
    s, scale = matched_time(TrigFlowSchedule(sigma_data=1.0), t, RectifiedFlowSchedule())
    assert torch.allclose(s, torch.sin(t) / (torch.sin(t) + torch.cos(t)))
    assert torch.allclose(scale, 1 / (torch.sin(t) + torch.cos(t)))


def test_time_samplers_stay_in_range_and_follow_their_law():
    torch.manual_seed(0)
    edm = EDMSchedule()
    sigma = sample_time(edm, 20000, "lognormal", p_mean=-1.2, p_std=1.2)
    assert abs(torch.log(sigma).mean().item() + 1.2) < 0.03
    sid = sample_time(edm, 5000, "sid")
    assert sid.min() >= 0.002 - 1e-9 and sid.max() <= 24.42
    poly = sample_time(edm, 5000, "polynomial")
    assert poly.min() >= 0.002 and poly.max() <= 80
    trig = TrigFlowSchedule(sigma_data=1.0)
    shifted = sample_time(trig, 20000, "shift", shift=5.0)
    assert abs(torch.tan(shifted).median().item() - 5.0) < 0.3  # median sigma 5 (docs/objectives.md §1.4)
    u = sample_time(SCHEDULES["discrete_vp"], 1000, "uniform", t_lo=20, t_hi=980)
    assert u.min() >= 20 and u.max() <= 980
    with pytest.raises(ValueError):
        sample_time(edm, 4, "nonsense")


def test_vp_continuous_values():
    s = VPSchedule()
    t = torch.tensor([0.5], dtype=torch.float64)
    log_alpha = -0.25 * 0.25 * 19.9 - 0.5 * 0.5 * 0.1
    assert math.isclose(float(s.alpha(t)), math.exp(log_alpha), rel_tol=1e-12)
    assert math.isclose(float(s.alpha(t) ** 2 + s.sigma(t) ** 2), 1.0, rel_tol=1e-12)
