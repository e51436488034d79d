"""Flow-matching transformer teachers on a tiny StableDiffusion3Pipeline built from configs: the velocity is read as
x0 exactly as diffusers' FlowMatchEulerDiscreteScheduler steps, every objective trains on it, LoRA adapts it, and
the export is a stock StableDiffusion3Pipeline that reproduces the student with no fdistill import."""

import json
import os
import subprocess
import sys

import pytest
import torch

from fdistill.commands.sample import pipeline_sampler
from fdistill.data.captions import CAPTION_WORDS
from fdistill.errors import ConfigError
from fdistill.networks.guidance import GuidedDenoiser
from fdistill.networks.lora import is_adapter_weight
from fdistill.objectives import OBJECTIVES
from fdistill.pipelines.transformers import SD3TransformerDenoiser, pack_text_condition, unpack_text_condition
from fdistill.recipes import load_config
from fdistill.run import build_experiment
from fdistill.samplers.flow import FlowMatchSampling
from fdistill.schedules import FlowMatchSchedule, from_x0, to_x0
from fdistill.training.trainer import Trainer
from scripts.word_tokenizers import word_tokenizer
from tests.helpers import (
    PROMPTS,
    TRIGFLOW_TIMES,
    check_one_critic_and_one_generator_step,
    exported_samples,
    randomise_adapters,
    student_images,
)


def tiny_transformer():
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
                                 attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                                 caption_projection_dim=16, pooled_projection_dim=16, pos_embed_max_size=8)


def save_tiny_sd3_pipeline(root, shift=3.0):
    """A StableDiffusion3Pipeline directory: 16x16 RGB images, 8x8x4 latents, two 1-layer CLIPs, no T5."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(0)
    tokenizer = word_tokenizer(CAPTION_WORDS, 12)

    def clip():
        return CLIPTextModelWithProjection(CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
            num_attention_heads=2, max_position_embeddings=12, projection_dim=8, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))

    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
                        up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[8, 8], layers_per_block=1,
                        latent_channels=4, norm_num_groups=4, sample_size=16, shift_factor=0.1, scaling_factor=1.5)
    StableDiffusion3Pipeline(transformer=tiny_transformer(), scheduler=FlowMatchEulerDiscreteScheduler(shift=shift),
                             vae=vae, text_encoder=clip(), tokenizer=tokenizer, text_encoder_2=clip(),
                             tokenizer_2=tokenizer, text_encoder_3=None, tokenizer_3=None).save_pretrained(root)
    return root


@pytest.fixture(scope="module")
def tiny_sd3(tmp_path_factory):
    return save_tiny_sd3_pipeline(tmp_path_factory.mktemp("tiny_sd3"))


def flow_experiment(pipeline, name, *overrides):
    cfg, options = load_config(None, [
        "teacher.kind=pretrained", f"teacher.pretrained={pipeline}", "teacher.max_sequence_length=4",
        "data.kind=captioned_shapes", "teacher.guidance_scale=2.0", "train.batch_size=4", f"objective.name={name}",
        *TRIGFLOW_TIMES.get(name, []), *overrides])
    torch.manual_seed(0)
    return cfg, build_experiment(cfg, options)


def test_velocity_is_read_as_x0_as_the_shifted_scheduler_steps():
    """Each Euler step of diffusers' shifted scheduler equals re-noising fdistill's x0 along its implied noise."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(4)
    schedule = FlowMatchSchedule.from_diffusers(scheduler)
    assert schedule.shift == 3.0 and scheduler.sigmas[1] > 0.75  # shifted: 0.9 rather than 0.75
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 8, 8, generator=g)
    for i, timestep in enumerate(scheduler.timesteps):
        v = torch.randn(x.shape, generator=g)
        stepped = scheduler.step(v, timestep, x).prev_sample
        t, t_next = float(timestep), float(scheduler.sigmas[i + 1]) * 1000
        alpha, sigma = schedule.coefficients(torch.full((3,), t), x)
        x0 = to_x0(v, "velocity", x, alpha, sigma)
        torch.testing.assert_close(from_x0(x0, "velocity", x, alpha, sigma), v.double())
        eps = from_x0(x0, "eps", x, alpha, sigma)
        ours = schedule.diffuse(x0, torch.tensor(t_next), eps.float()) if t_next > 0 else x0.float()
        torch.testing.assert_close(ours.float(), stepped, rtol=1e-5, atol=1e-5)
        x = stepped


def test_the_shift_time_law_follows_the_flow_teachers_own_shift():
    """``time_distribution=shift`` on a flow teacher draws sigma = k u / (1 + (k - 1) u) with the scheduler's k."""
    from fdistill.schedules import sample_time

    u = torch.rand(20000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for shift in (1.0, 3.0):
        t = sample_time(FlowMatchSchedule(shift=shift), 20000, "shift", generator=torch.Generator().manual_seed(0))
        expected = shift * u / (1 + (shift - 1) * u)
        torch.testing.assert_close(t / 1000, expected.clamp(max=0.999), rtol=1e-6, atol=1e-6)


def test_transformer_denoiser_reads_the_velocity_at_the_pipeline_timestep():
    torch.manual_seed(0)
    transformer = tiny_transformer().eval()
    schedule = FlowMatchSchedule(shift=3.0)
    net = SD3TransformerDenoiser(transformer, schedule, (4, 8, 8))
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([999.0, 250.0], dtype=torch.float64)
    hidden, pooled = torch.randn(2, 5, 32), torch.randn(2, 16)
    cond = pack_text_condition(hidden, pooled)
    assert cond.shape == (2, 6, 32)
    torch.testing.assert_close(unpack_text_condition(cond, 16), (hidden, pooled))
    with torch.no_grad():
        v = transformer(hidden_states=x, timestep=t.float(), encoder_hidden_states=hidden,
                        pooled_projections=pooled).sample
        x0, features = net.forward_with_features(x, t, cond)
    sigma = (t / 1000)[:, None, None, None]
    torch.testing.assert_close(x0, (x - sigma * v).float(), rtol=1e-6, atol=1e-6)
    assert features[0].shape == (2, 16, 4, 4)  # image tokens on the 4x4 patch grid, 16 channels


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_one_critic_and_one_generator_step_on_a_flow_transformer_pipeline(tiny_sd3, name):
    cfg, (nets, objective, task) = flow_experiment(tiny_sd3, name)
    assert isinstance(nets.teacher, GuidedDenoiser) and not isinstance(nets.student.net, GuidedDenoiser)
    trainer = Trainer(nets, objective, task.batches(objective.needs_real_data), cfg, progress=False)
    check_one_critic_and_one_generator_step(trainer, name)


def test_prompts_are_encoded_by_the_stock_pipeline(tiny_sd3):
    from diffusers import StableDiffusion3Pipeline

    _, (nets, _, task) = flow_experiment(tiny_sd3, "dmd")
    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_sd3, text_encoder_3=None, tokenizer_3=None)
    hidden, _, pooled, _ = pipe.encode_prompt(PROMPTS, PROMPTS, PROMPTS, do_classifier_free_guidance=False,
                                              max_sequence_length=4)
    assert hidden.shape == (2, 12 + 4, 32) and pooled.shape == (2, 16)  # 12 CLIP tokens, 4 empty T5 tokens
    torch.testing.assert_close(task.parts.embed(PROMPTS), pack_text_condition(hidden, pooled), rtol=0, atol=0)
    latents = torch.randn(2, 4, 8, 8)
    expected = pipe.vae.decode(latents / 1.5 + 0.1).sample  # the pipeline's un-scaling and un-shifting
    torch.testing.assert_close(task.parts.decode(latents), expected, rtol=0, atol=0)


def test_flow_config_errors_name_the_fix(tiny_sd3):
    with pytest.raises(ConfigError, match="predicts the velocity"):
        flow_experiment(tiny_sd3, "dmd", "teacher.prediction_type=epsilon")
    with pytest.raises(ConfigError, match="re-noises as its exported pipeline"):
        flow_experiment(tiny_sd3, "dmd", "generator.times=[999,500]", "eval.renoise=sde")
    with pytest.raises(ConfigError, match="unknown transformer block .mid."):
        flow_experiment(tiny_sd3, "dmd", "objective.gan_weight=0.1", "objective.discriminator_features=[mid]")


def test_flow_student_samples_with_the_stock_euler_arithmetic(tiny_sd3):
    """A two-step flow student: each step is FlowMatchEulerDiscreteScheduler.step on the transformer's velocity."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    _, (nets, _, task) = flow_experiment(tiny_sd3, "dmd", "generator.times=[999,600]")
    student = nets.student
    assert isinstance(student.stock, FlowMatchSampling) and student.renoise_mode == "ode"
    cond = task.parts.embed(PROMPTS)
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0)
    scheduler.set_timesteps(sigmas=[0.999, 0.6])
    x = z
    with torch.no_grad():
        for t in scheduler.timesteps:
            v = student.net.transformer(hidden_states=x, timestep=t.expand(2), encoder_hidden_states=cond[:, :-1],
                                        pooled_projections=cond[:, -1, :16]).sample
            x = scheduler.step(v, t, x).prev_sample
        torch.testing.assert_close(student.sample(z, cond, steps=2), x, rtol=0, atol=0)
        with pytest.raises(ValueError, match="renoise ode"):
            student.sample(z, cond, steps=2, mode="sde")


@pytest.mark.slow
def test_export_is_a_stock_sd3_pipeline_that_reproduces_the_student(tiny_sd3, tmp_path):
    _, (nets, _, task) = flow_experiment(tiny_sd3, "dmd", "generator.times=[999,500]")
    with torch.no_grad():  # move the student away from the teacher so that a wrong transformer would show
        for p in nets.student.parameters():
            p.add_(0.01 * torch.randn_like(p))
    out = task.export(nets.student, tmp_path / "pipeline", {"objective": "dmd"})
    info = json.loads((out / "fdistill.json").read_text())
    index = json.loads((out / "model_index.json").read_text())
    assert index["scheduler"] == ["diffusers", "FlowMatchEulerDiscreteScheduler"]
    assert index["transformer"][1] == "SD3Transformer2DModel" and info["steps"] == [0.999, 0.5]
    assert info["step_argument"] == "sigmas" and info["call"]["max_sequence_length"] == 4
    assert "text_encoder_3=None" in (out / "README.md").read_text()
    served = exported_samples(out, tmp_path)
    assert served["classes"] == ["StableDiffusion3Pipeline", "FlowMatchEulerDiscreteScheduler"]
    for k in (1, 2):
        torch.testing.assert_close(served[k], student_images(nets.student.servable(), task, k), rtol=0, atol=0)
    sampler = pipeline_sampler(out, 2, "cpu")  # sample.py --model EXPORT --steps 2
    images, nfe = sampler.draw(2, PROMPTS, torch.Generator().manual_seed(3))
    assert sampler.text and nfe == 2
    torch.testing.assert_close(images, served[2], rtol=0, atol=0)


@pytest.mark.slow
def test_lora_on_a_transformer_trains_only_adapters_and_exports_merged(tiny_sd3, tmp_path):
    cfg, (nets, objective, task) = flow_experiment(
        tiny_sd3, "dmd", "student.lora.rank=2", "student.lora.target_modules=[to_q,to_k,to_v,to_out.0]",
        "objective.critic_steps=1")
    trainer = Trainer(nets, objective, task.batches(False), cfg, progress=False)
    before = {name: p.detach().clone() for name, p in nets.student.named_parameters()}
    assert [trainer.train_step(step)[0] for step in range(2)] == ["critic", "generator"]
    changed = {name for name, p in nets.student.named_parameters() if not torch.equal(p, before[name])}
    assert changed and all(is_adapter_weight(name) for name in changed)
    assert all(p.grad is None for name, p in nets.student.named_parameters() if not is_adapter_weight(name))
    out = task.export(nets.student, tmp_path / "pipeline", {"objective": "dmd"})
    served = exported_samples(out, tmp_path)
    torch.testing.assert_close(served[1], student_images(nets.student, task, 1), rtol=1e-4, atol=1e-4)


LORA_CHECK = r"""
import json, sys, torch
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler
teacher, export, prompts = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
info = json.load(open(export + "/fdistill.json"))
pipe = DiffusionPipeline.from_pretrained(teacher, text_encoder_3=None, tokenizer_3=None)
pipe.load_lora_weights(export + "/lora")
pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(export + "/lora", subfolder="scheduler")
out = {}
for scale in (1.0, 0.0):
    images = pipe(prompt=prompts, **info["call"], sigmas=info["steps"][:1], joint_attention_kwargs={"scale": scale},
                  output_type="pt", generator=torch.Generator().manual_seed(3)).images
    out[scale] = images.tolist()
assert "fdistill" not in sys.modules
print(json.dumps(out))
"""


@pytest.mark.slow
def test_teacher_pipeline_loads_the_lora_export_and_honours_its_scale(tiny_sd3, tmp_path):
    """load_lora_weights on the teacher's own pipeline samples like the LoRA student at scale 1, like the teacher's
    network at scale 0; the merged export agrees too."""
    _, (nets, _, task) = flow_experiment(tiny_sd3, "dmd", "student.lora.rank=2", "student.lora.alpha=4",
                                         "student.lora.target_modules=[to_q,to_k,to_v,to_out.0]")
    randomise_adapters(nets.student)
    out = task.export(nets.student, tmp_path / "pipeline", {"objective": "dmd"})
    assert "load_lora_weights" in (out / "README.md").read_text()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", LORA_CHECK, str(tiny_sd3), str(out), json.dumps(PROMPTS)],
                            capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    served = {float(k): torch.tensor(v) for k, v in json.loads(result.stdout.strip().splitlines()[-1]).items()}
    student = student_images(nets.student, task, 1)
    torch.testing.assert_close(served[1.0], student, rtol=1e-4, atol=1e-4)
    teacher_net = nets.student.net.base.denoiser  # the shared base, which runs with no adapter
    base = student_images(type(nets.student)(teacher_net, nets.student.times), task, 1)
    torch.testing.assert_close(served[0.0], base, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(base, student, atol=1e-3)
    torch.testing.assert_close(exported_samples(out, tmp_path)[1], student, rtol=1e-4, atol=1e-4)
