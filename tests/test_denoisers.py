import torch

from fdistill.networks.denoisers import GaussianMixtureDenoiser, MLPDenoiser, UNetDenoiser, ring_mixture
from fdistill.schedules import DiscreteVPSchedule, EDMSchedule, TrigFlowSchedule, VPSchedule, from_x0


def small_mixture(schedule):
    return GaussianMixtureDenoiser([0.3, 0.7], [[-1.5, 0.5], [1.0, -0.2]], [[0.2, 0.1], [0.5, 0.3]], schedule)


def monte_carlo_posterior_mean(mix, x_t, t, n=400_000):
    """E[x0 | x_t] by importance weighting prior samples with the Gaussian likelihood of x_t."""
    torch.manual_seed(0)
    x0, _ = mix.sample(n)
    a, s = float(mix.schedule.alpha(t)), float(mix.schedule.sigma(t))
    logw = -((x_t[None] - a * x0.double()) ** 2).sum(1) / (2 * s**2)
    w = torch.softmax(logw, 0)
    return (w[:, None] * x0.double()).sum(0)


def test_mixture_denoiser_is_the_posterior_mean_under_several_schedules():
    for schedule, t in [(EDMSchedule(), 0.8), (VPSchedule(), 0.4), (TrigFlowSchedule(0.5), 1.0)]:
        mix = small_mixture(schedule)
        x_t = torch.tensor([0.3, -0.1], dtype=torch.float64)
        exact = mix(x_t[None].float(), torch.tensor([t])).double()[0]
        mc = monte_carlo_posterior_mean(mix, x_t, torch.tensor(t))
        assert torch.allclose(exact, mc, atol=2e-2), (schedule.name, exact, mc)


def test_mixture_score_is_the_gradient_of_its_log_density_and_tweedie_holds():
    mix = small_mixture(EDMSchedule())
    x = torch.randn(5, 2, dtype=torch.float64, requires_grad=True)
    t = torch.full((5,), 0.7, dtype=torch.float64)
    (grad,) = torch.autograd.grad(mix.log_prob(x, t).sum(), x)
    assert torch.allclose(mix.score(x, t), grad, atol=1e-10)
    x0 = mix.forward_with_features(x.detach(), t)[0]
    # Tweedie: x0 = (x + sigma^2 score) / alpha, float32 output
    assert torch.allclose(x0.double(), x.detach() + 0.49 * mix.score(x.detach(), t), atol=1e-6)


def test_ring_mixture_parameters():
    p = ring_mixture(8, 2.0, 0.1, [0.3, 0.2, 0.15, 0.1, 0.08, 0.07, 0.07, 0.03])
    assert p["means"].shape == (8, 2)
    assert torch.allclose(p["means"].norm(dim=1), torch.full((8,), 2.0, dtype=torch.float64))


def test_mlp_denoiser_preconditioning_limits():
    """At tiny noise D(x) ~ x (c_skip -> 1, c_out -> 0) whatever the network outputs."""
    net = MLPDenoiser(2, EDMSchedule(), hidden=16, depth=2)
    x = torch.randn(4, 2)
    out = net(x, torch.full((4,), 1e-4, dtype=torch.float64))
    assert torch.allclose(out, x, atol=1e-3)


def test_unet_adapter_reads_each_prediction_type_as_x0():
    from diffusers import DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16),
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       layers_per_block=1, norm_num_groups=4)
    sched = DiscreteVPSchedule.from_diffusers(DDPMScheduler(num_train_timesteps=1000))
    x_t, t = torch.randn(2, 3, 8, 8), torch.tensor([10.0, 700.0], dtype=torch.float64)
    raw = unet(x_t, t.float()).sample.double()
    a, s = sched.coefficients(t, x_t)
    expected = {"epsilon": (x_t - s * raw) / a, "v_prediction": a * x_t - s * raw, "sample": raw}
    for kind, want in expected.items():
        x0, features = UNetDenoiser(unet, sched, kind).forward_with_features(x_t, t)
        assert torch.allclose(x0.double(), want.float().double(), atol=1e-4), kind
        assert len(features) == 1 and features[0].shape[0] == 2
    # and the eps-conversion of an x0 prediction inverts
    eps = from_x0(expected["sample"], "eps", x_t, a, s)
    assert torch.allclose((x_t - s * eps) / a, expected["sample"], atol=1e-5)


def test_guidance_uses_the_null_class_of_a_class_conditional_unet():
    from diffusers import DDPMScheduler, UNet2DModel

    from fdistill.networks.guidance import GuidedDenoiser

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       layers_per_block=1, norm_num_groups=4, num_class_embeds=11)
    teacher = UNetDenoiser(unet, DiscreteVPSchedule.from_diffusers(DDPMScheduler()), "v_prediction")
    x_t, t, labels = torch.randn(3, 1, 8, 8), torch.full((3,), 500.0, dtype=torch.float64), torch.tensor([0, 4, 9])
    assert torch.equal(teacher.null_condition(labels), torch.full((3,), 10))
    cond, uncond = teacher(x_t, t, labels), teacher(x_t, t, torch.full((3,), 10))
    guided = GuidedDenoiser(teacher, 3.0)(x_t, t, labels)
    assert torch.allclose(guided, uncond + 3.0 * (cond - uncond), atol=1e-5)
    # inside the interval [400, 600] guided, outside it the conditional prediction alone
    t_mixed = torch.tensor([500.0, 700.0, 300.0], dtype=torch.float64)
    mixed = GuidedDenoiser(teacher, 3.0, interval=(400.0, 600.0))(x_t, t_mixed, labels)
    full, plain = GuidedDenoiser(teacher, 3.0)(x_t, t_mixed, labels), teacher(x_t, t_mixed, labels)
    assert torch.equal(mixed[0], full[0]) and torch.equal(mixed[1:], plain[1:])
