"""One critic and one generator step of every registered objective on a tiny UNet teacher built from config."""

import pytest
import torch

from fdistill.config import load_config
from fdistill.containers import Batch
from fdistill.objectives import OBJECTIVES
from fdistill.run import build_experiment
from fdistill.training.trainer import Trainer

TINY_UNET = dict(sample_size=8, in_channels=3, out_channels=3, block_out_channels=[8, 16], layers_per_block=1,
                 down_block_types=["DownBlock2D", "AttnDownBlock2D"], up_block_types=["AttnUpBlock2D", "UpBlock2D"],
                 norm_num_groups=4, attention_head_dim=8)


# Consistency students take their sampling times in TrigFlow units.
TRIGFLOW_TIMES = {"scm": ["generator.times=[1.5]"], "rcm": ["generator.times=[1.5]"]}


def tiny_unet_experiment(name, *overrides):
    overrides = (*TRIGFLOW_TIMES.get(name, []), *overrides)
    cfg, options = load_config(None, ["teacher.kind=unet", f"objective.name={name}", *overrides])
    cfg.teacher.unet = dict(TINY_UNET)
    torch.manual_seed(0)
    return cfg, build_experiment(cfg, options)[:2]


def batches(size=4):
    while True:
        yield Batch(size=size, real=torch.randn(size, 3, 8, 8).clamp(-1, 1))


def grads_of(module):
    if module is None:
        return []
    return [p.grad for p in module.parameters()]


def has_grad(module):
    return any(g is not None and torch.count_nonzero(g) > 0 for g in grads_of(module))


def no_grad(module):
    return all(g is None for g in grads_of(module))


def clear(nets):
    for m in (nets.teacher, nets.student, nets.fake_score, nets.discriminator):
        if m is not None:
            m.zero_grad(set_to_none=True)


def run_until(trainer, kind, limit=50):
    """Run steps until one of ``kind`` has run; return its logs, or None if the objective has no such step."""
    for step in range(limit):
        clear(trainer.nets)
        if trainer.objective.step_kind(step) == kind:
            return trainer.train_step(step)[1]
        trainer.train_step(step)
    return None


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_one_critic_and_one_generator_step(name):
    cfg, (nets, objective) = tiny_unet_experiment(name)
    trainer = Trainer(nets, objective, batches(), cfg, progress=False)
    critic_logs = run_until(trainer, "critic")
    if critic_logs is not None:
        assert critic_logs["nonfinite_fraction"] == 0.0, critic_logs
        assert no_grad(nets.teacher) and no_grad(nets.student)
        for trained in objective.critic_trains:
            module = getattr(nets, trained)
            assert module is None or has_grad(module), f"{name}: critic step left {trained} without gradient"
    generator_logs = run_until(trainer, "generator")
    assert generator_logs is not None and generator_logs["nonfinite_fraction"] == 0.0, generator_logs
    assert no_grad(nets.teacher) and no_grad(nets.fake_score) and no_grad(nets.discriminator)
    assert has_grad(nets.student), f"{name}: generator step gave the student no gradient"


def test_dmd_with_gan_trains_the_discriminator_in_the_critic_step_only():
    cfg, (nets, objective) = tiny_unet_experiment("dmd", "objective.gan_weight=0.01")
    assert nets.discriminator is not None
    trainer = Trainer(nets, objective, batches(), cfg, progress=False)
    run_until(trainer, "critic")
    assert has_grad(nets.discriminator) and has_grad(nets.fake_score)
    run_until(trainer, "generator")
    assert no_grad(nets.discriminator) and has_grad(nets.student)


def test_generator_step_backpropagates_through_the_frozen_teacher_input():
    """The GAN term reaches the student only through the frozen teacher's features of x_t."""
    cfg, (nets, objective) = tiny_unet_experiment("f_distill", "objective.gan_weight=1.0")
    nets.fake_score = nets.teacher  # VSD term exactly zero: any student gradient comes through the GAN path
    nets.discriminator.requires_grad_(False)
    torch.manual_seed(1)
    loss, logs = objective.generator_loss(next(batches()), nets, 0)
    loss.backward()
    assert float(logs["vsd"]) == 0.0
    assert has_grad(nets.student) and no_grad(nets.teacher) and no_grad(nets.discriminator)


def test_trainable_copies_do_not_feed_the_teacher_feature_list():
    _, (nets, _) = tiny_unet_experiment("dmd")
    x, t = torch.randn(2, 3, 8, 8), torch.full((2,), 500.0, dtype=torch.float64)
    nets.fake_score(x, t)
    nets.student.net(x, t)
    assert nets.teacher._features == []
    assert len(nets.teacher.forward_with_features(x, t)[1]) == 1
