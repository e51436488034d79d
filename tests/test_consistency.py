"""sCM / rCM: the tangent at the exact consistency map, one student and one critic step, few-step sampling."""

import math

import numpy as np
import pytest
import torch

from fdistill.containers import Batch
from fdistill.networks.jvp import time_jvp
from fdistill.networks.trigflow import TrigFlowDenoiser
from fdistill.objectives.scm import normalize_tangent, rcm_tangent, scm_tangent
from fdistill.recipes import load_config
from fdistill.run import build_experiment
from fdistill.schedules import sample_time
from tests.helpers import ring_experiment

# ---------------------------------------------------------------------------------------------------
# 1-D Gaussian data N(0, v): the PF-ODE is linear and the consistency map is known (docs/objectives.md §13.9).

VARIANCE = 0.3


def gaussian_case(sigma_data, x=0.7, t=0.9):
    """``(F^-, dx/dt, x_t, v, t)`` at the exact consistency map; ``v = cos t sin t dF/dt`` by exact JVP."""
    spread = lambda s: torch.cos(s) ** 2 * VARIANCE + torch.sin(s) ** 2 * sigma_data**2  # noqa: E731

    def F_exact(x_t, s):  # f = cos t x - sin t s_d F with f(x_t, t) = x_t sqrt(v / spread(t))
        s = s[:, None]
        return (torch.cos(s) * x_t - x_t * torch.sqrt(VARIANCE / spread(s))) / (sigma_data * torch.sin(s))

    x_t = torch.tensor([[x]], dtype=torch.float64)
    t = torch.tensor([t], dtype=torch.float64)
    cos, sin = torch.cos(t)[:, None], torch.sin(t)[:, None]
    dxdt = sin * cos * (sigma_data**2 - VARIANCE) / spread(t[:, None]) * x_t  # E[dx_t/dt | x_t]
    v = time_jvp(F_exact, x_t, t, cos * sin * dxdt, (cos * sin)[:, 0], "exact")
    return F_exact(x_t, t), dxdt, x_t, v, t


@pytest.mark.parametrize("sigma_data", [0.5, 1.0])
@pytest.mark.parametrize("tangent", [scm_tangent, rcm_tangent])
def test_tangent_vanishes_at_the_exact_consistency_map(tangent, sigma_data):
    for x, t in [(0.7, 0.9), (-1.3, 0.2), (2.0, 1.4)]:
        g = tangent(*gaussian_case(sigma_data, x, t), sigma_data, warmup_ratio=1.0)
        assert g.abs().max() <= 1e-8


def numpy_tangents(sigma_data, r, x=0.7, t=0.9, h=1e-6):
    """Reference in plain numpy: the sCM tangent (docs/objectives.md §8 step 5) and rCM's warm-up form (§9) at the
    exact consistency map, with ``dF/dt`` along the PF-ODE by a central difference of the closed form (step h)."""
    spread = lambda s: np.cos(s) ** 2 * VARIANCE + np.sin(s) ** 2 * sigma_data**2  # noqa: E731
    velocity = lambda y, s: np.sin(s) * np.cos(s) * (sigma_data**2 - VARIANCE) / spread(s) * y  # noqa: E731
    F = lambda y, s: (np.cos(s) * y - y * np.sqrt(VARIANCE / spread(s))) / (sigma_data * np.sin(s))  # noqa: E731
    dxdt = velocity(x, t)
    v = np.cos(t) * np.sin(t) * (F(x + h * dxdt, t + h) - F(x - h * dxdt, t - h)) / (2 * h)
    gap = sigma_data * F(x, t) - dxdt
    scm = -np.cos(t) ** 2 * gap - r * (np.cos(t) * np.sin(t) * x + sigma_data * v)
    rcm = -np.cos(t) * np.sqrt(1 - r**2 * np.sin(t) ** 2) * gap - (r * np.cos(t) * np.sin(t) * x + sigma_data * v)
    return scm, rcm


@pytest.mark.parametrize("sigma_data", [0.5, 1.0])
def test_tangent_forms_differ_during_warmup(sigma_data):
    """At ``x = 0.7, t = 0.9, r = 0.5`` against the numpy reference: sCM 6.267e-2 (sigma_d = 0.5) and 6.658e-2
    (sigma_d = 1), rCM 2.306e-1 and 2.344e-1 (docs/objectives.md §13.9 quotes all but the first rCM value); at
    r = 1 both forms vanish."""
    scm, rcm = numpy_tangents(sigma_data, r=0.5)
    assert abs(scm - rcm) > 0.1 * abs(rcm)
    assert float(scm_tangent(*gaussian_case(sigma_data), sigma_data, 0.5)) == pytest.approx(scm, rel=1e-6)
    assert float(rcm_tangent(*gaussian_case(sigma_data), sigma_data, 0.5)) == pytest.approx(rcm, rel=1e-6)
    assert max(abs(g) for g in numpy_tangents(sigma_data, r=1.0)) < 1e-8


def test_tangent_normalisation():
    g = torch.full((2, 4), 3.0)
    assert normalize_tangent(g, "l2", 0.1)[0].norm() == pytest.approx(6.0 / 6.1)
    assert normalize_tangent(g, "rms", 0.1)[0, 0] == pytest.approx(3.0 / 3.1)


# ---------------------------------------------------------------------------------------------------
# The objectives on a tiny diffusers UNet teacher (discrete VP, epsilon) built from config.

UNET_CONFIG = """
teacher:
  kind: unet
  unet: {sample_size: 8, in_channels: 3, out_channels: 3, block_out_channels: [16, 32], layers_per_block: 1,
         down_block_types: [DownBlock2D, AttnDownBlock2D], up_block_types: [AttnUpBlock2D, UpBlock2D],
         norm_num_groups: 8, attention_head_dim: 8}
generator: {times: [1.55, 1.3, 1.0, 0.6]}
"""


def build(tmp_path, objective: str):
    path = tmp_path / "tiny_unet.yaml"
    path.write_text(UNET_CONFIG + f"objective: {objective}\n")
    cfg, options = load_config(str(path))
    return build_experiment(cfg, options)[:2]


def run_step(objective, nets, kind, step):
    """Loss and logs of one step with every trainable network open to gradients; which ones got them."""
    trainable = {"student": nets.student, "fake_score": nets.fake_score, "objective": objective}
    for module in trainable.values():
        if module is not None:
            module.requires_grad_(True)
            module.zero_grad(set_to_none=True)
    batch = Batch(size=2, real=torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(step)))
    loss_fn = objective.generator_loss if kind == "generator" else objective.critic_loss
    loss, logs = loss_fn(batch, nets, step)
    assert torch.isfinite(loss) and all(torch.isfinite(v) for v in logs.values())
    loss.backward()
    assert all(p.grad is None for p in nets.teacher.parameters())
    has_grad = lambda m: any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters())  # noqa: E731
    return logs, {name: m is not None and has_grad(m) for name, m in trainable.items()}


def test_scm_student_step_on_unet_teacher(tmp_path):
    nets, objective = build(tmp_path, "{name: scm, tangent_warmup: 4}")
    assert nets.fake_score is None and objective.critic_trains == ()
    assert {objective.step_kind(s) for s in range(10)} == {"generator"}
    logs, grads = run_step(objective, nets, "generator", step=2)
    assert set(logs) == {"scm", "tangent_rms"}
    assert grads == {"student": True, "fake_score": False, "objective": True}  # objective: the logvar head


def test_rcm_student_and_critic_steps_on_unet_teacher(tmp_path):
    options = "{name: rcm, tangent_warmup: 2, student_update_freq: 3, jvp: finite_difference, fd_step: 3e-5}"
    nets, objective = build(tmp_path, options)
    student_only = {"student": True, "fake_score": False, "objective": False}
    logs, grads = run_step(objective, nets, "generator", step=0)  # warm-up: pure sCM
    assert set(logs) == {"scm", "tangent_rms"} and grads == student_only
    logs, grads = run_step(objective, nets, "generator", step=2)
    assert set(logs) == {"scm", "tangent_rms", "dmd"} and grads == student_only
    logs, grads = run_step(objective, nets, "critic", step=3)
    assert set(logs) == {"fake_score"} and grads == {"student": False, "fake_score": True, "objective": False}


def test_rcm_schedule(tmp_path):
    _, objective = build(tmp_path, "{name: rcm, tangent_warmup: 2, student_update_freq: 3}")
    kinds = "".join(objective.step_kind(s)[0] for s in range(9))
    assert kinds == "gggccgccg"
    assert [objective.student_updates_before(s) for s in range(9)] == [0, 1, 2, 3, 3, 3, 4, 4, 4]
    assert [objective.warmup_ratio(s) for s in range(4)] == [0.0, 0.5, 1.0, 1.0]


def test_student_times_must_be_trigflow_times(tmp_path):
    nets, objective = build(tmp_path, "{name: scm}")
    with pytest.raises(ValueError, match="TrigFlow"):
        objective.build_student(nets.student.net.net, [80.0])
    assert nets.student.schedule.name == "trigflow" and nets.student.times[0] < math.pi / 2


def test_few_step_sampling_shapes_and_seeds(tmp_path):
    nets, _ = build(tmp_path, "{name: rcm}")

    @torch.no_grad()
    def sample(steps, seed):
        g = torch.Generator().manual_seed(seed)
        return nets.student.sample(nets.student.noise(3, generator=g), steps=steps, generator=g)

    for steps in (1, 2, 4):
        x = sample(steps, seed=5)
        assert x.shape == (3, 3, 8, 8) and torch.isfinite(x).all()
        assert torch.equal(x, sample(steps, seed=5))
    assert not torch.equal(sample(2, seed=5), sample(2, seed=6))


# ---------------------------------------------------------------------------------------------------
# rCM's DMD term on the analytic ring: its gradient, its normaliser and its time law (docs/objectives.md §9).


def ring_rcm(*overrides):
    return ring_experiment("rcm", "generator.times=[1.5]", "objective.tangent_warmup=0", *overrides)


@pytest.mark.parametrize("normalizer", ["dmd", "none"])
def test_rcm_dmd_term_gradient_is_the_score_difference(normalizer, monkeypatch):
    """``d L_DMD / d x_g = (2 / B) w_i (x0_q - x0_p)`` at the re-noised ``x_t``, with ``w_i`` DMD's clipped
    normaliser ``1 / max(mean|x_g - x0_p|, c)`` or 1 for ``dmd_normalizer: none``."""
    nets, objective = ring_rcm(f"objective.dmd_normalizer={normalizer}")
    g = torch.Generator().manual_seed(1)
    x_g = torch.randn(6, 2, generator=g).requires_grad_(True)
    x_t = torch.randn(6, 2, generator=g)
    t = torch.linspace(0.3, 1.4, 6, dtype=torch.float64)
    monkeypatch.setattr(objective, "_student_samples", lambda *args: x_g)
    monkeypatch.setattr(objective, "_renoise", lambda net, x: (x_t, t))
    objective.dmd_loss(Batch(size=6, real=torch.zeros(6, 2)), nets, step=0).backward()

    with torch.no_grad():
        x0_teacher = TrigFlowDenoiser(nets.teacher, objective.options.sigma_data)(x_t, t).double()
        x0_fake = TrigFlowDenoiser(nets.fake_score, objective.options.sigma_data)(x_t, t).double()
    weight = torch.ones(6, 1, dtype=torch.float64)
    if normalizer == "dmd":
        weight = 1 / (x_g.detach().double() - x0_teacher).abs().mean(1, keepdim=True).clamp(min=1e-5)
        assert (weight - 1).abs().max() > 0.1  # the normaliser is not 1 on this batch
    assert (x0_fake - x0_teacher).abs().max() > 1e-3
    torch.testing.assert_close(x_g.grad, (2 / 6 * weight * (x0_fake - x0_teacher)).float())


@pytest.mark.parametrize("law", ["shift", "lognormal", "uniform"])
def test_rcm_dmd_times_follow_the_chosen_law(law):
    nets, objective = ring_rcm(f"objective.dmd_time_distribution={law}")
    teacher = TrigFlowDenoiser(nets.teacher, objective.options.sigma_data)
    torch.manual_seed(3)
    drawn = objective._dmd_times(teacher, 500, "cpu")
    torch.manual_seed(3)
    expected = sample_time(teacher.schedule, 500, law, shift=objective.options.dmd_time_shift)
    torch.testing.assert_close(drawn, teacher.clamp_time(expected))


@pytest.mark.parametrize("option", ["dmd_time_distribution=bogus", "dmd_normalizer=sid"])
def test_rcm_refuses_unknown_dmd_options(option):
    with pytest.raises(ValueError, match=option.split("=")[0]):
        ring_rcm(f"objective.{option}")
