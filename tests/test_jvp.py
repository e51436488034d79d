"""JVPs in (x_t, t) through a TrigFlow-wrapped diffusers UNet with attention, against float64 differences."""

import copy

import pytest
import torch
from torch import nn

from fdistill.networks.denoisers import UNetDenoiser
from fdistill.networks.jvp import ReplayRNG, forward_ad_context, time_jvp
from fdistill.networks.trigflow import TrigFlowDenoiser
from fdistill.schedules import VPSchedule

TIMES = torch.tensor([0.4, 0.9, 1.3], dtype=torch.float64)


def tiny_unet():
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=8, in_channels=3, out_channels=3, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8, attention_head_dim=8,
    )


@pytest.fixture(scope="module")
def velocity_nets():
    """``F`` of the same tiny UNet (continuous VP schedule) in float32 and float64, read in TrigFlow."""
    unet = tiny_unet()
    net32 = TrigFlowDenoiser(UNetDenoiser(unet, VPSchedule(), "epsilon"), sigma_data=1.0)
    unet64 = copy.deepcopy(unet).double()
    net64 = TrigFlowDenoiser(UNetDenoiser(unet64, VPSchedule(), "epsilon"), sigma_data=1.0)
    return net32, net64


def directions(x):
    g = torch.Generator().manual_seed(1)
    zeros_t = torch.zeros(len(x), dtype=torch.float64)
    along_x = (torch.randn(x.shape, generator=g), zeros_t)
    return {"x": along_x, "t": (torch.zeros_like(x), torch.ones_like(zeros_t))}


def relative_error(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


@torch.no_grad()
def float64_difference(net64, x, t, dx, dt, h=1e-4):
    x, dx = x.double(), dx.double()
    return (net64.velocity(x + h * dx, t + h * dt) - net64.velocity(x - h * dx, t - h * dt)) / (2 * h)


@pytest.mark.parametrize("direction", ["x", "t"])
def test_exact_jvp_matches_float64_finite_difference(velocity_nets, direction):
    net32, net64 = velocity_nets
    x = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    dx, dt = directions(x)[direction]
    exact = time_jvp(lambda a, s: net32.velocity(a, s), x, TIMES, dx, dt, "exact", module=net32)
    reference = float64_difference(net64, x, TIMES, dx, dt)
    assert reference.norm() > 0
    assert relative_error(exact, reference) <= 1e-3


@pytest.mark.parametrize("direction", ["x", "t"])
def test_exact_and_finite_difference_modes_agree(velocity_nets, direction):
    net32, _ = velocity_nets
    x = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    dx, dt = directions(x)[direction]
    fn = lambda a, s: net32.velocity(a, s)  # noqa: E731
    exact = time_jvp(fn, x, TIMES, dx, dt, "exact", module=net32)
    fd = time_jvp(fn, x, TIMES, dx, dt, "finite_difference", module=net32)
    assert fd.dtype == torch.float64
    assert relative_error(fd, exact) <= 2e-3


def test_modes_share_dropout_masks_with_the_training_forward():
    """With dropout active, both modes replay the caller's RNG state: same masks, same derivative."""
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(3, 64), nn.SiLU(), nn.Dropout(0.5), nn.Linear(64, 2)).double().train()
    fn = lambda x, t: mlp(torch.cat([x, t[:, None]], 1))  # noqa: E731
    x, t = torch.randn(16, 2, dtype=torch.float64), torch.rand(16, dtype=torch.float64) + 0.5
    dx, dt = torch.randn_like(x), torch.ones_like(t)
    replay = ReplayRNG()
    with replay():
        out = fn(x, t)
    exact = time_jvp(fn, x, t, dx, dt, "exact", rng=replay)
    fd = time_jvp(fn, x, t, dx, dt, "finite_difference", rng=replay)
    with replay():
        assert torch.equal(fn(x, t), out)
    assert relative_error(fd, exact) <= 1e-5
    with torch.no_grad():  # without replay the two evaluations draw different masks: a meaningless quotient
        h = 1e-3
        unreplayed = (fn(x + h * dx, t + h * dt) - fn(x - h * dx, t - h * dt)) / (2 * h)
    assert relative_error(unreplayed, exact) > 1


def test_forward_ad_context_is_scoped(velocity_nets):
    net32, _ = velocity_nets
    groupnorms = [m for m in net32.modules() if isinstance(m, nn.GroupNorm)]
    assert groupnorms
    with forward_ad_context(net32):
        assert all(len(m._forward_pre_hooks) == 1 for m in groupnorms)
    assert all(len(m._forward_pre_hooks) == 0 for m in groupnorms)


def test_unknown_mode_is_rejected(velocity_nets):
    with pytest.raises(ValueError, match="finite_difference"):
        time_jvp(lambda a, s: a, torch.zeros(1, 2), TIMES[:1], torch.ones(1, 2), TIMES[:1], "forward")
