"""Score-identity family (Diff-Instruct, SiD, SIM, Uni-Instruct): exact gradients on closed forms, relations
between the methods, and one critic + one generator step of every objective on a tiny UNet teacher.

Closed-form set-up (docs/objectives.md §13.6-§13.7): teacher ``p = 0.3 N(-1.5, 0.2) + 0.7 N(1.0, 0.5)``,
student ``x_g = mu + s z``, VE/EDM noise at sigma = 0.8, expectations over ``(z, eps)`` by 120 x 120
Gauss-Hermite quadrature. The teacher, the fake score (the exact student score, frozen at
``theta_0 = (0.4, 0.9)``) and the density ratio are analytic mixture denoisers evaluated at ``x_t(theta)``, and
the shipped loss functions are called on those tensors. The reference gradients come from a separate numpy
implementation of the same set-up (``numpy_*`` below: densities, scores and objectives written out, central
differences of quadratures), which shares no code with fdistill.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import numpy as np
import pytest
import torch
from numpy.polynomial.hermite_e import hermegauss

from fdistill.containers import Batch
from fdistill.networks.denoisers import GaussianMixtureDenoiser
from fdistill.objectives import OBJECTIVES, build_objective, common, sid, sim, uni_instruct
from fdistill.recipes import load_config
from fdistill.run import build_experiment
from fdistill.schedules import EDMSchedule, sample_time

SIGMA = 0.8
THETA0 = (0.4, 0.9)
WEIGHTS, MEANS, VARIANCES = np.array([0.3, 0.7]), np.array([-1.5, 1.0]), np.array([0.2, 0.5])
TEACHER = GaussianMixtureDenoiser(WEIGHTS.tolist(), MEANS[:, None].tolist(), VARIANCES[:, None].tolist(),
                                  EDMSchedule())
DIVERGENCES = ["rkl", "fkl", "js", "jeffreys", "pearson"]
# The SIM reference of docs/objectives.md §13.6 was computed with a mixture score that leaves out each
# component's 1/sqrt(v_k + sigma^2) factor: the exact score of the same mixture with weights proportional to
# w_k sqrt(v_k + sigma^2). The SIM checks use that teacher, so that they reproduce the document's numbers.
SIM_WEIGHTS = WEIGHTS * np.sqrt(VARIANCES + SIGMA**2)
SIM_TEACHER = GaussianMixtureDenoiser(SIM_WEIGHTS.tolist(), MEANS[:, None].tolist(), VARIANCES[:, None].tolist(),
                                      EDMSchedule())


def _nodes(n=120):
    x, w = hermegauss(n)
    return torch.tensor(x), torch.tensor(w / w.sum())


def _student(mu, s):
    return GaussianMixtureDenoiser([1.0], [[float(mu)]], [[float(s) ** 2]], EDMSchedule())


def _t(n):
    return torch.full((n,), SIGMA, dtype=torch.float64)


def expanded_objective(theta, psi) -> float:
    """``E_{x_t ~ q_theta,t}[psi(r) ||s_q - s_p||^2]`` by 1-D quadrature (the true objective at one t)."""
    nodes, w = _nodes()
    mu, s = theta
    x = (mu + np.sqrt(s**2 + SIGMA**2) * nodes)[:, None]
    student = _student(mu, s)
    r = torch.exp(TEACHER.log_prob(x, _t(len(x))) - student.log_prob(x, _t(len(x))))
    delta = (student.score(x, _t(len(x))) - TEACHER.score(x, _t(len(x))))[:, 0]
    return float((w * psi(r) * delta**2).sum())


def fd_gradient(f, theta, h=1e-5):
    theta = np.asarray(theta, dtype=np.float64)
    return np.array([(f(theta + e) - f(theta - e)) / (2 * h) for e in np.eye(len(theta)) * h])


# ---------------------------------------------------------------------------------------------------
# Independent numpy reference (docs/objectives.md §13 common set-up, §13.6, §13.7).

# psi(r) = r^2 f''(r) and its second derivative, r = p/q (teacher over student): docs/objectives.md §7.3.
NUMPY_PSI = {"rkl": (lambda r: 1 + 0 * r, lambda r: 0 * r), "fkl": (lambda r: r, lambda r: 0 * r),
             "js": (lambda r: r / (1 + r), lambda r: -2 / (1 + r) ** 3),
             "jeffreys": (lambda r: 1 + r, lambda r: 0 * r), "pearson": (lambda r: 2 * r**2, lambda r: 4 + 0 * r)}


def numpy_teacher(x, weights=WEIGHTS):
    """Density and score at noise level sigma of ``sum_k weights_k N(m_k, v_k)`` (weights normalised)."""
    var = VARIANCES + SIGMA**2
    comp = weights / weights.sum() * np.exp(-((x[..., None] - MEANS) ** 2) / (2 * var)) / np.sqrt(2 * np.pi * var)
    return comp.sum(-1), (comp * (MEANS - x[..., None]) / var).sum(-1) / comp.sum(-1)


def numpy_student(x, mu, s):
    """Density and score at noise level sigma of the student ``N(mu, s^2)``."""
    var = s**2 + SIGMA**2
    return np.exp(-((x - mu) ** 2) / (2 * var)) / np.sqrt(2 * np.pi * var), (mu - x) / var


def numpy_line(theta, n=120):
    """1-D Gauss-Hermite nodes for ``x ~ q_theta,t = N(mu, s^2 + sigma^2)`` and their weights."""
    nodes, w = hermegauss(n)
    return theta[0] + np.sqrt(theta[1] ** 2 + SIGMA**2) * nodes, w / w.sum()


def numpy_grid_gradient(per_sample, n=120):
    """Central difference at theta_0 of ``E_{z,eps}[per_sample(x_g, x_t, x_t at theta_0, eps)]``, with
    ``x_g = mu + s z`` and ``x_t = x_g + sigma eps`` on the n x n Gauss-Hermite grid (the surrogate losses)."""
    nodes, w = hermegauss(n)
    z, eps = np.meshgrid(nodes, nodes, indexing="ij")
    w = np.outer(w, w) / w.sum() ** 2
    x_t0 = THETA0[0] + THETA0[1] * z + SIGMA * eps

    def expectation(theta):
        x_g = theta[0] + theta[1] * z
        return np.sum(w * per_sample(x_g, x_g + SIGMA * eps, x_t0, eps))

    return fd_gradient(expectation, THETA0)


@cache
def numpy_true_ui(name):
    """``grad_theta E_{q_theta,t}[psi(r) (s_q - s_p)^2]`` at theta_0 (the exact objective, §13.7)."""
    psi = NUMPY_PSI[name][0]

    def objective(theta):
        x, w = numpy_line(theta)
        (p, s_p), (q, s_q) = numpy_teacher(x), numpy_student(x, *theta)
        return np.sum(w * psi(p / q) * (s_q - s_p) ** 2)

    return fd_gradient(objective, THETA0)


@cache
def numpy_official_ui(name):
    """The official estimator (§7.3): decomposition terms 1 and 3 of §7.2 in score units,
    ``psi(r) (-2 delta.c) + sg(r^2 psi''(r) delta^3) x_t`` with ``delta = s_q - s_p``, ``c = s_q + eps/sigma`` and
    the fake score ``s_q`` frozen at theta_0; ``r`` and the bracket under ``sg`` are taken at theta_0's samples."""
    psi, psi2 = NUMPY_PSI[name]

    def per_sample(x_g, x_t, x_t0, eps):
        (p0, s_p0), (q0, s_q0) = numpy_teacher(x_t0), numpy_student(x_t0, *THETA0)
        r0, s_q = p0 / q0, numpy_student(x_t, *THETA0)[1]
        delta = s_q - numpy_teacher(x_t)[1]
        return psi(r0) * (-2 * delta * (s_q + eps / SIGMA)) + r0**2 * psi2(r0) * (s_q0 - s_p0) ** 3 * x_t

    return numpy_grid_gradient(per_sample)


@cache
def numpy_sid(alpha):
    """``(2/sigma^4) grad E[L_SiD(alpha)]`` (§5, §13.6) with Tweedie x0-predictions of the teacher and of the
    student score frozen at theta_0."""

    def per_sample(x_g, x_t, x_t0, eps):
        x0_p = x_t + SIGMA**2 * numpy_teacher(x_t)[1]
        x0_q = x_t + SIGMA**2 * numpy_student(x_t, *THETA0)[1]
        return 2 / SIGMA**4 * (x0_p - x0_q) * ((x0_p - x_g) - alpha * (x0_p - x0_q))

    return numpy_grid_gradient(per_sample)


@cache
def numpy_sim_true(distance, c_score):
    """``grad_theta E_{x ~ q_theta0,t}[d(s_theta(x) - s_p(x))]`` (§6, §13.6), SIM teacher, d on the score."""
    x, w = numpy_line(THETA0)
    s_p = numpy_teacher(x, SIM_WEIGHTS)[1]
    d = (lambda y: y**2) if distance == "l2" else (lambda y: np.sqrt(y**2 + c_score**2) - c_score)
    return fd_gradient(lambda th: np.sum(w * d(numpy_student(x, *th)[1] - s_p)), THETA0)


class Quadrature:
    """``x_g(theta)`` on the (z, eps) grid and the frozen networks' outputs at ``x_t(theta)`` (with grads)."""

    def __init__(self, teacher=TEACHER, n=120):
        nodes, w = _nodes(n)
        z, e = torch.meshgrid(nodes, nodes, indexing="ij")
        self.z, self.eps, self.w = z.reshape(-1, 1), e.reshape(-1, 1), torch.outer(w, w).reshape(-1)
        self.theta = torch.tensor(THETA0, dtype=torch.float64, requires_grad=True)
        self.x_g = self.theta[0] + self.theta[1] * self.z
        self.x_t = self.x_g + SIGMA * self.eps
        t = _t(len(self.x_t))
        fake = _student(*THETA0)  # frozen fake score = exact student score at theta_0
        self.x0_teacher, self.x0_fake = teacher(self.x_t, t), fake(self.x_t, t)
        self.log_ratio = teacher.log_prob(self.x_t, t) - fake.log_prob(self.x_t, t)  # attached: option A's r
        self.snr2 = torch.full((len(self.x_t),), 1 / SIGMA**2, dtype=torch.float64)
        self.exact_weight = 2 / SIGMA**4  # 2 lambda alpha^2 / sigma^4 with lambda = 1: score-unit surrogate

    def grad(self, per_sample, weight=None):
        weight = self.exact_weight if weight is None else weight
        loss = (self.w * weight * per_sample.double()).sum()
        return torch.autograd.grad(loss, self.theta, retain_graph=True)[0].numpy()


@pytest.fixture(scope="module")
def quad():
    return Quadrature()


@pytest.fixture(scope="module")
def sim_quad():
    return Quadrature(SIM_TEACHER)


def ui_loss(quad, name, estimator="exact", ratio_grad="detached"):
    ratio = torch.exp(quad.log_ratio)
    divergence = common.get_divergence(name)
    return uni_instruct.uni_instruct_loss(quad.x_g, quad.x0_teacher, quad.x0_fake, ratio, divergence, quad.snr2,
                                    estimator, ratio_grad)


@pytest.mark.parametrize("ratio_grad", ["detached", "attached"])
@pytest.mark.parametrize("name", DIVERGENCES)
def test_exact_uni_instruct_gradient_matches_finite_differences(quad, name, ratio_grad):
    psi = common.get_divergence(name).h
    true = fd_gradient(lambda th: expanded_objective(th, psi), THETA0)
    got = quad.grad(ui_loss(quad, name, "exact", ratio_grad))
    assert np.allclose(true, numpy_true_ui(name), rtol=0, atol=1e-8)
    assert np.abs(got - true).max() <= 1e-4 * np.abs(true).max(), (got, true)


@pytest.mark.parametrize("name", DIVERGENCES)
def test_four_term_decomposition_and_the_official_estimator_bias(quad, name):
    terms = uni_instruct.uni_instruct_terms(quad.x_g, quad.x0_teacher, quad.x0_fake, torch.exp(quad.log_ratio),
                                      common.get_divergence(name), quad.snr2)
    parts = {k: quad.grad(v) for k, v in terms.items()}
    assert np.allclose(sum(parts.values()), numpy_true_ui(name), rtol=1e-5, atol=1e-6)
    official = quad.grad(ui_loss(quad, name, "official"))
    assert np.allclose(official, parts["sim"] + parts["di_w1"], atol=1e-10)
    assert np.allclose(official, numpy_official_ui(name), rtol=0, atol=1e-8)


def test_custom_psi_from_python_matches_the_builtin(quad):
    js = uni_instruct.divergence_from_weight(lambda r: r / (1 + r), "my_js")
    ratio = torch.exp(quad.log_ratio)
    got = uni_instruct.uni_instruct_loss(quad.x_g, quad.x0_teacher, quad.x0_fake, ratio, js, quad.snr2)
    assert np.allclose(quad.grad(got), numpy_true_ui("js"), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("alpha", [0.5, 1.0, 1.2])
def test_sid_alpha_gradients(quad, alpha):
    inner, sq = common.score_identity_terms(quad.x_g, quad.x0_teacher, quad.x0_fake)
    got = quad.grad(common.sid_loss(inner, sq, alpha))
    assert np.allclose(got, numpy_sid(alpha), rtol=0, atol=1e-8)
    if alpha == 0.5:  # the exact Fisher gradient (docs/objectives.md §5)
        assert np.allclose(got, numpy_true_ui("rkl"), rtol=1e-5, atol=1e-6)


def test_uni_instruct_rkl_is_sid_half_and_sim_l2_is_sid_one(quad):
    inner, sq = common.score_identity_terms(quad.x_g, quad.x0_teacher, quad.x0_fake)
    for estimator, alpha in [("exact", 0.5), ("official", 1.0)]:
        ui = ui_loss(quad, "rkl", estimator)
        assert torch.allclose(ui, common.sid_loss(inner, sq, alpha), atol=1e-6)
        assert np.allclose(quad.grad(ui), quad.grad(common.sid_loss(inner, sq, alpha)), atol=1e-6)
    sim_l2 = sim.sim_loss(inner, sq, "l2")
    assert np.allclose(quad.grad(sim_l2), quad.grad(common.sid_loss(inner, sq, 1.0)), atol=1e-6)


def sim_true_gradient(distance, huber_c_score):
    """``grad_theta E_{x ~ q_theta0,t}[d(s_theta(x) - s_p(x))]``: the SIM objective with the sampling
    distribution held fixed (docs/objectives.md §13.6); ``d`` acts on the score difference."""
    nodes, w = _nodes()
    x = (THETA0[0] + np.sqrt(THETA0[1] ** 2 + SIGMA**2) * nodes)[:, None]
    s_p = SIM_TEACHER.score(x, _t(len(x)))[:, 0]

    def objective(theta):
        y = _student(*theta).score(x, _t(len(x)))[:, 0] - s_p
        d = y**2 if distance == "l2" else torch.sqrt(y**2 + huber_c_score**2) - huber_c_score
        return float((w * d).sum())

    return fd_gradient(objective, THETA0)


@pytest.mark.parametrize("distance", ["l2", "pseudo_huber"])
def test_sim_gradient_flows_through_u(sim_quad, distance):
    quad = sim_quad
    c_score = 2.0  # §13.6's constant on the score difference; on Delta it is c sigma^2 / alpha
    c_x0 = c_score * SIGMA**2
    # l2: d(y) = y^2 is 2 alpha^2/sigma^4 x the x0 distance 1/2 Delta^2; pseudo-Huber: alpha/sigma^2
    weight = quad.exact_weight if distance == "l2" else 1 / SIGMA**2
    inner, sq = common.score_identity_terms(quad.x_g, quad.x0_teacher, quad.x0_fake)
    got = quad.grad(sim.sim_loss(inner, sq, distance, c_x0), weight)
    true = sim_true_gradient(distance, c_score)
    assert np.allclose(true, numpy_sim_true(distance, c_score), rtol=0, atol=1e-8)
    assert np.abs(got - true).max() <= 1e-4 * np.abs(true).max(), (got, true)
    # Detaching u = grad d keeps the mean component but halves the scale component: the wrong gradient.
    delta = (quad.x0_fake - quad.x0_teacher).detach()
    u = delta if distance == "l2" else delta / torch.sqrt(delta**2 + c_x0**2)
    detached = quad.grad((-u * (quad.x0_fake - quad.x_g)).sum(1), weight)
    assert abs(detached[0] - true[0]) < 1e-4 * abs(true).max()
    assert abs(detached[1] / true[1] - 0.5) < 1e-3


@pytest.mark.parametrize("name, expected", [("rkl", 0.5), ("fkl", 1.0), ("js", 0.75), ("jeffreys", 0.75),
                                            ("pearson", 1.5)])
def test_alpha_eff_at_ratio_one(quad, name, expected):
    div = common.get_divergence(name)
    one = torch.ones(len(quad.x_g), dtype=torch.float64)
    assert torch.allclose(uni_instruct.alpha_eff(div, one), torch.full_like(one, expected))
    # With r = 1 the psi-weighted SIM + FGM terms are psi(1) * SiD(alpha_eff(1)).
    terms = uni_instruct.uni_instruct_terms(quad.x_g, quad.x0_teacher, quad.x0_fake, one, div, quad.snr2)
    inner, sq = common.score_identity_terms(quad.x_g, quad.x0_teacher, quad.x0_fake)
    assert torch.allclose(terms["sim"] + terms["fgm"], div.h(one) * common.sid_loss(inner, sq, expected))


def test_ratio_gradient_clip_and_mask(quad):
    """``ratio_grad_clip`` bounds each ratio-gradient force on ``x_g`` by ``clip |Delta|``; a zero
    ``ratio_grad_weight`` (a clamped ratio estimate) removes them; neither touches the SIM and FGM terms."""
    args = (quad.x_g, quad.x0_teacher, quad.x0_fake, torch.exp(quad.log_ratio), common.get_divergence("js"),
            quad.snr2)
    free = uni_instruct.uni_instruct_terms(*args)
    clipped = uni_instruct.uni_instruct_terms(*args, ratio_grad_clip=0.05)
    masked = uni_instruct.uni_instruct_terms(*args, ratio_grad_weight=torch.zeros_like(quad.snr2))
    delta = (quad.x0_fake - quad.x0_teacher).detach().abs()[:, 0]
    for name in ("di_w1", "di_psi"):
        force = torch.autograd.grad(clipped[name].sum(), quad.x_g, retain_graph=True)[0][:, 0].abs()
        unclipped = torch.autograd.grad(free[name].sum(), quad.x_g, retain_graph=True)[0][:, 0].abs()
        assert torch.all(force <= 0.05 * delta + 1e-12) and torch.any(unclipped > 0.05 * delta)
        assert torch.all(masked[name] == 0)
    assert np.allclose(quad.grad(uni_instruct.uni_instruct_terms(*args, ratio_grad_clip=1e9)["di_psi"]),
                       quad.grad(free["di_psi"]))
    for name in ("sim", "fgm"):
        assert torch.equal(clipped[name], free[name]) and torch.equal(masked[name], free[name])


def test_uni_instruct_ratio_estimate_and_its_clamp_mask():
    nets, objective = experiment("uni_instruct", "objective.normalize_ratio=false")
    logits = torch.tensor([-20.0, -3.0, 0.0, 2.0, 3.5, 12.0])[:, None]
    r, in_range = objective.ratio(logits, torch.ones(6))
    assert torch.allclose(r, torch.tensor([0.1, 0.1, 1.0, float(np.exp(2.0)), 20.0, 20.0]))
    assert in_range.tolist() == [0.0, 0.0, 1.0, 1.0, 0.0, 0.0]
    assert not r.requires_grad


# ---------------------------------------------------------------------------------------------------
# The objectives themselves: relations at the objective level (ring teacher), and one critic + one generator
# step on a tiny UNet teacher with the gradient paths checked.

TINY_UNET = dict(sample_size=8, in_channels=1, out_channels=1, block_out_channels=[8, 16], layers_per_block=1,
                 down_block_types=["DownBlock2D", "DownBlock2D"], up_block_types=["UpBlock2D", "UpBlock2D"],
                 norm_num_groups=4)


def experiment(name, *overrides, unet=False):
    kind = ["teacher.kind=unet"] if unet else []
    cfg, options = load_config(None, [f"objective.name={name}", *overrides, *kind])
    if unet:
        cfg.teacher.unet = dict(TINY_UNET)
    nets, objective, _ = build_experiment(cfg, options)
    return nets, objective


def real_batch(nets, size=4):
    shape = nets.teacher.sample_shape
    return Batch(size=size, real=torch.randn(size, *shape).clamp(-1, 1))


def generator_loss_with_seed(objective, nets, batch, step, seed=3):
    torch.manual_seed(seed)
    return objective.generator_loss(batch, nets, step)[0]


@pytest.mark.parametrize("name, overrides, sid_alpha", [
    ("uni_instruct", ["objective.divergence=rkl"], 0.5),
    ("sim", ["objective.distance=l2"], 1.0),
    ("uni_instruct", ["objective.divergence=rkl", "objective.estimator=official"], 1.0),
])
def test_objective_relations_to_sid(name, overrides, sid_alpha):
    nets, objective = experiment(name, "objective.gan_weight=0", *overrides)
    sid = build_objective(OBJECTIVES["sid"][1](alpha=sid_alpha), nets.teacher.schedule)
    batch = real_batch(nets, 64)
    losses = []
    for obj in (objective, sid):
        nets.student.zero_grad(set_to_none=True)
        loss = generator_loss_with_seed(obj, nets, batch, step=1)
        loss.backward()
        losses.append((loss.detach(), [p.grad.clone() for p in nets.student.parameters()]))
    assert float(losses[0][0]) != 0.0
    assert torch.allclose(losses[0][0], losses[1][0], rtol=1e-6, atol=1e-8)
    grads = zip(losses[0][1], losses[1][1], strict=True)
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-8) for a, b in grads)


@pytest.mark.parametrize("name", ["sid", "sim", "uni_instruct"])
def test_normalizer_none_drops_exactly_the_per_sample_normaliser(name, monkeypatch):
    """``objective.normalizer=none`` is the default loss with ``sid_normalizer`` replaced by 1 (docs/objectives.md
    §3.2), and the normaliser is not 1 on this batch."""
    nets, plain = experiment(name, "objective.normalizer=none", "objective.gan_weight=0")
    _, normalised = experiment(name, "objective.gan_weight=0")
    batch = real_batch(nets, 64)
    without = generator_loss_with_seed(plain, nets, batch, step=1)
    with_normaliser = generator_loss_with_seed(normalised, nets, batch, step=1)
    assert not torch.allclose(without, with_normaliser, rtol=1e-3)
    monkeypatch.setattr(sid, "sid_normalizer", lambda x_g, x0, clip: torch.ones(len(x_g)))
    assert torch.allclose(without, generator_loss_with_seed(normalised, nets, batch, step=1), rtol=1e-6)


def test_generator_time_distribution_sets_the_student_loss_times(monkeypatch):
    drawn = []

    def recording_sample_time(schedule, n, kind="uniform", generator=None, **kw):
        drawn.append(kind)
        return sample_time(schedule, n, kind, generator, **kw)

    monkeypatch.setattr(sid, "sample_time", recording_sample_time)
    batch = None
    for law in ("sid", "lognormal"):
        nets, objective = experiment("sid", f"objective.generator_time_distribution={law}")
        batch = batch or real_batch(nets, 8)
        drawn.clear()
        objective.generator_loss(batch, nets, step=1)
        assert drawn == [law]


@pytest.mark.parametrize("name, overrides, message", [
    ("sid", ["objective.normalizer=batch"], "objective.normalizer='batch' is unknown"),
    ("sim", ["objective.generator_time_distribution=logit"],
     "objective.generator_time_distribution='logit' is unknown"),
    ("uni_instruct", ["objective.ratio_grad=attached", "objective.ratio_grad_clip=1.0"],
     "ratio_grad_clip bounds the ratio-gradient terms"),
])
def test_score_identity_option_checks(name, overrides, message):
    with pytest.raises(ValueError, match=message):
        experiment(name, *overrides)


def test_uni_instruct_takes_a_divergence_defined_in_python():
    nets, objective = experiment("uni_instruct", "objective.discriminator=separate")
    custom = type(objective)(objective.options, nets.teacher.schedule, divergence=lambda r: r / (1 + r))
    assert custom.uses_ratio and custom.divergence.name == "custom"
    batch = real_batch(nets, 64)
    torch.manual_seed(0)  # give the ratio some spread: a discriminator that is not at its initial logits
    with torch.no_grad():
        for p in nets.discriminator.parameters():
            p.mul_(3.0)
    losses = [generator_loss_with_seed(obj, nets, batch, step=1) for obj in (objective, custom)]
    assert torch.allclose(losses[0], losses[1], rtol=1e-5)


def test_student_input_time_is_the_sid_sigma():
    nets, _ = experiment("sid")
    assert nets.student.times == [2.5]  # EDM ring: sigma = 2.5
    nets, _ = experiment("diff_instruct")
    assert nets.student.times == [1.0]
    nets, _ = experiment("sid", "generator.times=[80.0,1.0]")
    assert nets.student.times == [80.0, 1.0]


def test_uni_instruct_warmup_is_plain_sid_without_gan():
    nets, objective = experiment("uni_instruct", "objective.warmup_generator_steps=1",
                                 "objective.warmup_alpha=1.0")
    sid = build_objective(OBJECTIVES["sid"][1](alpha=1.0), nets.teacher.schedule)
    batch = real_batch(nets, 64)
    assert objective.step_kind(1) == "generator" and objective.generator_step(1) == 0
    warm = generator_loss_with_seed(objective, nets, batch, 1)
    assert torch.allclose(warm, generator_loss_with_seed(sid, nets, batch, 1))
    torch.manual_seed(3)
    _, logs = objective.generator_loss(batch, nets, 3)  # the second generator step: JS loss plus the GAN term
    assert "gan" in logs and "ratio_mean" in logs


def _set_trainable(nets, names):
    for field in ("student", "fake_score", "discriminator"):
        module = getattr(nets, field)
        if module is not None:
            module.requires_grad_(field in names)


def _grads(module):
    return [] if module is None else [p.grad for p in module.parameters()]


def _record_input(denoiser, store):
    """Route ``x_t`` through an identity copy so that the gradient reaching this network's input shows."""
    inner = denoiser.forward_with_features

    def wrapped(x_t, t, cond=None):
        if x_t.requires_grad:
            x_t = x_t.clone()
            x_t.retain_grad()
            store.append(x_t)
        return inner(x_t, t, cond)

    denoiser.forward_with_features = wrapped


UNET_CASES = [
    ("sid", []),
    ("sim", []),
    ("sim", ["objective.distance=l2"]),
    ("uni_instruct", []),  # JS, shared (SiDA) discriminator, option A (the ratio keeps its gradient)
    ("uni_instruct", ["objective.ratio_grad=detached"]),  # option B: the ratio's gradient from the scores
    ("uni_instruct", ["objective.divergence=fkl", "objective.discriminator=separate",
                      "objective.ratio_grad=attached"]),
    ("uni_instruct", ["objective.divergence=pearson", "objective.estimator=official",
                      "objective.gan_weight=0"]),
    ("diff_instruct", []),
]


@pytest.mark.parametrize("name, overrides", UNET_CASES)
def test_one_critic_and_one_generator_step_on_a_tiny_unet(name, overrides):
    torch.manual_seed(0)
    nets, objective = experiment(name, *overrides, unet=True)
    separate = nets.discriminator is not None
    batch = real_batch(nets)
    # Critic step: the fake score (and the discriminator) get gradients; teacher and student none.
    _set_trainable(nets, objective.critic_trains)
    step = next(s for s in range(10) if objective.step_kind(s) == "critic")
    loss, logs = objective.critic_loss(batch, nets, step)
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(torch.as_tensor(v)) for v in logs.values())
    assert any(g is not None and g.abs().sum() > 0 for g in _grads(nets.fake_score))
    assert all(g is not None for g in _grads(nets.discriminator))
    assert all(g is None for g in _grads(nets.teacher) + _grads(nets.student))
    with torch.no_grad():  # move the fake score off the teacher: at fake = teacher every gradient is zero
        for p in nets.fake_score.parameters():
            p.add_(0.02 * torch.randn_like(p))
    for m in (nets.student, nets.fake_score, nets.discriminator):
        if m is not None:
            m.zero_grad(set_to_none=True)
    # Generator step: only the student gets gradients, some of them through the frozen networks' inputs.
    _set_trainable(nets, objective.generator_trains)
    teacher_inputs, fake_inputs = [], []
    _record_input(nets.teacher, teacher_inputs)
    _record_input(nets.fake_score, fake_inputs)
    step = next(s for s in range(10) if objective.step_kind(s) == "generator")
    loss, logs = objective.generator_loss(batch, nets, step)
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(torch.as_tensor(v)) for v in logs.values())
    assert any(g is not None and g.abs().sum() > 0 for g in _grads(nets.student))
    assert all(g is None for g in _grads(nets.teacher) + _grads(nets.fake_score) + _grads(nets.discriminator))
    if name == "diff_instruct":  # pathwise estimator: the networks are evaluated without input gradient
        assert not teacher_inputs and not fake_inputs
    else:
        for inputs in (teacher_inputs, fake_inputs):
            assert inputs and inputs[0].grad is not None and inputs[0].grad.abs().sum() > 0
    assert separate == (name == "uni_instruct" and "objective.discriminator=separate" in overrides)


RING_CONFIGS = ["ring_diff_instruct", "ring_sid", "ring_sim", "ring_uni_instruct_rkl",
                "ring_uni_instruct_fkl", "ring_uni_instruct_js"]


@pytest.mark.parametrize("name", RING_CONFIGS)
def test_ring_configs_take_a_critic_and_a_generator_step(name):
    root = Path(__file__).resolve().parents[1]
    cfg, options = load_config(str(root / "configs" / f"{name}.yaml"))
    nets, objective, _ = build_experiment(cfg, options)
    batch = real_batch(nets, 32)
    for kind, loss_fn in (("critic", objective.critic_loss), ("generator", objective.generator_loss)):
        step = next(s for s in range(10) if objective.step_kind(s) == kind)
        loss, _ = loss_fn(batch, nets, step)
        assert torch.isfinite(loss)
