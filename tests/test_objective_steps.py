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
from tests.helpers import (
    TINY_UNET,
    TRIGFLOW_TIMES,
    batches,
    check_one_critic_and_one_generator_step,
    has_grad,
    no_grad,
    run_until,
    tiny_unet_experiment,
)


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
