"""Helpers shared by several test modules: tiny networks built from config, the check that one critic and one
generator step train what they should, LoRA adapters made nonzero, and samples of an exported text-to-image
pipeline served by a Python that never imports fdistill.

Test modules import them as ``from tests.helpers import ...`` (``pythonpath`` in ``pyproject.toml`` puts the
repository root on ``sys.path``), so no test module imports another."""

import json
import os
import subprocess
import sys

import torch

from fdistill.containers import Batch
from fdistill.networks.lora import is_adapter_weight
from fdistill.recipes import load_config
from fdistill.run import build_experiment

# ---------------------------------------------------------------------------------------------------------------
# A tiny RGB UNet teacher (8x8, two blocks, one with attention) and its batches.

TINY_UNET = dict(sample_size=8, in_channels=3, out_channels=3, block_out_channels=[8, 16], layers_per_block=1,
                 down_block_types=["DownBlock2D", "AttnDownBlock2D"], up_block_types=["AttnUpBlock2D", "UpBlock2D"],
                 norm_num_groups=4, attention_head_dim=8)

# Consistency students take their sampling times in TrigFlow units.
TRIGFLOW_TIMES = {"scm": ["generator.times=[1.5]"], "rcm": ["generator.times=[1.5]"]}


def tiny_unet_experiment(name, *overrides):
    """``(cfg, (nets, objective))`` of objective ``name`` on the :data:`TINY_UNET` teacher, seeded."""
    overrides = (*TRIGFLOW_TIMES.get(name, []), *overrides)
    cfg, options = load_config(None, ["teacher.kind=unet", f"objective.name={name}", *overrides])
    cfg.teacher.unet = dict(TINY_UNET)
    torch.manual_seed(0)
    return cfg, build_experiment(cfg, options)[:2]


def batches(size=4):
    """Endless unlabelled batches of random images in ``[-1, 1]`` shaped for :data:`TINY_UNET`."""
    while True:
        yield Batch(size=size, real=torch.randn(size, 3, 8, 8).clamp(-1, 1))


def ring_experiment(name, *overrides):
    """``(nets, objective)`` of objective ``name`` on the default analytic ring teacher, seeded."""
    cfg, options = load_config(None, [f"objective.name={name}", *overrides])
    torch.manual_seed(0)
    return build_experiment(cfg, options)[:2]


# ---------------------------------------------------------------------------------------------------------------
# Which networks a training step gave gradients to.


def grads_of(module):
    """The gradients of ``module``'s parameters (none for an absent module)."""
    if module is None:
        return []
    return [p.grad for p in module.parameters()]


def has_grad(module):
    """Whether some parameter of ``module`` has a nonzero gradient."""
    return any(g is not None and torch.count_nonzero(g) > 0 for g in grads_of(module))


def no_grad(module):
    """Whether no parameter of ``module`` has a gradient at all."""
    return all(g is None for g in grads_of(module))


def clear(nets):
    """Drop every gradient of the run's networks."""
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


# ---------------------------------------------------------------------------------------------------------------
# LoRA adapters.


def adapters(net) -> dict[str, torch.nn.Parameter]:
    """The LoRA adapter parameters of ``net`` by name."""
    return {name: p for name, p in net.named_parameters() if is_adapter_weight(name)}


@torch.no_grad()
def randomise_adapters(net, seed=0):
    """Nonzero adapters (peft starts the B matrices at zero, where the network is the teacher)."""
    g = torch.Generator().manual_seed(seed)
    for p in adapters(net).values():
        p.copy_(0.1 * torch.randn(p.shape, generator=g))


# ---------------------------------------------------------------------------------------------------------------
# Latent text-to-image pipelines, and their exports served with no fdistill import.


def text_experiment(pipeline, name, *overrides):
    """The experiment of objective ``name`` on the text-to-image pipeline directory ``pipeline``: captioned-shapes
    prompts, teacher guidance 2, batch 4, seeded."""
    cfg, options = load_config(None, [
        "teacher.kind=pretrained", f"teacher.pretrained={pipeline}", "data.kind=captioned_shapes",
        "teacher.guidance_scale=2.0", "train.batch_size=4", f"objective.name={name}",
        *TRIGFLOW_TIMES.get(name, []), *overrides])
    torch.manual_seed(0)
    return cfg, build_experiment(cfg, options)

PROMPTS = ["a red circle at the top left", "a green square at the bottom right"]

EXPORT_CHECK = r"""
import json, sys, torch
from diffusers import DiffusionPipeline
info = json.load(open(sys.argv[1] + "/fdistill.json"))
pipe = DiffusionPipeline.from_pretrained(sys.argv[1], **info["load_kwargs"])
out = {"classes": [type(pipe).__name__, type(pipe.scheduler).__name__]}
for k in range(1, min(2, len(info["steps"])) + 1):
    call = {**info["call"], info["step_argument"]: info["steps"][:k]}
    images = pipe(prompt=json.loads(sys.argv[2]), output_type="pt", generator=torch.Generator().manual_seed(3),
                  **call).images
    out[k] = images.tolist()
assert "fdistill" not in sys.modules
print(json.dumps(out))
"""


def exported_samples(out, tmp_path) -> dict:
    """The export's samples for PROMPTS at 1 and 2 steps (seed 3) through its own ``fdistill.json`` call, from a
    Python that never imports fdistill, and the classes of its pipeline and scheduler (``"classes"``)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", EXPORT_CHECK, str(out), json.dumps(PROMPTS)],
                            capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    served = json.loads(result.stdout.strip().splitlines()[-1])
    return {"classes": served.pop("classes"), **{int(k): torch.tensor(v) for k, v in served.items()}}


def student_images(student, task, k):
    """The student's ``k``-step images for PROMPTS (seed 3), decoded to ``[0, 1]`` as the exported pipeline
    returns them."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        latents = student.sample(student.noise(2, generator=g), task.parts.embed(PROMPTS), k, generator=g)
        return (task.parts.decode(latents) / 2 + 0.5).clamp(0, 1)


LORA_CHECK = r"""
import json, sys, torch
from diffusers import DiffusionPipeline, LCMScheduler
teacher, export, prompts, weight_name, scale = sys.argv[1:6]
prompts = json.loads(prompts)
info = json.load(open(export + "/fdistill.json"))
pipe = DiffusionPipeline.from_pretrained(teacher)
pipe.load_lora_weights(export + "/lora", weight_name=weight_name)
pipe.scheduler = LCMScheduler.from_pretrained(export + "/lora", subfolder="scheduler")
call = {**info["call"], info["step_argument"]: info["steps"][:1], scale: {"scale": 1.0}}
images = pipe(prompt=prompts, output_type="pt", generator=torch.Generator().manual_seed(3), **call)
assert "fdistill" not in sys.modules
print(json.dumps(images.images.tolist()))
"""


def served_by_the_teacher_with_lora(teacher, export, prompts: list[str], weight_name: str, scale: str) -> torch.Tensor:
    """One-step images (seed 3) of the teacher's stock pipeline with the export's LoRA file ``weight_name`` in
    ``lora/`` loaded and the export's LCM scheduler and call, the LoRA scale passed as ``scale``, from a Python that
    never imports fdistill."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", LORA_CHECK, str(teacher), str(export), json.dumps(prompts),
                             weight_name, scale], capture_output=True, text=True, env=env, cwd=export.parent,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return torch.tensor(json.loads(result.stdout.strip().splitlines()[-1]))
