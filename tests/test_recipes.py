"""Each digits recipe builds and takes one critic and one generator step with finite losses
that reach the networks each step trains (configs/digits_<objective>.yaml, docs/images.md "Recipes for every
objective")."""

from pathlib import Path

import pytest
import torch

from fdistill.recipes import load_config
from fdistill.run import build_experiment

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
DIGITS_RECIPES = sorted(p.stem.removeprefix("digits_") for p in CONFIGS.glob("digits_*.yaml")
                        if p.stem not in ("digits_base", "digits_imbalanced"))


def test_there_is_a_digits_recipe_for_every_family():
    assert DIGITS_RECIPES == sorted(["dmd", "f_distill", "diff_instruct", "sid", "sim", "uni_instruct_js",
                                     "uni_instruct_fkl", "scm", "rcm"])


@pytest.mark.parametrize("recipe", DIGITS_RECIPES)
def test_digits_recipe_takes_a_critic_and_a_generator_step(recipe):
    cfg, options = load_config(str(CONFIGS / f"digits_{recipe}.yaml"), ["train.batch_size=4"])
    assert options.name == recipe.removesuffix("_js").removesuffix("_fkl")
    nets, objective, task = build_experiment(cfg, options)
    batch = next(task.batches(objective.needs_real_data))
    if nets.fake_score is not None:  # a fake score that has drifted from the teacher, as after critic updates
        torch.manual_seed(0)
        with torch.no_grad():
            for p in nets.fake_score.parameters():
                p.add_(1e-3 * torch.randn_like(p))
    kinds = {}
    for step in range(12):
        kind = objective.step_kind(step)
        if kind in kinds:
            continue
        trained = nets.student if kind == "generator" else nets.fake_score
        trained.zero_grad(set_to_none=True)
        loss_fn = objective.generator_loss if kind == "generator" else objective.critic_loss
        loss, _ = loss_fn(batch, nets, step)
        loss.backward()
        grads = [p.grad for p in trained.parameters() if p.grad is not None]
        kinds[kind] = bool(torch.isfinite(loss)) and len(grads) > 0 and any(g.abs().sum() > 0 for g in grads)
    assert kinds.get("generator") and all(kinds.values()), kinds
