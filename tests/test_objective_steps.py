"""One critic and one generator step of every registered objective on a tiny UNet teacher built from config."""

import pytest
import torch

from fdistill.containers import Batch
from fdistill.errors import ConfigError
from fdistill.networks.guidance import GuidedDenoiser
from fdistill.objectives import OBJECTIVES
from fdistill.recipes import load_config
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


def check_one_critic_and_one_generator_step(trainer, name):
    """A critic step trains what the objective's critic trains and nothing else; a generator step trains the
    student alone; neither gives a non-finite loss."""
    nets, objective = trainer.nets, trainer.objective
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


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_one_critic_and_one_generator_step(name):
    cfg, (nets, objective) = tiny_unet_experiment(name)
    check_one_critic_and_one_generator_step(Trainer(nets, objective, batches(), cfg, progress=False), name)


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
    assert nets.teacher._features is None
    assert len(nets.teacher.forward_with_features(x, t)[1]) == 1


def label_recorder(unet, seen: list):
    """Record the class labels every call of ``unet`` receives."""
    unet.register_forward_pre_hook(lambda _m, args, kwargs: seen.append(kwargs["class_labels"].clone()),
                                   with_kwargs=True)


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_guidance_reaches_the_teacher_and_never_the_fake_score_or_the_student(name):
    """With ``teacher.guidance_scale`` the teacher also runs on the null class (the last of 5 embeddings), in
    critic and generator steps alike; the student and the fake score only ever see the data's labels."""
    unet = {**TINY_UNET, "num_class_embeds": 5}
    overrides = (*TRIGFLOW_TIMES.get(name, []), "teacher.guidance_scale=3.0")
    cfg, options = load_config(None, ["teacher.kind=unet", f"objective.name={name}", *overrides])
    cfg.teacher.unet = unet
    torch.manual_seed(0)
    nets, objective, _ = build_experiment(cfg, options)
    assert isinstance(nets.teacher, GuidedDenoiser) and nets.teacher.scale == 3.0
    trainable = [m for net in nets.trainable().values() for m in net.modules()]
    assert not any(isinstance(m, GuidedDenoiser) for m in trainable)
    seen = {"teacher": [], "student": [], "fake_score": []}
    label_recorder(nets.teacher.net.unet, seen["teacher"])
    student_unet = next(m for m in nets.student.modules() if type(m).__name__ == "UNet2DModel")
    label_recorder(student_unet, seen["student"])
    if nets.fake_score is not None:
        label_recorder(nets.fake_score.unet, seen["fake_score"])

    def labelled():
        while True:
            yield Batch(size=4, real=torch.randn(4, 3, 8, 8).clamp(-1, 1), cond=torch.tensor([0, 1, 2, 3]))

    trainer = Trainer(nets, objective, labelled(), cfg, progress=False)
    run_until(trainer, "critic")
    run_until(trainer, "generator")
    null = 4
    assert any((labels == null).all() for labels in seen["teacher"]), f"{name}: the teacher was never guided"
    for who in ("student", "fake_score"):
        assert all((labels != null).all() for labels in seen[who]), f"{name}: the {who} saw the null class"
    assert seen["student"], name


def test_guidance_changes_the_teacher_and_needs_a_conditional_one():
    cfg, options = load_config(None, ["teacher.kind=unet", "objective.name=dmd", "teacher.guidance_scale=3.0"])
    cfg.teacher.unet = {**TINY_UNET, "num_class_embeds": 5}
    torch.manual_seed(0)
    nets, _, _ = build_experiment(cfg, options)
    x, t, labels = torch.randn(4, 3, 8, 8), torch.full((4,), 500.0, dtype=torch.float64), torch.tensor([0, 1, 2, 3])
    guided, plain = nets.teacher(x, t, labels), nets.teacher.net(x, t, labels)
    unconditional = nets.teacher.net(x, t, torch.full((4,), 4))
    assert torch.allclose(guided, unconditional + 3.0 * (plain - unconditional), atol=1e-6)
    cfg, options = load_config(None, ["teacher.kind=unet", "objective.name=dmd", "teacher.guidance_scale=3.0"])
    cfg.teacher.unet = dict(TINY_UNET)
    with pytest.raises(ConfigError, match="teacher.guidance_scale=3.0: guidance needs a conditional network"):
        build_experiment(cfg, options)
