"""f-distill against closed forms (docs/objectives.md §4, §13.2-§13.4, §13.11)."""

import numpy as np
import pytest
import torch
from numpy.polynomial.hermite_e import hermegauss

from fdistill.containers import Batch
from fdistill.networks.denoisers import GaussianMixtureDenoiser
from fdistill.objectives import common
from fdistill.objectives.common import DIVERGENCES, get_divergence
from fdistill.objectives.dmd import pseudo_gradient_loss
from fdistill.objectives.f_distill import normalize_to_mean_one
from fdistill.recipes import load_config
from fdistill.run import build_experiment
from fdistill.schedules import EDMSchedule

SIGMA = 0.8
TEACHER = dict(weights=[0.3, 0.7], means=[[-1.5], [1.0]], variances=[[0.2], [0.5]])
# The f of docs/objectives.md §4.2 written out in numpy (r = p/q; alpha-divergence with a = 1/2), for a reference
# that shares nothing with fdistill but the set-up.
NUMPY_F = {
    "rkl": lambda r: -np.log(r),
    "kl": lambda r: r * np.log(r),
    "js": lambda r: r * np.log(r) - (r + 1) * np.log((r + 1) / 2),
    "sf": lambda r: (r + 1) * np.log((r + 1) / (2 * r)),
    "sh": lambda r: (np.sqrt(r) - 1) ** 2,
    "jf": lambda r: (r - 1) * np.log(r),
    "pearson": lambda r: (r - 1) ** 2,
    "neyman": lambda r: (1 - r) ** 2 / r,
    "alpha": lambda r: (r**0.5 - 0.5 * r - 0.5) / (0.5 * (0.5 - 1)),
}


def quadrature(n=60):
    nodes, w = hermegauss(n)
    return torch.tensor(nodes), torch.tensor(w / w.sum())


def student_density(mu, s):
    return GaussianMixtureDenoiser([1.0], [[float(mu)]], [[float(s) ** 2]], EDMSchedule())


def f_divergence(theta, div, teacher):
    """D_f(p_t || q_t) = E_{q_t} f(p_t/q_t) by quadrature over q_t = N(mu, s^2 + sigma^2)."""
    mu, s = theta
    n, w = quadrature(80)
    x = (mu + np.sqrt(s**2 + SIGMA**2) * n)[:, None]
    t = torch.full((len(x),), SIGMA, dtype=torch.float64)
    r = torch.exp(teacher.log_prob(x, t) - student_density(mu, s).log_prob(x, t))
    return float((w * div.f(r)).sum())


def pathwise_gradient(theta, div, teacher):
    """Autograd through the shipped pseudo-gradient loss with g = h(r) (s_q - s_p) at each quadrature node."""
    mu = torch.tensor(theta[0], dtype=torch.float64, requires_grad=True)
    s = torch.tensor(theta[1], dtype=torch.float64, requires_grad=True)
    n, w = quadrature(60)
    Z, E = torch.meshgrid(n, n, indexing="ij")
    W = torch.outer(w, w).reshape(-1)
    x_g = (mu + s * Z.reshape(-1))[:, None]
    t = torch.full((len(x_g),), SIGMA, dtype=torch.float64)
    x_t = x_g + SIGMA * E.reshape(-1)[:, None]
    fake = student_density(theta[0], theta[1])
    with torch.no_grad():
        x0_p, x0_q = teacher(x_t, t), fake(x_t, t)
        r = torch.exp(teacher.log_prob(x_t, t) - fake.log_prob(x_t, t))
    # score units: s_q - s_p = (alpha/sigma^2)(x0_q - x0_p); quadrature weights enter as per-sample weights
    weight = div.h(r) * W * len(W) / SIGMA**2
    g = weight[:, None] * (x0_q - x0_p)
    loss = pseudo_gradient_loss(x_g, g)
    return torch.stack(torch.autograd.grad(loss.double(), (mu, s))).numpy()


@pytest.mark.parametrize("name", sorted(DIVERGENCES) + ["alpha"])
def test_pathwise_f_gradient_equals_finite_difference_of_the_divergence(name):
    div = get_divergence(name, alpha=0.5)
    teacher = GaussianMixtureDenoiser(**TEACHER, schedule=EDMSchedule())
    theta, h = np.array([0.4, 0.9]), 1e-5
    fd = [(f_divergence(theta + e, div, teacher) - f_divergence(theta - e, div, teacher)) / (2 * h)
          for e in np.eye(2) * h]
    assert np.allclose(pathwise_gradient(theta, div, teacher), fd, atol=2e-6, rtol=1e-4)


def numpy_divergence_gradient(theta, f, h=1e-5):
    """Reference (docs/objectives.md §13.4) in plain numpy: central difference (step h) of
    ``D_f(p_t || q_t) = E_{q_t} f(p_t/q_t)``, 120-node Gauss-Hermite over ``x ~ q_t = N(mu, s^2 + sigma^2)``,
    with ``p_t = sum_k w_k N(m_k, v_k + sigma^2)`` written out."""
    nodes, w = hermegauss(120)
    weights, means, variances = (np.ravel(TEACHER[k]) for k in ("weights", "means", "variances"))

    def divergence(mu, s):
        x, var = mu + np.sqrt(s**2 + SIGMA**2) * nodes, variances + SIGMA**2
        p = (weights * np.exp(-((x[:, None] - means) ** 2) / (2 * var)) / np.sqrt(2 * np.pi * var)).sum(1)
        q = np.exp(-((x - mu) ** 2) / (2 * (s**2 + SIGMA**2))) / np.sqrt(2 * np.pi * (s**2 + SIGMA**2))
        return np.sum(w / w.sum() * f(p / q))

    return np.array([(divergence(*(theta + e)) - divergence(*(theta - e))) / (2 * h) for e in np.eye(2) * h])


@pytest.mark.parametrize("name", sorted(NUMPY_F))
def test_pathwise_gradient_matches_an_independent_numpy_reference(name):
    """Shipped densities, f, h and loss against the numpy reference; at theta = (0.4, 0.9) the RKL pair is
    (0.0085047, -0.2628069), (0.00850, -0.26281) in the table of docs/objectives.md §13.4."""
    teacher = GaussianMixtureDenoiser(**TEACHER, schedule=EDMSchedule())
    theta = np.array([0.4, 0.9])
    grad = pathwise_gradient(theta, get_divergence(name, alpha=0.5), teacher)
    assert np.allclose(grad, numpy_divergence_gradient(theta, NUMPY_F[name]), atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", sorted(DIVERGENCES))
def test_h_is_r_squared_f_second_derivative(name):
    div = get_divergence(name)
    r = torch.tensor([0.3, 1.0, 2.5], dtype=torch.float64, requires_grad=True)
    (df,) = torch.autograd.grad(div.f(r).sum(), r, create_graph=True)
    (d2f,) = torch.autograd.grad(df.sum(), r, create_graph=True)
    assert torch.allclose(div.h(r), r**2 * d2f, atol=1e-10)
    r, e = r.detach(), 1e-5
    assert torch.allclose(div.dh(r), (div.h(r + e) - div.h(r - e)) / (2 * e), atol=1e-7)
    assert torch.allclose(div.d2h(r), (div.dh(r + e) - div.dh(r - e)) / (2 * e), atol=1e-6)


def test_h_at_one_matches_table():
    table = {"rkl": 1, "kl": 1, "js": 0.5, "sf": 0.5, "sh": 0.5, "jf": 2, "pearson": 2, "neyman": 2}
    for name, value in table.items():
        assert float(get_divergence(name).h(torch.tensor(1.0))) == pytest.approx(value)


def test_pseudo_gradient_trick_gives_g():
    x = torch.randn(4, 3, requires_grad=True)
    g = torch.randn(4, 3)
    (grad,) = torch.autograd.grad(pseudo_gradient_loss(x, g), x)
    assert torch.allclose(grad * x.numel(), g, atol=1e-6)


def ring_nets(objective_overrides):
    cfg, options = load_config(None, ["model.hidden=32", "model.depth=2", *objective_overrides])
    return build_experiment(cfg, options)[:2]


def generator_loss_with_seed(objective, nets, seed=0):
    torch.manual_seed(seed)
    batch = Batch(size=64, real=nets.teacher.sample(64)[0])
    loss, _ = objective.generator_loss(batch, nets, 0)
    grads = torch.autograd.grad(loss, list(nets.student.parameters()))
    return loss, grads


@pytest.mark.parametrize("divergence", ["js", "kl", "jf", "pearson", "sh"])
def test_f_distill_with_zero_logits_is_dmd(divergence):
    """r = 1 everywhere -> normalised h = 1 -> the f-distill loss and gradient are DMD's (GAN term off)."""
    f_nets, f_obj = ring_nets(["objective.name=f_distill", f"objective.divergence={divergence}"])
    d_nets, d_obj = ring_nets(["objective.name=dmd"])
    d_nets.student.load_state_dict(f_nets.student.state_dict())
    d_nets.fake_score.load_state_dict(f_nets.fake_score.state_dict())
    for p in f_nets.discriminator.parameters():
        torch.nn.init.zeros_(p)
    f_obj.options.gan_weight = 1e-12  # the GAN term only adds a constant-logit term; make it negligible
    lf, gf = generator_loss_with_seed(f_obj, f_nets)
    ld, gd = generator_loss_with_seed(d_obj, d_nets)
    assert torch.allclose(lf, ld, rtol=1e-5)
    for a, b in zip(gf, gd, strict=True):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-8)


def test_dmd_without_normaliser_is_diff_instruct_up_to_the_element_count():
    """objective.normalizer=none: DMD's gradient is (x0_q - x0_p)/(B D), Diff-Instruct's is (x0_q - x0_p)/B; with
    Diff-Instruct's times and student input the student gradients differ by exactly the factor D."""
    d_nets, d_obj = ring_nets(["objective.name=dmd", "objective.normalizer=none",
                               "objective.time_distribution=lognormal", "generator.times=[1.0]"])
    i_nets, i_obj = ring_nets(["objective.name=diff_instruct"])
    assert i_nets.student.times == d_nets.student.times == [1.0]
    i_nets.student.load_state_dict(d_nets.student.state_dict())
    i_nets.fake_score.load_state_dict(d_nets.fake_score.state_dict())
    _, gd = generator_loss_with_seed(d_obj, d_nets)
    _, gi = generator_loss_with_seed(i_obj, i_nets)
    dim = d_nets.teacher.sample_shape[0]
    assert any(float(g.abs().max()) > 0 for g in gi)
    for a, b in zip(gd, gi, strict=True):
        assert torch.allclose(a * dim, b, rtol=1e-4, atol=1e-9)
    # with DMD's normaliser the gradient is not Diff-Instruct's
    n_nets, n_obj = ring_nets(["objective.name=dmd", "objective.time_distribution=lognormal", "generator.times=[1.0]"])
    n_nets.student.load_state_dict(d_nets.student.state_dict())
    n_nets.fake_score.load_state_dict(d_nets.fake_score.state_dict())
    _, gn = generator_loss_with_seed(n_obj, n_nets)
    assert not all(torch.allclose(a * dim, b, rtol=1e-2) for a, b in zip(gn, gi, strict=True))


@pytest.mark.parametrize("overrides, message", [
    (["objective.name=dmd", "objective.normalizer=batch"], "objective.normalizer='batch' is unknown"),
    (["objective.name=diff_instruct", "objective.normalizer=dmd"], "Diff-Instruct has no normaliser"),
])
def test_normalizer_choices_are_checked(overrides, message):
    with pytest.raises(ValueError, match=message):
        ring_nets(overrides)


def test_student_gradient_vanishes_when_fake_score_equals_teacher():
    nets, obj = ring_nets(["objective.name=dmd"])
    nets.fake_score = nets.teacher
    _, grads = generator_loss_with_seed(obj, nets)
    assert all(torch.count_nonzero(g) == 0 for g in grads)
    nets, obj = ring_nets(["objective.name=f_distill", "objective.gan_weight=1e-3"])
    nets.fake_score = nets.teacher
    obj.options.gan_weight = 0.0
    _, grads = generator_loss_with_seed(obj, nets)
    assert all(torch.count_nonzero(g) == 0 for g in grads)


def test_ratio_estimate_clamps_and_bin_normalisation():
    logits = torch.tensor([[-50.0], [0.0], [np.log(3.0)], [50.0]])
    r = common.density_ratio(logits, common.RatioOptions())[0]
    assert torch.allclose(r, torch.tensor([0.1, 1.0, 3.0, 20.0]), rtol=1e-5)
    norm = common.RatioBinNormalizer(0.0, 10.0, num_bins=2, ema_rate=0.5)
    t = torch.tensor([1.0, 2.0, 7.0, 8.0])
    out = norm(torch.tensor([1.0, 3.0, 4.0, 4.0]), t)
    # bins: 0.5*1 + 0.5*2 = 1.5 and 0.5*1 + 0.5*4 = 2.5
    assert torch.allclose(norm.bins, torch.tensor([1.5, 2.5]))
    assert torch.allclose(out, torch.tensor([1 / 1.5, 3 / 1.5, 4 / 2.5, 4 / 2.5]), rtol=1e-5)
    h = normalize_to_mean_one(torch.tensor([1.0, 2.0, 3.0]))
    assert float(h.mean()) == pytest.approx(1.0, rel=1e-5)


def test_ratio_diagnostics_show_whether_the_weight_carries_information():
    """The generator logs the mean and spread of r and of the normalised h(r), and the ratio bins; the critic logs
    the discriminator's accuracy on real and on generated inputs."""
    _, obj = ring_nets(["objective.name=f_distill", "objective.divergence=js", "objective.normalize_ratio=false"])
    r = torch.tensor([0.5, 1.0, 2.0, 4.0])
    h, logs = obj.sample_weight(torch.log(r)[:, None], torch.full((4,), 1.0, dtype=torch.float64))
    js = r / (1 + r)
    assert torch.allclose(h, js / js.mean(), atol=1e-6)
    assert float(logs["ratio_mean"]) == pytest.approx(1.875) and float(logs["ratio_std"]) == pytest.approx(
        float(r.std(correction=0)))
    assert float(logs["h_std"]) == pytest.approx(float((js / js.mean()).std(correction=0)), rel=1e-5)
    assert {f"ratio_bin_{i}" for i in range(10)} <= logs.keys()
    accuracy = common.discriminator_accuracy(torch.tensor([[2.0], [-1.0], [0.5], [3.0]]),
                                             torch.tensor([[-2.0], [-1.0], [1.0], [-0.1]]))
    assert float(accuracy["disc_acc_real"]) == 0.75 and float(accuracy["disc_acc_fake"]) == 0.75


def test_denoising_loss_is_the_weighted_x0_error_on_detached_samples_with_its_noise():
    """The fake score's loss (shared by DMD, f-distill, Diff-Instruct and the SiD family): EDM-weighted mean
    squared x0 error at ``x_t`` built from the returned noise; no gradient reaches the samples."""
    nets, _ = ring_nets(["objective.name=dmd"])
    net, schedule = nets.fake_score, nets.fake_score.schedule
    x0 = torch.randn(16, 2, requires_grad=True)
    t = torch.linspace(0.5, 40.0, 16, dtype=torch.float64)
    torch.manual_seed(3)
    loss, eps, features = common.denoising_loss(net, x0, t, None, "edm")
    x_t = schedule.diffuse(x0.detach(), t, eps)
    err = (net(x_t, t) - x0.detach()).pow(2).mean(1)
    weight = common.fake_score_weight(schedule, t, "edm").float()
    assert torch.allclose(loss, (weight * err).mean(), rtol=1e-6) and len(features) == 1
    assert torch.autograd.grad(loss, x0, allow_unused=True)[0] is None


def test_the_gan_tail_adds_the_weighted_generator_term():
    nets, obj = ring_nets(["objective.name=f_distill", "objective.gan_weight=0.25"])
    torch.manual_seed(0)
    loss, logs = obj.generator_loss(Batch(size=64, real=nets.teacher.sample(64)[0]), nets, 0)
    assert float(loss) == pytest.approx(float(logs["vsd"]) + 0.25 * float(logs["gan"]), rel=1e-6)
