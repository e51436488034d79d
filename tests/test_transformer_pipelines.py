"""Flux-, PixArt- and Sana-shaped teachers on tiny pipelines built from configs, with T5 and Gemma tokenizers made
offline: every objective trains on them, the network reads its inputs as the stock pipeline feeds them, and the
export is the stock pipeline that reproduces the student with no fdistill import."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from fdistill.data.captions import CAPTION_WORDS
from fdistill.errors import ConfigError
from fdistill.networks.lora import is_adapter_weight
from fdistill.objectives import OBJECTIVES
from fdistill.pipelines.transformers import FluxTransformerDenoiser, PixArtTransformerDenoiser, SanaTransformerDenoiser
from fdistill.recipes import load_config
from fdistill.run import build_experiment
from fdistill.samplers.flow import FlowMatchSampling
from fdistill.samplers.lcm import LCMSampling
from fdistill.schedules import FlowMatchSchedule
from fdistill.training.trainer import Trainer
from scripts.word_tokenizers import gemma_word_tokenizer, t5_word_tokenizer, word_tokenizer
from tests.helpers import (
    PROMPTS,
    TRIGFLOW_TIMES,
    check_one_critic_and_one_generator_step,
    exported_samples,
    randomise_adapters,
    student_images,
)

T5_LENGTH = 12  # the tiny pipelines' max_sequence_length: longer than the prompts, so that the mask pads


def tiny_t5():
    from transformers import T5Config, T5EncoderModel

    tokenizer = t5_word_tokenizer(CAPTION_WORDS)
    encoder = T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=32, num_layers=1,
                                      num_heads=2, pad_token_id=tokenizer.pad_token_id,
                                      eos_token_id=tokenizer.eos_token_id))
    return tokenizer, encoder


def tiny_vae(shift_factor=None):
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
                         up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[8, 8], layers_per_block=1,
                         latent_channels=4, norm_num_groups=4, sample_size=16, shift_factor=shift_factor,
                         scaling_factor=1.5)


def save_tiny_flux_pipeline(root, guidance_embeds=True):
    """A FluxPipeline directory: 16x16 RGB images, 8x8x4 latents packed into 16 tokens, a 1-layer CLIP and T5,
    resolution-dependent (dynamic) shifting."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    clip_tokenizer = word_tokenizer(CAPTION_WORDS, 12)
    clip = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(clip_tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, max_position_embeddings=12, bos_token_id=clip_tokenizer.bos_token_id,
        eos_token_id=clip_tokenizer.eos_token_id, pad_token_id=clip_tokenizer.pad_token_id))
    t5_tokenizer, t5 = tiny_t5()
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                         attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=16, guidance_embeds=guidance_embeds,
                                         axes_dims_rope=(2, 2, 4))
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    FluxPipeline(scheduler=scheduler, vae=tiny_vae(shift_factor=0.1), text_encoder=clip, tokenizer=clip_tokenizer,
                 text_encoder_2=t5, tokenizer_2=t5_tokenizer, transformer=transformer).save_pretrained(root)
    return root


def save_tiny_pixart_pipeline(root):
    """A PixArtAlphaPipeline directory: 16x16 RGB images, 8x8x4 latents, a 1-layer T5, a learned-variance
    transformer (8 output channels) on DPM-Solver's VP schedule."""
    from diffusers import DPMSolverMultistepScheduler, PixArtAlphaPipeline, PixArtTransformer2DModel

    torch.manual_seed(0)
    tokenizer, t5 = tiny_t5()
    transformer = PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4,
                                           out_channels=8, num_layers=2, cross_attention_dim=16, sample_size=8,
                                           patch_size=2, caption_channels=32, norm_num_groups=4)
    PixArtAlphaPipeline(tokenizer=tokenizer, text_encoder=t5, vae=tiny_vae(), transformer=transformer,
                        scheduler=DPMSolverMultistepScheduler()).save_pretrained(root)
    return root


def save_tiny_sana_pipeline(root):
    """A SanaPipeline directory: 32x32 RGB images (the pipeline's smallest size), an 8x8x4 AutoencoderDC latent,
    a 1-layer Gemma2 and a transformer on DPM-Solver's flow sigmas (shift 3), as Sana ships."""
    from diffusers import AutoencoderDC, DPMSolverMultistepScheduler, SanaPipeline, SanaTransformer2DModel
    from transformers import Gemma2Config, Gemma2Model

    torch.manual_seed(0)
    tokenizer = gemma_word_tokenizer(CAPTION_WORDS)
    gemma = Gemma2Model(Gemma2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=32,
                                     num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                     pad_token_id=0, eos_token_id=1, bos_token_id=2))
    vae = AutoencoderDC(in_channels=3, latent_channels=4, attention_head_dim=8, encoder_block_types="ResBlock",
                        decoder_block_types="ResBlock", encoder_block_out_channels=(8, 8, 8),
                        decoder_block_out_channels=(8, 8, 8), encoder_layers_per_block=(1, 1, 1),
                        decoder_layers_per_block=(1, 1, 1), encoder_qkv_multiscales=((), (), ()),
                        decoder_qkv_multiscales=((), (), ()), upsample_block_type="interpolate",
                        downsample_block_type="Conv", scaling_factor=0.5)
    transformer = SanaTransformer2DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8,
                                         num_layers=2, num_cross_attention_heads=2, cross_attention_head_dim=8,
                                         cross_attention_dim=16, caption_channels=32, sample_size=8, patch_size=1)
    scheduler = DPMSolverMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    SanaPipeline(tokenizer=tokenizer, text_encoder=gemma, vae=vae, transformer=transformer,
                 scheduler=scheduler).save_pretrained(root)
    return root


@pytest.fixture(scope="module")
def tiny_sana(tmp_path_factory):
    return save_tiny_sana_pipeline(tmp_path_factory.mktemp("tiny_sana"))


@pytest.fixture(scope="module")
def tiny_flux(tmp_path_factory):
    return save_tiny_flux_pipeline(tmp_path_factory.mktemp("tiny_flux"))


@pytest.fixture(scope="module")
def tiny_pixart(tmp_path_factory):
    return save_tiny_pixart_pipeline(tmp_path_factory.mktemp("tiny_pixart"))


def experiment(pipeline, name, *overrides, resolution=16):
    resolution_key = [f"teacher.resolution={resolution}"] if resolution else []
    cfg, options = load_config(None, [
        "teacher.kind=pretrained", f"teacher.pretrained={pipeline}", f"teacher.max_sequence_length={T5_LENGTH}",
        *resolution_key, "data.kind=captioned_shapes", "teacher.guidance_scale=2.0", "train.batch_size=4",
        f"objective.name={name}", *TRIGFLOW_TIMES.get(name, []), *overrides])
    torch.manual_seed(0)
    return cfg, build_experiment(cfg, options)


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
@pytest.mark.parametrize("shape", ["flux", "pixart", "sana"])
def test_one_critic_and_one_generator_step_per_objective(tiny_flux, tiny_pixart, tiny_sana, shape, name):
    pipeline, resolution = {"flux": (tiny_flux, 16), "pixart": (tiny_pixart, None), "sana": (tiny_sana, None)}[shape]
    cfg, (nets, objective, task) = experiment(pipeline, name, resolution=resolution)
    trainer = Trainer(nets, objective, task.batches(objective.needs_real_data), cfg, progress=False)
    check_one_critic_and_one_generator_step(trainer, name)


def test_flux_teacher_reads_its_pipeline(tiny_flux):
    """Latents stay [B, 4, 8, 8] (packed only inside the transformer call), the dynamic shift is exp(mu) at 16
    image tokens, prompts are the pipeline's T5 states packed with the CLIP pooled embedding, and the embedded
    guidance defaults to the pipeline's 3.5."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    _, (nets, _, task) = experiment(tiny_flux, "dmd")
    teacher = nets.student.net
    assert isinstance(teacher, FluxTransformerDenoiser) and teacher.sample_shape == (4, 8, 8)
    assert teacher.embedded_guidance == 3.5 and task.pixel_size == 16
    mu = 0.5 + (1.15 - 0.5) * (16 - 256) / (4096 - 256)
    assert teacher.schedule.shift == pytest.approx(math.exp(mu))
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(tiny_flux, subfolder="scheduler")
    scheduler.set_timesteps(sigmas=[1.0, 0.75, 0.5, 0.25], mu=mu)
    k, sigma = teacher.schedule.shift, torch.tensor([1.0, 0.75, 0.5, 0.25])
    torch.testing.assert_close(scheduler.sigmas[:-1], k * sigma / (1 + (k - 1) * sigma))
    pipe = FluxPipeline.from_pretrained(tiny_flux)
    with torch.no_grad():  # as the pipeline's __call__ runs it (T5 takes another kernel under no_grad)
        hidden, pooled, _ = pipe.encode_prompt(PROMPTS, PROMPTS, max_sequence_length=T5_LENGTH)
    cond = task.parts.embed(PROMPTS)
    torch.testing.assert_close(cond[:, :-1], hidden, rtol=0, atol=0)
    torch.testing.assert_close(cond[:, -1, :16], pooled, rtol=0, atol=0)
    latents = torch.randn(2, 4, 8, 8)
    torch.testing.assert_close(teacher.unpack(teacher.pack(latents)), latents, rtol=0, atol=0)
    packed = FluxPipeline._pack_latents(latents, 2, 4, 8, 8)
    torch.testing.assert_close(teacher.pack(latents), packed, rtol=0, atol=0)
    torch.testing.assert_close(teacher.image_ids("cpu", torch.float32),
                               FluxPipeline._prepare_latent_image_ids(2, 4, 4, "cpu", torch.float32))
    features = teacher.forward_with_features(latents, torch.tensor([500.0, 900.0]), cond)[1]
    assert features[0].shape == (2, 16, 4, 4)  # image tokens of the joint block on the 4x4 token grid


def test_pixart_teacher_reads_its_pipeline(tiny_pixart):
    """The learned variance is dropped, the output is epsilon on the pipeline's VP schedule, and prompts are the
    pipeline's T5 states with their attention mask."""
    from diffusers import PixArtAlphaPipeline

    _, (nets, _, task) = experiment(tiny_pixart, "dmd", resolution=None)
    teacher = nets.student.net
    assert isinstance(teacher, PixArtTransformerDenoiser) and teacher.sample_shape == (4, 8, 8)
    assert teacher.prediction_type == "epsilon" and isinstance(nets.student.stock, LCMSampling)
    pipe = PixArtAlphaPipeline.from_pretrained(tiny_pixart)
    with torch.no_grad():  # as the pipeline's __call__ runs it
        hidden, mask, _, _ = pipe.encode_prompt(PROMPTS, do_classifier_free_guidance=False, clean_caption=False,
                                                max_sequence_length=T5_LENGTH)
    cond = task.parts.embed(PROMPTS)
    assert mask.sum() < mask.numel()  # the shorter prompt is padded, and the mask says so
    torch.testing.assert_close(cond[:, :-1], hidden, rtol=0, atol=0)
    torch.testing.assert_close(cond[:, -1, :T5_LENGTH], mask.float(), rtol=0, atol=0)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([999.0, 400.0])
    with torch.no_grad():
        out = pipe.transformer(x, encoder_hidden_states=hidden, encoder_attention_mask=mask, timestep=t,
                               added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample
        eps = out[:, :4]
        alpha_bar = teacher.schedule.alphas_cumprod[t.long()].float()[:, None, None, None]
        expected = (x - (1 - alpha_bar).sqrt() * eps) / alpha_bar.sqrt()
        torch.testing.assert_close(teacher(x, t, cond), expected, rtol=1e-5, atol=1e-5)


def test_sana_teacher_reads_its_pipeline(tiny_sana):
    """Flow sigmas shifted by flow_shift, prompts through the pipeline's Gemma with its instruction prefix and
    attention mask, and the velocity at timestep_scale * 1000 sigma read as x0."""
    import inspect

    from diffusers import SanaPipeline

    _, (nets, _, task) = experiment(tiny_sana, "dmd", resolution=None)
    teacher = nets.student.net
    assert isinstance(teacher, SanaTransformerDenoiser) and teacher.sample_shape == (4, 8, 8)
    assert teacher.schedule.shift == 3.0 and isinstance(nets.student.stock, FlowMatchSampling)
    pipe = SanaPipeline.from_pretrained(tiny_sana)
    instruction = inspect.signature(SanaPipeline.__call__).parameters["complex_human_instruction"].default
    assert instruction  # the pipeline's default prefix, which the condition must carry
    with torch.no_grad():
        hidden, mask, _, _ = pipe.encode_prompt(PROMPTS, do_classifier_free_guidance=False, clean_caption=False,
                                                max_sequence_length=T5_LENGTH,
                                                complex_human_instruction=instruction)
    cond = task.parts.embed(PROMPTS)
    torch.testing.assert_close(cond[:, :-1], hidden, rtol=0, atol=0)
    torch.testing.assert_close(cond[:, -1, :T5_LENGTH], mask.float(), rtol=0, atol=0)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([999.0, 400.0])
    with torch.no_grad():
        v = pipe.transformer(x, encoder_hidden_states=hidden, encoder_attention_mask=mask, timestep=t).sample
        torch.testing.assert_close(teacher(x, t, cond), x - (t / 1000)[:, None, None, None] * v,
                                   rtol=1e-5, atol=1e-5)


def perturbed_student(nets):
    """Move the student away from the teacher so that a wrong network in the export would show."""
    with torch.no_grad():
        for p in nets.student.parameters():
            p.add_(0.01 * torch.randn_like(p))


@pytest.mark.slow
@pytest.mark.parametrize("shape", ["flux", "pixart", "sana"])
def test_export_is_the_stock_pipeline_and_reproduces_the_student(tiny_flux, tiny_pixart, tiny_sana, shape, tmp_path):
    pipeline, resolution, times = {"flux": (tiny_flux, 16, "[999,500]"),
                                   "pixart": (tiny_pixart, None, "[999,499]"),
                                   "sana": (tiny_sana, None, "[999,500]")}[shape]
    _, (nets, _, task) = experiment(pipeline, "dmd", f"generator.times={times}", resolution=resolution)
    stock = {"flux": FlowMatchSampling, "pixart": LCMSampling, "sana": FlowMatchSampling}[shape]
    assert isinstance(nets.student.stock, stock)
    perturbed_student(nets)
    out = task.export(nets.student, tmp_path / "pipeline", {"objective": "dmd"})
    served = exported_samples(out, tmp_path)
    expected = {"flux": ["FluxPipeline", "FlowMatchEulerDiscreteScheduler"],
                "pixart": ["PixArtAlphaPipeline", "LCMScheduler"],
                "sana": ["SanaPipeline", "FlowMatchEulerDiscreteScheduler"]}[shape]
    assert served["classes"] == expected
    for k in (1, 2):
        torch.testing.assert_close(served[k], student_images(nets.student, task, k), rtol=0, atol=0)


@pytest.mark.slow
@pytest.mark.parametrize("shape", ["flux", "sana"])
def test_lora_export_loads_into_the_teacher_pipeline(tiny_flux, tiny_sana, shape, tmp_path):
    """Only adapters train; the teacher pipeline's load_lora_weights samples like the LoRA student, at the LoRA
    scale the export names (1 here, 0: the teacher's network)."""
    pipeline, resolution = {"flux": (tiny_flux, 16), "sana": (tiny_sana, None)}[shape]
    cfg, (nets, objective, task) = experiment(pipeline, "dmd", "student.lora.rank=2",
                                              "student.lora.target_modules=[to_q,to_k,to_v]",
                                              "objective.critic_steps=1", resolution=resolution)
    trainer = Trainer(nets, objective, task.batches(False), cfg, progress=False)
    before = {name: p.detach().clone() for name, p in nets.student.named_parameters()}
    assert [trainer.train_step(step)[0] for step in range(2)] == ["critic", "generator"]
    changed = {name for name, p in nets.student.named_parameters() if not torch.equal(p, before[name])}
    assert changed and all(is_adapter_weight(name) for name in changed)
    randomise_adapters(nets.student)
    out = task.export(nets.student, tmp_path / "pipeline", {"objective": "dmd"})
    check = (
        "import json, sys, torch\n"
        "from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler\n"
        "teacher, export, prompts = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])\n"
        "info = json.load(open(export + '/fdistill.json'))\n"
        "pipe = DiffusionPipeline.from_pretrained(teacher)\n"
        "pipe.load_lora_weights(export + '/lora')\n"
        "pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(export + '/lora', subfolder='scheduler')\n"
        "scale = sys.argv[4]\n"
        "out = [pipe(prompt=prompts, **info['call'], sigmas=info['steps'][:1], output_type='pt',\n"
        "            generator=torch.Generator().manual_seed(3), **{scale: {'scale': s}}).images.tolist()\n"
        "       for s in (1.0, 0.0)]\n"
        "assert 'fdistill' not in sys.modules\n"
        "print(json.dumps(out))\n")
    scale_argument = task.parts.spec.lora_scale_argument
    assert f"{scale_argument}=" in json.loads((out / "fdistill.json").read_text())["load_lora"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", check, str(pipeline), str(out), json.dumps(PROMPTS),
                             scale_argument], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    with_lora, without = (torch.tensor(x) for x in json.loads(result.stdout.strip().splitlines()[-1]))
    student = student_images(nets.student, task, 1)
    torch.testing.assert_close(with_lora, student, rtol=1e-4, atol=1e-4)
    teacher_net = nets.student.net.base.denoiser  # the shared base, which runs with no adapter
    base = student_images(type(nets.student)(teacher_net, nets.student.times), task, 1)
    torch.testing.assert_close(without, base, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(base, student, atol=1e-3)


@pytest.mark.slow
def test_pixart_lora_student_exports_merged(tiny_pixart, tmp_path):
    """PixArt's pipelines load no LoRA weights, so a LoRA student exports merged weights alone."""
    _, (nets, _, task) = experiment(tiny_pixart, "dmd", "student.lora.rank=2",
                                    "student.lora.target_modules=[to_q,to_k,to_v]", resolution=None)
    randomise_adapters(nets.student)
    out = task.export(nets.student, tmp_path / "pipeline", {"objective": "dmd"})
    assert not (out / "lora").exists() and "load_lora" not in json.loads((out / "fdistill.json").read_text())
    torch.testing.assert_close(exported_samples(out, tmp_path)[1], student_images(nets.student, task, 1),
                               rtol=1e-4, atol=1e-4)


def test_transformer_settings_that_do_not_apply_are_errors(tiny_flux, tiny_pixart):
    with pytest.raises(ConfigError, match="predicts the velocity"):
        experiment(tiny_flux, "dmd", "teacher.prediction_type=epsilon")
    with pytest.raises(ConfigError, match="no guidance embedding"):
        experiment(tiny_pixart, "dmd", "teacher.embedded_guidance=3.0", resolution=None)
    with pytest.raises(ConfigError, match="multiple of 4"):
        experiment(tiny_flux, "dmd", resolution=18)
    with pytest.raises(ConfigError, match="unknown transformer block 'mid'"):
        experiment(tiny_flux, "dmd", "objective.gan_weight=0.1", "objective.discriminator_features=[mid]")
    _, (nets, _, _) = experiment(tiny_flux, "dmd", "teacher.embedded_guidance=5.0",
                                 "objective.gan_weight=0.1", "objective.discriminator_features=[single.0]")
    assert nets.student.net.embedded_guidance == 5.0 and nets.teacher.net.feature_blocks == ["single.0"]


def test_flux_schedule_without_dynamic_shifting_keeps_its_shift():
    from diffusers import FlowMatchEulerDiscreteScheduler

    assert FlowMatchSchedule.from_diffusers(FlowMatchEulerDiscreteScheduler(shift=3.0), 4096).shift == 3.0
    dynamic = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    assert FlowMatchSchedule.from_diffusers(dynamic, 4096).shift == pytest.approx(math.exp(1.15))
    with pytest.raises(ValueError, match="number of image tokens"):
        FlowMatchSchedule.from_diffusers(dynamic)


def save_tiny_dit_pipeline(root):
    """A DiTPipeline directory for the digits: 16x16 gray images, 8x8x4 latents of a one-channel AutoencoderKL, a
    learned-variance DiT with 10 classes (label 10 is its null class) on DDIM's VP schedule."""
    from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=1, out_channels=1, down_block_types=["DownEncoderBlock2D"] * 2,
                        up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[8, 8], layers_per_block=1,
                        latent_channels=4, norm_num_groups=4, sample_size=16, scaling_factor=1.5)
    transformer = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                        num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=10,
                                        norm_num_groups=4)
    DiTPipeline(transformer=transformer, vae=vae, scheduler=DDIMScheduler(),
                id2label={i: str(i) for i in range(10)}).save_pretrained(root)
    return root


@pytest.fixture(scope="module")
def tiny_dit(tmp_path_factory):
    return save_tiny_dit_pipeline(tmp_path_factory.mktemp("tiny_dit"))


def dit_experiment(pipeline, name, *overrides):
    cfg, options = load_config(None, [
        "teacher.kind=pretrained", f"teacher.pretrained={pipeline}", "data.kind=digits", "teacher.guidance_scale=2.0",
        "train.batch_size=4", f"objective.name={name}", *TRIGFLOW_TIMES.get(name, []), *overrides])
    torch.manual_seed(0)
    return cfg, build_experiment(cfg, options)


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_one_critic_and_one_generator_step_per_objective_on_dit(tiny_dit, name):
    cfg, (nets, objective, task) = dit_experiment(tiny_dit, name)
    trainer = Trainer(nets, objective, task.batches(objective.needs_real_data), cfg, progress=False)
    check_one_critic_and_one_generator_step(trainer, name)


def test_dit_teacher_reads_its_pipeline_and_trains_on_latents(tiny_dit):
    """Labels condition the DiT without dropout, the learned variance is dropped, epsilon is read as x0 on the
    pipeline's VP schedule, the null class is the label past the classes, and real digits arrive as latents."""
    from diffusers import DiTPipeline

    _, (nets, objective, task) = dit_experiment(tiny_dit, "dmd", "objective.gan_weight=0.1")
    teacher = nets.student.net
    assert teacher.sample_shape == (4, 8, 8) and teacher.num_class_embeds == 11 and task.image_shape == (1, 16)
    labels = torch.tensor([3, 7])
    assert teacher.null_condition(labels).tolist() == [10, 10]
    pipe = DiTPipeline.from_pretrained(tiny_dit)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([999.0, 400.0])
    teacher.train()  # train mode: a dropped label would show
    with torch.no_grad():
        eps = pipe.transformer(x, timestep=t, class_labels=labels).sample[:, :4]
        alpha_bar = teacher.schedule.alphas_cumprod[t.long()].float()[:, None, None, None]
        expected = (x - (1 - alpha_bar).sqrt() * eps) / alpha_bar.sqrt()
        for _ in range(3):
            torch.testing.assert_close(teacher(x, t, labels), expected, rtol=1e-5, atol=1e-5)
    batch = next(task.batches(True))
    assert batch.real.shape == (4, 4, 8, 8) and batch.cond.dtype == torch.long
    assert task.to_images(batch.real).shape == (4, 1, 16, 16)


DIT_CHECK = r"""
import json, sys, torch
from diffusers import DiffusionPipeline
pipe = DiffusionPipeline.from_pretrained(sys.argv[1])
images = pipe(class_labels=[3, 7], guidance_scale=1.0, num_inference_steps=1, output_type="np",
              generator=torch.Generator().manual_seed(3)).images
assert "fdistill" not in sys.modules
print(json.dumps([type(pipe).__name__, type(pipe.scheduler).__name__, images.tolist()]))
"""


@pytest.mark.slow
def test_dit_export_is_a_stock_dit_pipeline_that_reproduces_the_student(tiny_dit, tmp_path):
    _, (nets, _, task) = dit_experiment(tiny_dit, "dmd", "generator.times=[999,499]")
    perturbed_student(nets)
    out = task.export(nets.student, tmp_path / "pipeline", {"objective": "dmd"})
    assert json.loads((out / "fdistill.json").read_text())["pipeline_steps"] == [1, 2]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", DIT_CHECK, str(out)], capture_output=True, text=True, env=env,
                            cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    pipeline_class, scheduler_class, images = json.loads(result.stdout.strip().splitlines()[-1])
    assert (pipeline_class, scheduler_class) == ("DiTPipeline", "LCMScheduler")
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        latents = nets.student.sample(nets.student.noise(2, generator=g), torch.tensor([3, 7]), 1, generator=g)
        expected = (task.to_images(latents) / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1)
    torch.testing.assert_close(torch.tensor(images), expected, rtol=0, atol=0)


def test_dit_student_at_a_time_dit_pipeline_cannot_start_from_exports_nothing(tiny_dit, tmp_path):
    _, (nets, _, task) = dit_experiment(tiny_dit, "dmd")  # the epsilon default, sigma/alpha = 2.5
    assert nets.student.times[0] < 500
    with pytest.raises(ValueError, match=r"generator.times=\[t\] for t >= 500"):
        task.export(nets.student, tmp_path / "pipeline", {"objective": "dmd"})
    assert not (tmp_path / "pipeline").exists()
