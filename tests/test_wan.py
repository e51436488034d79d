"""Wan2.1-shaped text-to-video teachers on a tiny WanPipeline built from configs (a 2-block WanTransformer3DModel, an
AutoencoderKLWan that turns 5 frames of 16 x 16 pixels into 2 latent frames of 4 x 4, a 1-layer UMT5 with a
tokenizer made offline): the teacher reads the pipeline's 5-D latents, prompts and latent scaling exactly as
WanPipeline does, and the objectives that need no real data train on it with the frame axis kept."""

import inspect
import json
import shutil

import pytest
import torch

from fdistill.data.captions import CAPTION_WORDS
from fdistill.errors import ConfigError
from fdistill.networks.discriminator import discriminator_for
from fdistill.pipelines.loading import load_diffusers_teacher
from fdistill.pipelines.parts import LatentPipelineParts
from fdistill.pipelines.specs import SPECS
from fdistill.pipelines.video import (
    PIPELINE_FRAMES,
    PIPELINE_HEIGHT,
    PIPELINE_WIDTH,
    WanTransformerDenoiser,
)
from fdistill.recipes import load_config
from fdistill.run import build_experiment
from fdistill.samplers.flow import FlowMatchSampling
from fdistill.training.trainer import Trainer
from scripts.word_tokenizers import t5_word_tokenizer
from tests.helpers import PROMPTS, TRIGFLOW_TIMES, check_one_critic_and_one_generator_step

TEXT_LENGTH = 12  # the tiny pipeline's max_sequence_length: longer than the prompts, so that they are zero-padded
FRAMES, PIXELS = 5, 16  # 2 latent frames of 4 x 4 latents, 2 x 2 tokens each
LATENTS_MEAN, LATENTS_STD = [0.1, -0.2, 0.3, 0.0], [1.5, 0.5, 2.0, 1.0]
SPEC = SPECS["WanPipeline"]


def save_tiny_wan_pipeline(root, scheduler=None):
    """A WanPipeline directory: a WanTransformer3DModel of 2 blocks with patches (1, 2, 2), an AutoencoderKLWan
    with 4 latent channels and 4x temporal and spatial downsampling, a 1-layer UMT5, and UniPC on flow sigmas with
    shift 3, as Wan2.1 ships."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(0)
    tokenizer = t5_word_tokenizer(CAPTION_WORDS)
    umt5 = UMT5EncoderModel(UMT5Config(vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=32, num_layers=1,
                                       num_heads=2, pad_token_id=tokenizer.pad_token_id,
                                       eos_token_id=tokenizer.eos_token_id))
    vae = AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 1, 1], num_res_blocks=1, temperal_downsample=[True, True],
                           latents_mean=LATENTS_MEAN, latents_std=LATENTS_STD, scale_factor_spatial=4,
                           scale_factor_temporal=4)
    transformer = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8,
                                        in_channels=4, out_channels=4, text_dim=32, freq_dim=16, ffn_dim=32,
                                        num_layers=2, rope_max_seq_len=32)
    scheduler = scheduler or UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                                     flow_shift=3.0)
    WanPipeline(tokenizer=tokenizer, text_encoder=umt5, vae=vae, transformer=transformer,
                scheduler=scheduler).save_pretrained(root)
    return root


@pytest.fixture(scope="module")
def tiny_wan(tmp_path_factory):
    return save_tiny_wan_pipeline(tmp_path_factory.mktemp("tiny_wan"))


def tiny_teacher(root, **settings):
    return load_diffusers_teacher(root, resolution=PIXELS, num_frames=FRAMES, **settings)


def experiment(pipeline, name, *overrides):
    cfg, options = load_config(None, [
        "teacher.kind=pretrained", f"teacher.pretrained={pipeline}", f"teacher.resolution={PIXELS}",
        f"teacher.num_frames={FRAMES}", f"teacher.max_sequence_length={TEXT_LENGTH}", "data.kind=captioned_shapes",
        "teacher.guidance_scale=2.0", "train.batch_size=4", f"objective.name={name}", *TRIGFLOW_TIMES.get(name, []),
        *overrides])
    torch.manual_seed(0)
    return cfg, build_experiment(cfg, options)


def prompt_condition(pipe, prompts):
    """``WanPipeline.encode_prompt``'s hidden states, under no_grad as its ``__call__`` runs it."""
    with torch.no_grad():
        hidden, negative = pipe.encode_prompt(prompts, do_classifier_free_guidance=False,
                                              max_sequence_length=TEXT_LENGTH)
    assert negative is None
    return hidden


def test_the_teacher_is_the_wan_adapter_called_as_the_pipeline_calls_its_transformer(tiny_wan):
    """5-D latents of (num_frames - 1) // 4 + 1 frames, UniPC's flow_shift as the schedule's shift, and the
    velocity of the transformer given the latents, the float32 timesteps of the stock Euler scheduler and the
    prompt's hidden states, bit for bit."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

    teacher = tiny_teacher(tiny_wan)
    assert isinstance(teacher, WanTransformerDenoiser) and teacher.sample_shape == (4, 2, 4, 4)
    assert teacher.schedule.shift == 3.0 and isinstance(teacher.stock_sampling(), FlowMatchSampling)
    assert teacher.pipeline_call_arguments() == {"num_frames": FRAMES, "height": PIXELS, "width": PIXELS}
    pipe = WanPipeline.from_pretrained(tiny_wan)
    cond = prompt_condition(pipe, PROMPTS)
    x, t = torch.randn(2, *teacher.sample_shape), torch.tensor([999.0, 250.0], dtype=torch.float64)
    scheduler = FlowMatchEulerDiscreteScheduler()
    scheduler.set_timesteps(sigmas=(t / 1000).tolist())  # the pipeline's timestep at step i is timesteps[i]
    with torch.no_grad():
        velocity = pipe.transformer(hidden_states=x, timestep=scheduler.timesteps, encoder_hidden_states=cond,
                                    return_dict=False)[0]
        torch.testing.assert_close(teacher.network_output(x, t, cond), velocity, rtol=0, atol=0)
        torch.testing.assert_close(teacher(x, t, cond), x - (t / 1000).float()[:, None, None, None, None] * velocity,
                                   rtol=1e-6, atol=1e-6)


def test_the_pipelines_defaults_and_the_sizes_it_refuses(tiny_wan):
    """Without a size the teacher takes WanPipeline's default video; a size the pipeline would round or refuse is a
    one-line error, and a second (low-noise) transformer is refused rather than ignored."""
    from diffusers import WanPipeline

    defaults = inspect.signature(WanPipeline.__call__).parameters
    assert (PIPELINE_HEIGHT, PIPELINE_WIDTH, PIPELINE_FRAMES) == tuple(
        defaults[name].default for name in ("height", "width", "num_frames"))
    assert SPEC.max_sequence_length == defaults["max_sequence_length"].default
    teacher = load_diffusers_teacher(tiny_wan)
    assert teacher.sample_shape == (4, 21, 120, 208) and teacher.video_shape == (81, 480, 832)
    with pytest.raises(ConfigError, match="teacher.resolution=24 must be a positive multiple of 16"):
        load_diffusers_teacher(tiny_wan, resolution=24)
    with pytest.raises(ConfigError, match="teacher.num_frames=6 must be 1 more than a multiple of 4"):
        load_diffusers_teacher(tiny_wan, resolution=PIXELS, num_frames=6)
    with pytest.raises(ConfigError, match="no guidance embedding"):
        tiny_teacher(tiny_wan, embedded_guidance=3.5)


def test_a_pipeline_with_two_transformers_is_refused(tiny_wan, tmp_path):
    two_experts = shutil.copytree(tiny_wan, tmp_path / "wan22")
    index = json.loads((two_experts / "model_index.json").read_text())
    index["transformer_2"], index["boundary_ratio"] = ["diffusers", "WanTransformer3DModel"], 0.875
    (two_experts / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ConfigError, match=r"WanPipeline with two denoisers \(transformer/ and transformer_2/"):
        tiny_teacher(two_experts)


def test_an_image_teacher_refuses_a_frame_count():
    from diffusers import UNet2DModel

    from fdistill.networks.denoisers import UNetDenoiser
    from tests.helpers import TINY_UNET

    with pytest.raises(ValueError, match="teacher.num_frames is not read"):
        UNetDenoiser.from_pipeline(UNet2DModel(**TINY_UNET), {}, 8, num_frames=5)


def test_a_flow_match_euler_scheduler_gives_its_shift(tmp_path):
    from diffusers import FlowMatchEulerDiscreteScheduler

    root = save_tiny_wan_pipeline(tmp_path / "euler", FlowMatchEulerDiscreteScheduler(shift=5.0))
    assert tiny_teacher(root).schedule.shift == 5.0


def test_prompts_are_the_pipelines_zero_padded_umt5_states(tiny_wan):
    from diffusers import WanPipeline

    teacher = tiny_teacher(tiny_wan)
    parts = LatentPipelineParts.load(tiny_wan, str(tiny_wan), teacher.network, TEXT_LENGTH)
    cond = parts.embed(PROMPTS)
    expected = prompt_condition(WanPipeline.from_pretrained(tiny_wan), PROMPTS)
    assert cond.shape == (2, TEXT_LENGTH, 32)
    torch.testing.assert_close(cond, expected, rtol=0, atol=0)
    tokens = len(PROMPTS[0].split()) + 1  # one token per caption word, and </s>
    assert cond[0, :tokens].abs().amin() > 0 and not cond[0, tokens:].any()  # zeros after the prompt, no mask row


def test_latent_scaling_is_the_pipelines_and_inverts(tiny_wan):
    """The denoiser's latents reach the VAE as WanPipeline un-normalises them before its decode (captured from the
    pipeline's own call), and the encoding's normalisation undoes it."""
    from diffusers import WanPipeline

    pipe = WanPipeline.from_pretrained(tiny_wan)
    call = dict(prompt=PROMPTS[:1], height=PIXELS, width=PIXELS, num_frames=FRAMES, num_inference_steps=1,
                guidance_scale=1.0, max_sequence_length=TEXT_LENGTH)
    latents = pipe(**call, output_type="latent", generator=torch.Generator().manual_seed(0)).frames
    decoded = []
    decode = pipe.vae.decode
    pipe.vae.decode = lambda z, **kwargs: decoded.append(z) or decode(z, **kwargs)
    pipe(**call, output_type="pt", generator=torch.Generator().manual_seed(0))
    vae_latents = SPEC.to_vae_latents(latents, pipe.vae.config)
    torch.testing.assert_close(vae_latents, decoded[0], rtol=0, atol=0)
    assert not torch.allclose(vae_latents, latents, atol=0.1)  # the statistics are not the identity
    torch.testing.assert_close(SPEC.from_vae_latents(vae_latents, pipe.vae.config), latents, rtol=1e-6, atol=1e-6)


def test_features_are_the_video_tokens_on_their_grid_and_the_heads_read_every_frame(tiny_wan):
    teacher = tiny_teacher(tiny_wan)
    x, t = torch.randn(2, *teacher.sample_shape), torch.tensor([999.0, 250.0])
    with torch.no_grad():
        grid = teacher.transformer.patch_embedding(x)  # [B, D, F, H / 2, W / 2]
        assert grid.shape == (2, 16, 2, 2, 2)
        torch.testing.assert_close(teacher.feature_of(grid.flatten(2).transpose(1, 2)), grid, rtol=0, atol=0)
        assert list(teacher.blocks()) == ["block.0", "block.1"] and teacher.feature_blocks == ["block.1"]
        features = teacher.forward_with_features(x, t, torch.randn(2, TEXT_LENGTH, 32))[1]
    assert features[0].shape == (2, 16, 2, 2, 2)
    discriminator = discriminator_for(features)
    feature = features[0].clone().requires_grad_(True)
    logits = discriminator([feature])
    assert logits.shape == (2, 1)
    logits.sum().backward()
    assert all(feature.grad[:, :, f].abs().sum() > 0 for f in range(2))  # one logit reads both frames


# The objectives that train on teacher samples alone; those that read real data need real videos.
WITHOUT_REAL_DATA = ["diff_instruct", "dmd", "sid", "sim"]


@pytest.mark.parametrize("name", WITHOUT_REAL_DATA)
def test_one_critic_and_one_generator_step_per_objective(tiny_wan, name):
    cfg, (nets, objective, task) = experiment(tiny_wan, name)
    assert isinstance(nets.teacher.net, WanTransformerDenoiser) and nets.student.sample_shape == (4, 2, 4, 4)
    assert not objective.needs_real_data
    trainer = Trainer(nets, objective, task.batches(objective.needs_real_data), cfg, progress=False)
    check_one_critic_and_one_generator_step(trainer, name)


def test_the_dmd_loss_keeps_the_frame_axis(tiny_wan):
    """Reversing the frames of the teacher's velocity changes DMD's generator loss: the objective compares the
    predictions frame by frame rather than anything that forgets which frame is which."""
    _, (nets, objective, task) = experiment(tiny_wan, "dmd")
    batch = next(task.batches(objective.needs_real_data))

    def generator_loss():
        torch.manual_seed(1)
        return objective.generator_loss(batch, nets, 1)[0].item()

    teacher = nets.teacher.net
    loss = generator_loss()
    assert generator_loss() == loss  # the same draws
    velocity = teacher.network_output
    teacher.network_output = lambda x_t, t, cond=None: velocity(x_t, t, cond).flip(2)
    assert abs(generator_loss() - loss) > 1e-4 * abs(loss)
