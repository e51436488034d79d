"""Which teacher blocks the discriminator reads (objective.discriminator_features), and per-network learning
rates (critic_optim.lr_by_network), on a tiny UNet teacher built from config."""

import copy

import pytest
import torch

import fdistill.objectives.dmd as dmd
from fdistill.errors import ConfigError
from fdistill.networks.denoisers import UNetDenoiser, unet_blocks
from fdistill.recipes import load_config
from fdistill.run import build_experiment
from fdistill.training.trainer import Trainer
from tests.helpers import TINY_UNET, batches, check_one_critic_and_one_generator_step, tiny_unet_experiment

X, T = torch.randn(2, 3, 8, 8), torch.full((2,), 500.0, dtype=torch.float64)


def block_outputs(unet, x, t):
    """Every block's output, recorded by hooks of this test's own (the down blocks' first return value)."""
    outputs, handles = {}, []
    for name, block in unet_blocks(unet).items():
        def record(_m, _i, out, name=name):
            outputs[name] = out[0] if isinstance(out, tuple) else out
        handles.append(block.register_forward_hook(record))
    unet(x, t.float())
    for h in handles:
        h.remove()
    return outputs


def test_the_features_are_the_outputs_of_the_named_blocks_in_the_order_given():
    _, (nets, _) = tiny_unet_experiment("dmd", "objective.gan_weight=0.01",
                                        "objective.discriminator_features=[up.1,down.0,mid]")
    teacher = nets.teacher
    _, features = teacher.forward_with_features(X, T)
    expected = block_outputs(copy.deepcopy(teacher.unet), X, T)
    assert [f.shape for f in features] == [expected[n].shape for n in ("up.1", "down.0", "mid")]
    for got, name in zip(features, ("up.1", "down.0", "mid"), strict=True):
        torch.testing.assert_close(got, expected[name], rtol=0, atol=0)
    assert len(nets.discriminator.heads) == 3
    assert nets.discriminator(features).shape == (2, 3)


def test_the_default_features_are_the_mid_block():
    _, (nets, _) = tiny_unet_experiment("dmd", "objective.gan_weight=0.01")
    _, features = nets.teacher.forward_with_features(X, T)
    assert nets.teacher.feature_blocks == ["mid"]
    torch.testing.assert_close(features[0], block_outputs(copy.deepcopy(nets.teacher.unet), X, T)["mid"])


@pytest.mark.parametrize("blocks", [["mid"], ["up.0", "down.0"], ["up.1"]])
def test_a_features_only_pass_stops_at_the_last_feature_block(blocks):
    """Without gradient recording, ``features`` gives what ``forward_with_features`` does and runs no block after
    the last feature block (a guided teacher reads the conditional pass alone)."""
    _, (nets, _) = tiny_unet_experiment("dmd", "objective.gan_weight=0.01",
                                        f"objective.discriminator_features=[{','.join(blocks)}]")
    teacher, ran = nets.teacher, []
    order = list(unet_blocks(teacher.unet))
    handles = [block.register_forward_pre_hook(lambda *_, name=name: ran.append(name))
               for name, block in unet_blocks(teacher.unet).items()]
    with torch.no_grad():
        expected = teacher.forward_with_features(X, T)[1]
        ran.clear()
        got = teacher.features(X, T)
    for h in handles:
        h.remove()
    last = max(order.index(name) for name in blocks)
    assert ran == order[:last + 1]
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=0, atol=0)
    assert teacher._features is None and not teacher._stop_at_features


def test_a_copy_of_a_reading_unet_feeds_only_itself():
    _, (nets, _) = tiny_unet_experiment("dmd", "objective.gan_weight=0.01",
                                        "objective.discriminator_features=[down.0,up.0]")
    copied = UNetDenoiser(copy.deepcopy(nets.teacher.unet), nets.teacher.schedule, nets.teacher.prediction_type)
    copied(X, T)
    assert nets.teacher._features is None
    assert copied.feature_blocks == ["mid"] and len(copied.forward_with_features(X, T)[1]) == 1
    assert len(nets.teacher.forward_with_features(X, T)[1]) == 2


def test_objectives_train_with_several_feature_heads():
    cfg, (nets, objective) = tiny_unet_experiment("f_distill", "objective.discriminator_features=[down.0,up.1]")
    check_one_critic_and_one_generator_step(Trainer(nets, objective, batches(), cfg, progress=False), "f_distill")


@pytest.mark.parametrize("overrides, message", [
    (["objective.name=f_distill", "objective.discriminator_features=[down.7]"], "unknown UNet block 'down.7'"),
    (["objective.name=dmd", "objective.discriminator_features=[mid]"], "give objective.gan_weight > 0"),
    (["objective.name=sid", "objective.gan_weight=0.01", "objective.discriminator_features=[mid]"],
     "objective.discriminator=separate"),
    (["objective.name=f_distill", "objective.discriminator_features=[]"], "at least one UNet block"),
])
def test_bad_feature_choices_are_refused(overrides, message):
    cfg, options = load_config(None, ["teacher.kind=unet", *overrides])
    cfg.teacher.unet = dict(TINY_UNET)
    with pytest.raises(ConfigError, match=message):
        build_experiment(cfg, options)


def test_analytic_teachers_have_no_blocks_to_choose():
    cfg, options = load_config(None, ["teacher.kind=ring", "objective.name=f_distill",
                                      "objective.discriminator_features=[mid]"])
    with pytest.raises(ConfigError, match="no blocks to choose"):
        build_experiment(cfg, options)


def test_lr_by_network_gives_that_network_its_own_learning_rate():
    cfg, (nets, objective) = tiny_unet_experiment("f_distill", "critic_optim.lr=0.0001",
                                                  "critic_optim.lr_by_network.discriminator=0.003")
    trainer = Trainer(nets, objective, batches(), cfg, progress=False)
    groups = trainer.optimizers["critic"].param_groups
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    assert {lr_of[id(p)] for p in nets.discriminator.parameters()} == {0.003}
    assert {lr_of[id(p)] for p in nets.fake_score.parameters()} == {0.0001}
    # one Adam step moves each parameter by about its learning rate (Adam's first step is lr * sign(grad))
    before = {n: [p.detach().clone() for p in getattr(nets, n).parameters()] for n in ("discriminator", "fake_score")}
    step = next(s for s in range(10) if objective.step_kind(s) == "critic")
    for s in range(step + 1):
        trainer.train_step(s)
    for name, lr in (("discriminator", 0.003), ("fake_score", 0.0001)):
        moved = torch.cat([(p.detach() - b).abs().flatten()
                           for p, b in zip(getattr(nets, name).parameters(), before[name], strict=True)])
        assert moved.max().item() == pytest.approx(lr, rel=0.05), name


def test_lr_by_network_refuses_a_network_the_optimizer_does_not_train():
    cfg, (nets, objective) = tiny_unet_experiment("f_distill", "student_optim.lr_by_network.discriminator=0.003")
    with pytest.raises(ConfigError, match="student_optim.lr_by_network names discriminator"):
        Trainer(nets, objective, batches(), cfg, progress=False)


@pytest.mark.parametrize("law", [None, "lognormal"])
def test_the_discriminator_trains_on_its_own_time_law(monkeypatch, law):
    """The critic step noises the discriminator's real and student inputs at times drawn from
    ``discriminator_time_distribution`` (the generator's law when unset); the fake score keeps the generator's."""
    own_law = [] if law is None else [f"objective.discriminator_time_distribution={law}"]
    overrides = ["objective.gan_weight=0.01", *own_law]
    cfg, (nets, objective) = tiny_unet_experiment("dmd", *overrides)
    drawn = []
    real_sample_time = dmd.sample_time

    def recording_sample_time(schedule, n, kind, **kw):
        t = real_sample_time(schedule, n, kind, **kw)
        drawn.append((kind, t))
        return t

    monkeypatch.setattr(dmd, "sample_time", recording_sample_time)
    seen = []
    features = nets.teacher.features
    monkeypatch.setattr(nets.teacher, "features", lambda x, t, cond=None: seen.append(t) or features(x, t, cond))
    objective.critic_loss(next(batches()), nets, 0)
    expected = law or "polynomial"
    assert [kind for kind, _ in drawn] == (["polynomial"] if law is None else ["polynomial", law]) + [expected]
    assert len(seen) == 2
    for t in seen:  # the discriminator's inputs: the same tensors the law produced
        assert any(kind == expected and t is drawn_t for kind, drawn_t in drawn)


def test_an_unknown_time_law_is_refused_before_training():
    cfg, options = load_config(None, ["teacher.kind=unet", "objective.name=f_distill",
                                      "objective.discriminator_time_distribution=lognormall"])
    cfg.teacher.unet = dict(TINY_UNET)
    with pytest.raises(ConfigError, match="discriminator_time_distribution='lognormall' is unknown"):
        build_experiment(cfg, options)
