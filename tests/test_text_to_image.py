"""Text-to-image on a tiny latent pipeline built from configs: every objective trains on it, guidance reaches the
teacher alone and reads the negative prompt, and the export is served by plain diffusers."""

import json
import os
import subprocess
import sys

import pytest
import torch

from fdistill.data.captions import CAPTION_WORDS
from fdistill.errors import ConfigError
from fdistill.networks.guidance import GuidedDenoiser
from fdistill.objectives import OBJECTIVES
from fdistill.recipes import load_config
from fdistill.run import build_experiment
from fdistill.training.trainer import Trainer
from scripts.word_tokenizers import word_tokenizer
from tests.helpers import (
    check_one_critic_and_one_generator_step,
    randomise_adapters,
    served_by_the_teacher_with_lora,
    text_experiment,
)


def save_tiny_pipeline(root, prediction_type="v_prediction"):
    """A StableDiffusionPipeline directory: 16x16 RGB images, 8x8x4 latents, a 2-layer CLIP text encoder."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    tokenizer = word_tokenizer(CAPTION_WORDS, 12)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=12, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id))
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
                        up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[8, 8], layers_per_block=1,
                        latent_channels=4, norm_num_groups=4, sample_size=16)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=[8, 16], down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
                                up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"], cross_attention_dim=16,
                                attention_head_dim=2, norm_num_groups=4)
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                              prediction_type=prediction_type, timestep_spacing="trailing", clip_sample=False,
                              set_alpha_to_one=False)
    StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                            safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(root)
    return root


@pytest.fixture(scope="module")
def tiny_pipeline(tmp_path_factory):
    return save_tiny_pipeline(tmp_path_factory.mktemp("tiny_t2i"))


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_one_critic_and_one_generator_step_on_a_latent_text_pipeline(tiny_pipeline, name):
    cfg, (nets, objective, task) = text_experiment(tiny_pipeline, name)
    assert isinstance(nets.teacher, GuidedDenoiser) and not isinstance(nets.student.net, GuidedDenoiser)
    trainer = Trainer(nets, objective, task.batches(objective.needs_real_data), cfg, progress=False)
    check_one_critic_and_one_generator_step(trainer, name)


def test_batches_carry_prompt_embeddings_and_real_latents(tiny_pipeline):
    _, (_, _, task) = text_experiment(tiny_pipeline, "f_distill")
    torch.manual_seed(0)
    batch = next(task.batches(needs_real_data=True))
    assert batch.real.shape == (4, 4, 8, 8) and batch.cond.shape == (4, 12, 16)
    table = task.parts.embed(task.training_prompts)
    # every condition is the embedding of one training prompt
    assert all(any(torch.equal(c, row) for row in table) for c in next(task.batches(False)).cond)


def test_guidance_reaches_the_teacher_only_and_reads_the_negative_prompt(tiny_pipeline):
    _, (nets, _, task) = text_experiment(tiny_pipeline, "dmd")
    x = torch.randn(2, 4, 8, 8)
    t = torch.full((2,), 700.0, dtype=torch.float64)
    cond = task.parts.embed(["a red circle at the top left", "a blue square at the bottom right"])
    inner = nets.teacher.net
    conditional, unconditional = inner(x, t, cond), inner(x, t, task.unconditional(cond))
    expected = unconditional + 2.0 * (conditional - unconditional)
    torch.testing.assert_close(nets.teacher(x, t, cond), expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(conditional, unconditional)
    # the student and the fake score are the unguided network's copies: equal to its conditional prediction
    torch.testing.assert_close(nets.fake_score(x, t, cond), conditional)
    _, (other, _, _) = text_experiment(tiny_pipeline, "dmd", "teacher.negative_prompt=blurry")
    assert not torch.allclose(other.teacher(x, t, cond), nets.teacher(x, t, cond))


def test_text_config_errors_name_the_fix(tiny_pipeline, tmp_path):
    with pytest.raises(ConfigError, match="data.kind='digits' has no prompts"):
        text_experiment(tiny_pipeline, "dmd", "data.kind=digits")
    with pytest.raises(ConfigError, match="prompt file"):
        text_experiment(tiny_pipeline, "dmd", "data.kind=prompts", f"data.path={tmp_path / 'none.txt'}")
    broken = tmp_path / "broken"
    save_tiny_pipeline(broken)
    import shutil

    shutil.rmtree(broken / "vae")
    with pytest.raises(ConfigError, match="no vae/"):
        text_experiment(broken, "dmd")
    with pytest.raises(ConfigError, match="teacher.negative_prompt is not read"):
        build_experiment(*load_config(None, ["teacher.kind=ring", "teacher.negative_prompt=x"]))


def test_prompt_file_with_images_gives_real_latents(tiny_pipeline, tmp_path):
    from PIL import Image

    for i, colour in enumerate(["red", "blue"]):
        Image.new("RGB", (20, 20), colour).save(tmp_path / f"{i}.png")
    (tmp_path / "prompts.csv").write_text("prompt,image\na red square,0.png\na blue square,1.png\n")
    _, (_, _, task) = text_experiment(tiny_pipeline, "f_distill", "data.kind=prompts",
                                      f"data.path={tmp_path / 'prompts.csv'}")
    latents, prompts = task.real_data
    assert latents.shape == (2, 4, 8, 8) and prompts == ["a red square", "a blue square"]


EXPORT_CHECK = r"""
import json, sys, torch
from diffusers import DiffusionPipeline
pipe = DiffusionPipeline.from_pretrained(sys.argv[1])
assert type(pipe).__name__ == "StableDiffusionPipeline", type(pipe)
out = {}
for k in (1, 2):
    images = pipe(prompt=["a red circle at the top left", "a green square at the bottom right"], guidance_scale=1.0,
                  num_inference_steps=None, timesteps=json.loads(sys.argv[2])[:k], output_type="pt",
                  generator=torch.Generator().manual_seed(3)).images
    out[k] = images.tolist()
assert "fdistill" not in sys.modules
print(json.dumps(out))
"""


@pytest.mark.slow
def test_export_is_a_stock_stable_diffusion_pipeline_that_reproduces_the_student(tiny_pipeline, tmp_path):
    _, (nets, _, task) = text_experiment(tiny_pipeline, "dmd", "generator.times=[999,499]")
    with torch.no_grad():  # move the student away from the teacher so that a wrong UNet would show
        for p in nets.student.parameters():
            p.add_(0.01 * torch.randn_like(p))
    out = task.export(nets.student, tmp_path / "pipeline", {"objective": "dmd"})
    info = json.loads((out / "fdistill.json").read_text())
    index = json.loads((out / "model_index.json").read_text())
    assert index["scheduler"] == ["diffusers", "LCMScheduler"] and index["unet"][1] == "UNet2DConditionModel"
    assert "guidance_scale=1.0" in (out / "README.md").read_text()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", EXPORT_CHECK, str(out), json.dumps(info["student_times"])],
                            capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    served = json.loads(result.stdout.strip().splitlines()[-1])
    prompts = ["a red circle at the top left", "a green square at the bottom right"]
    for k in (1, 2):
        g = torch.Generator().manual_seed(3)
        student = nets.student.servable()
        with torch.no_grad():
            latents = student.sample(student.noise(2, generator=g), task.parts.embed(prompts), k, "sde", g)
            ours = (task.parts.decode(latents) / 2 + 0.5).clamp(0, 1)
        torch.testing.assert_close(torch.tensor(served[str(k)]), ours, rtol=0, atol=0)


ROOT = __import__("pathlib").Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_tiny_text_run_evaluates_writes_grids_and_samples_from_prompts(tiny_pipeline, tmp_path):
    """A few training steps end to end: CLIP score, FD and compositional accuracy for student and teacher on the
    training and held-out prompts, the prompt grids, the export, and sample.py with --prompt on run and export."""
    run = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "train.py"), "--config", str(ROOT / "configs/quickstart_t2i.yaml"),
           "--no-progress", f"run.dir={run}", "teacher.kind=pretrained",
           f"teacher.pretrained={tiny_pipeline}", "data.kind=captioned_shapes", "teacher.guidance_scale=2.0",
           "objective.name=dmd", "train.steps=2", "train.batch_size=4", "eval.num_samples=80",
           "eval.teacher_steps=2", "checkpoint.every=0", "log.sample_every=2"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    subprocess.run(cmd, check=True, cwd=tmp_path, capture_output=True, text=True, env=env)
    results = json.loads((run / "metrics.json").read_text())["results"]
    assert [(r["model"], r["prompts"]) for r in results] == [
        ("student", "training prompts"), ("teacher", "training prompts"),
        ("student", "held-out prompts"), ("teacher", "held-out prompts")]
    for r in results:
        assert 0 <= r["compositional_accuracy"] <= 1 and r["fd"] > 0 and r["samples_per_second"] > 0
        assert r["clip_model"] and r["feature_net"] == "fdistill-shapes" and r["guidance_scale"] == 2.0
        assert r["num_samples"] == 80 and r["seed"] == 1234
    assert (run / "samples" / "grid_training.png").is_file() and (run / "samples" / "grid_held-out.png").is_file()
    assert "## Metrics" in (run / "pipeline" / "README.md").read_text()
    for model, extra in ((run, []), (run / "pipeline", []), (run, ["--teacher", "--guidance-scale", "3"])):
        out = tmp_path / f"samples_{len(list(tmp_path.iterdir()))}"
        subprocess.run([sys.executable, str(ROOT / "sample.py"), "--model", str(model), "--num", "3", "--out",
                        str(out), "--prompt", "a red circle at the top left", "--prompt", "a blue square at the top "
                        "right", "--steps", "1" if "--teacher" not in extra else "2", *extra],
                       check=True, capture_output=True, text=True, env=env)
        assert len(list(out.glob("*.png"))) == 3
        assert (out / "prompts.txt").read_text().splitlines()[2] == "a red circle at the top left"
    bad = subprocess.run([sys.executable, str(ROOT / "sample.py"), "--model", str(run), "--num", "2", "--out",
                          str(tmp_path / "x")], capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and "--prompt" in bad.stderr
    guided_student = subprocess.run([sys.executable, str(ROOT / "sample.py"), "--model", str(run), "--num", "2",
                                     "--out", str(tmp_path / "y"), "--prompt", "a", "--guidance-scale", "2"],
                                    capture_output=True, text=True, env=env)
    assert guided_student.returncode == 2 and "never guided" in guided_student.stderr


@pytest.mark.slow
def test_teacher_pipeline_loads_the_lora_export_of_a_unet_student(tiny_pipeline, tmp_path):
    """Both LoRA files of the export, the diffusers one and the kohya one (read by diffusers' own kohya converter),
    make the teacher's pipeline sample like the student; alpha 1 at rank 2 checks that the kohya file keeps the
    adapters' scale."""
    _, (nets, _, task) = text_experiment(tiny_pipeline, "dmd", "student.lora.rank=2", "student.lora.alpha=1")
    randomise_adapters(nets.student)
    out = task.export(nets.student, tmp_path / "pipeline", {"objective": "dmd"})
    prompts = ["a red circle at the top left", "a green square at the bottom right"]
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        latents = nets.student.sample(nets.student.noise(2, generator=g), task.parts.embed(prompts), 1)
        ours = (task.parts.decode(latents) / 2 + 0.5).clamp(0, 1)
    info = json.loads((out / "fdistill.json").read_text())
    for weight_name in ("pytorch_lora_weights.safetensors", info["kohya_lora"].split("/")[-1]):
        served = served_by_the_teacher_with_lora(tiny_pipeline, out, prompts, weight_name, "cross_attention_kwargs")
        torch.testing.assert_close(served, ours, rtol=1e-4, atol=1e-4)
