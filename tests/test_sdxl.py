"""SDXL on a tiny StableDiffusionXLPipeline built from configs: every objective trains on it, the UNet gets SDXL's
pooled embedding and micro-conditions, guidance reaches the teacher's pooled embeddings alone, and the export is a
stock StableDiffusionXLPipeline with an LCMScheduler that reproduces the student bit for bit with no fdistill import;
its LoRA files load through load_lora_weights in the diffusers and the kohya formats."""

import json

import pytest
import torch

from fdistill.data.captions import CAPTION_WORDS
from fdistill.networks.guidance import GuidedDenoiser
from fdistill.objectives import OBJECTIVES
from fdistill.pipelines.specs import SPECS
from fdistill.pipelines.unets import SDXLUNetDenoiser
from fdistill.training.trainer import Trainer
from scripts.word_tokenizers import word_tokenizer
from tests.helpers import (
    PROMPTS,
    check_one_critic_and_one_generator_step,
    exported_samples,
    randomise_adapters,
    served_by_the_teacher_with_lora,
    student_images,
    text_experiment,
)

POOLED = 16  # the second text encoder's projection width


def save_tiny_sdxl(root, latents_mean=None):
    """A StableDiffusionXLPipeline directory: 16x16 RGB images, 8x8x4 latents, two one-layer CLIP text encoders
    (hidden widths 8 and 16, so 24-wide prompt embeddings) and a UNet with SDXL's text-time embedding; with
    ``latents_mean``, a VAE with per-channel latent statistics (as Playground-style SDXL checkpoints have)."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(0)
    tokenizer = word_tokenizer(CAPTION_WORDS, 12)

    def clip(width, model):
        return model(CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
            num_attention_heads=2, max_position_embeddings=12, projection_dim=POOLED,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id))

    statistics = {} if latents_mean is None else {"latents_mean": latents_mean, "latents_std": [0.5, 2.0, 1.0, 0.8]}
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
                        up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[8, 8], layers_per_block=1,
                        latent_channels=4, norm_num_groups=4, sample_size=16, scaling_factor=0.13025, **statistics)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=[8, 16],
        down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"], up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"],
        cross_attention_dim=24, attention_head_dim=2, norm_num_groups=4, use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=4, projection_class_embeddings_input_dim=POOLED + 24)
    scheduler = EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                       timestep_spacing="leading", steps_offset=1)
    StableDiffusionXLPipeline(vae=vae, text_encoder=clip(8, CLIPTextModel), tokenizer=tokenizer,
                              text_encoder_2=clip(16, CLIPTextModelWithProjection), tokenizer_2=tokenizer, unet=unet,
                              scheduler=scheduler).save_pretrained(root)
    return root


@pytest.fixture(scope="module")
def tiny_sdxl(tmp_path_factory):
    return save_tiny_sdxl(tmp_path_factory.mktemp("tiny_sdxl"))


def test_the_spec_says_what_the_stock_class_does():
    """The spec's LoRA flag is the stock class's own, and a spec names a diffusers pipeline class."""
    import diffusers

    for spec in SPECS.values():
        assert spec.lora == hasattr(getattr(diffusers, spec.name), "load_lora_weights"), spec.name
        assert not spec.kohya_lora or spec.lora
    assert SPECS["StableDiffusionXLPipeline"].kohya_lora and SPECS["StableDiffusionPipeline"].kohya_lora


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_one_critic_and_one_generator_step_on_a_tiny_sdxl(tiny_sdxl, name):
    cfg, (nets, objective, task) = text_experiment(tiny_sdxl, name)
    assert isinstance(nets.teacher.net, SDXLUNetDenoiser)
    assert any(isinstance(module, SDXLUNetDenoiser) for module in nets.student.modules())
    trainer = Trainer(nets, objective, task.batches(objective.needs_real_data), cfg, progress=False)
    check_one_critic_and_one_generator_step(trainer, name)


def test_the_unet_reads_the_pooled_embedding_and_the_pipelines_micro_conditions(tiny_sdxl):
    """The condition packs the stock encode_prompt's hidden states and pooled embedding; the adapter's output is
    the stock UNet call with SDXL's added_cond_kwargs, and changes with the pooled row alone."""
    from diffusers import StableDiffusionXLPipeline

    _, (nets, _, task) = text_experiment(tiny_sdxl, "dmd")
    cond = task.parts.embed(PROMPTS)
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    hidden, _, pooled, _ = pipe.encode_prompt(PROMPTS, do_classifier_free_guidance=False)
    assert cond.shape == (2, 13, 24)
    torch.testing.assert_close(cond[:, :-1], hidden, rtol=0, atol=0)
    torch.testing.assert_close(cond[:, -1, :POOLED], pooled, rtol=0, atol=0)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([700.0, 300.0], dtype=torch.float64)
    net = nets.student.net
    time_ids = pipe._get_add_time_ids((16, 16), (0, 0), (16, 16), hidden.dtype,
                                      pipe.text_encoder_2.config.projection_dim).repeat(2, 1)
    with torch.no_grad():
        stock = net.unet(x, t.float(), encoder_hidden_states=hidden,
                         added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
        torch.testing.assert_close(net.network_output(x, t, cond), stock, rtol=0, atol=0)
        other = cond.clone()
        other[:, -1, :POOLED] += 1.0
        assert not torch.allclose(net(x, t, other), net(x, t, cond))


def test_guidance_reaches_the_teachers_pooled_embeddings_and_never_the_students(tiny_sdxl):
    _, (nets, _, task) = text_experiment(tiny_sdxl, "dmd")
    assert isinstance(nets.teacher, GuidedDenoiser) and not isinstance(nets.student.net, GuidedDenoiser)
    # the empty negative prompt is the pipeline's default: zero hidden states and pooled embedding
    assert torch.equal(task.negative, torch.zeros_like(task.negative))
    x, t = torch.randn(2, 4, 8, 8), torch.full((2,), 700.0, dtype=torch.float64)
    cond = task.parts.embed(PROMPTS)
    inner = nets.teacher.net
    with torch.no_grad():
        conditional, unconditional = inner(x, t, cond), inner(x, t, task.unconditional(cond))
        torch.testing.assert_close(nets.teacher(x, t, cond), unconditional + 2.0 * (conditional - unconditional),
                                   rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(nets.fake_score(x, t, cond), conditional)
        # a negative prompt's pooled embedding moves the guided teacher, and not the student
        _, (other, _, other_task) = text_experiment(tiny_sdxl, "dmd", "teacher.negative_prompt=blurry")
        negative = other_task.negative
        assert negative[0, -1, :POOLED].abs().sum() > 0
        torch.testing.assert_close(negative, other_task.parts.embed(["blurry"]))
        assert not torch.allclose(other.teacher(x, t, cond), nets.teacher(x, t, cond))
        torch.testing.assert_close(other.student.net(x, t, cond), nets.student.net(x, t, cond))


def test_latent_statistics_scale_as_the_pipeline_does(tmp_path):
    """A VAE with latents_mean/std: decode un-scales as StableDiffusionXLPipeline does, and encode inverts it."""
    from diffusers import StableDiffusionXLPipeline

    root = save_tiny_sdxl(tmp_path / "sdxl", latents_mean=[0.1, -0.2, 0.3, 0.0])
    _, (_, _, task) = text_experiment(root, "dmd")
    latents = torch.randn(2, 4, 8, 8)
    vae = StableDiffusionXLPipeline.from_pretrained(root).vae
    mean = torch.tensor([0.1, -0.2, 0.3, 0.0]).view(1, 4, 1, 1)
    std = torch.tensor([0.5, 2.0, 1.0, 0.8]).view(1, 4, 1, 1)
    spec = task.parts.spec
    torch.testing.assert_close(spec.to_vae_latents(latents, vae.config), latents * std / 0.13025 + mean)
    torch.testing.assert_close(spec.from_vae_latents(spec.to_vae_latents(latents, vae.config), vae.config), latents)


@pytest.mark.slow
def test_export_is_a_stock_sdxl_pipeline_that_reproduces_the_student(tmp_path):
    root = save_tiny_sdxl(tmp_path / "sdxl", latents_mean=[0.1, -0.2, 0.3, 0.0])
    _, (nets, _, task) = text_experiment(root, "dmd", "generator.times=[999,499]")
    with torch.no_grad():  # move the student away from the teacher so that a wrong UNet would show
        for p in nets.student.parameters():
            p.add_(0.01 * torch.randn_like(p))
    out = task.export(nets.student, tmp_path / "pipeline", {"objective": "dmd"})
    info = json.loads((out / "fdistill.json").read_text())
    assert info["call"]["height"] == 16 and info["step_argument"] == "timesteps"
    served = exported_samples(out, tmp_path)
    assert served["classes"] == ["StableDiffusionXLPipeline", "LCMScheduler"]
    for k in (1, 2):
        torch.testing.assert_close(served[k], student_images(nets.student.servable(), task, k), rtol=0, atol=0)


@pytest.mark.slow
def test_sdxl_pipeline_loads_the_lora_export_in_both_formats(tiny_sdxl, tmp_path):
    _, (nets, _, task) = text_experiment(tiny_sdxl, "dmd", "student.lora.rank=2", "student.lora.alpha=1")
    randomise_adapters(nets.student)
    out = task.export(nets.student, tmp_path / "pipeline", {"objective": "dmd"})
    info = json.loads((out / "fdistill.json").read_text())
    ours = student_images(nets.student, task, 1)
    for weight_name in ("pytorch_lora_weights.safetensors", info["kohya_lora"].split("/")[-1]):
        served = served_by_the_teacher_with_lora(tiny_sdxl, out, PROMPTS, weight_name, "cross_attention_kwargs")
        torch.testing.assert_close(served, ours, rtol=1e-4, atol=1e-4)
