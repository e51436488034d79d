"""The memory pre-flight: its estimate by component, its activation count against autograd's own, its refusal of a
run that cannot fit, and the checks it makes before any weight loads."""

import pytest
import torch
from diffusers import ModelMixin, UNet2DModel

import fdistill.preflight as preflight
from fdistill.commands import train
from fdistill.errors import ConfigError
from fdistill.networks.denoisers import UNetDenoiser
from fdistill.preflight import ActivationMeter, estimate_memory, kept_activations
from fdistill.recipes import load_config
from fdistill.schedules import DiscreteVPSchedule
from fdistill.training.trainer import Trainer
from tests.helpers import TINY_UNET, batches, tiny_unet_experiment

TINY = ["teacher.kind=unet", "objective.name=dmd", "train.batch_size=4"]


def tiny_config(*overrides):
    cfg, options = load_config(None, [*TINY, *overrides])
    cfg.teacher.unet = dict(TINY_UNET)
    return cfg, options


def unet_parameters() -> int:
    return sum(p.numel() for p in UNet2DModel(**TINY_UNET).parameters())


def test_the_estimate_counts_weights_copies_adapters_and_optimizer_states():
    full = estimate_memory(*tiny_config(), process_memory=0)
    lora = estimate_memory(*tiny_config("student.lora.rank=2", "fake_score.lora.rank=2", "teacher.dtype=bf16"),
                           process_memory=0)
    params = unet_parameters()
    assert full.rows["frozen weights"][0] == 4 * params
    assert full.rows["trained weights"][0] == 2 * 4 * params  # a float32 copy each for student and fake score
    assert full.rows["optimizer states"][0] == 2 * 2 * 4 * params
    assert lora.rows["frozen weights"][0] == 2 * params  # once, in bfloat16
    adapters = lora.rows["trained weights"][0]
    assert 0 < adapters < 0.25 * full.rows["trained weights"][0]
    assert lora.rows["optimizer states"][0] == 2 * adapters
    assert lora.total < full.total and full.loading == 3 * 4 * params  # the float32 teacher and two copies


@pytest.mark.parametrize("checkpointing", [False, True])
def test_activations_on_the_meta_device_are_those_autograd_keeps_on_real_tensors(checkpointing):
    """The meta pass counts the bytes a real pass of the same network saves for its backward pass, up to the
    attention kernel, which PyTorch picks per device (its saved tensors differ a little)."""
    schedule = DiscreteVPSchedule.from_diffusers(__import__("diffusers").DDPMScheduler())
    torch.manual_seed(0)
    real = UNetDenoiser(UNet2DModel(**TINY_UNET), schedule)
    with torch.device("meta"):
        meta = UNetDenoiser(UNet2DModel(**TINY_UNET), schedule)
    real.network.requires_grad_(True)
    meta.network.requires_grad_(True)
    x, t = torch.randn(4, 3, 8, 8), torch.full((4,), 500.0)
    counted = kept_activations(meta, meta.network, x.to("meta"), t.to("meta"), None, checkpointing, False)
    meter = ActivationMeter(real.network.parameters())
    if checkpointing:
        real.network.enable_gradient_checkpointing(meter.checkpointed)
    with torch.autograd.graph.saved_tensors_hooks(meter.pack, lambda tensor: tensor):
        real.network_output(x, t)
    assert meter.total > 0 and abs(counted / meter.total - 1) < 0.1
    without = kept_activations(meta, meta.network, x.to("meta"), t.to("meta"), None, False, False)
    assert (counted < without) == checkpointing


def test_checkpointing_and_lora_lower_the_activation_and_weight_estimates():
    plain = estimate_memory(*tiny_config(), process_memory=0)
    checkpointed = estimate_memory(*tiny_config("train.gradient_checkpointing=true"), process_memory=0)
    assert checkpointed.rows["activations"][0] < plain.rows["activations"][0]


def test_a_run_that_cannot_fit_is_refused_in_one_line_naming_the_levers(monkeypatch):
    cfg, options = tiny_config()
    estimate = estimate_memory(cfg, options)
    current = preflight._resident_memory()
    needed = estimate.total - current
    monkeypatch.setattr(preflight, "available_memory", lambda device: (needed - 1, "available RAM"))
    with pytest.raises(ConfigError) as e:
        preflight.check_fits(cfg, options, estimate, torch.device("cpu"))
    message = str(e.value)
    assert "\n" not in message and "available RAM" in message
    assert "student.lora" in message or "would not make it fit" in message
    monkeypatch.setattr(preflight, "available_memory", lambda device: (needed + 1, "available RAM"))
    preflight.check_fits(cfg, options, estimate, torch.device("cpu"))  # fits: no error


def test_the_training_command_refuses_before_loading_any_weight(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(preflight, "available_memory", lambda device: (1.0, "available RAM"))
    monkeypatch.setattr(ModelMixin, "from_pretrained", classmethod(lambda cls, *a, **k: pytest.fail("loaded")))
    with pytest.raises(SystemExit) as e:
        train.main(["--config", "configs/quickstart_t2i.yaml", f"run.dir={tmp_path / 'run'}", "--no-progress"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: the run needs about") and "\n" not in err


@pytest.mark.parametrize("overrides, fragment", [
    (["eval.num_samples=48"], "eval.num_samples=48 is too few images for an FD in 64-d fdistill-shapes"),
    (["data.kind=prompts", "data.path=PROMPTS"], "names none"),
])
def test_what_the_config_and_data_decide_is_refused_before_any_weight_loads(overrides, fragment, monkeypatch,
                                                                           tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle at the top left\na green square at the bottom right\n")
    overrides = [o.replace("PROMPTS", str(prompts)) for o in overrides]
    monkeypatch.setattr(ModelMixin, "from_pretrained", classmethod(lambda cls, *a, **k: pytest.fail("loaded")))
    cfg, options = load_config("configs/quickstart_t2i.yaml", overrides)
    with pytest.raises(ConfigError, match=fragment):
        estimate_memory(cfg, options)


def test_the_8bit_optimizer_refuses_a_cpu_in_one_line():
    cfg, options = tiny_config("student_optim.optimizer=adamw8bit")
    with pytest.raises(ConfigError, match="adamw8bit runs on a CUDA device only") as e:
        preflight.check_device(cfg, torch.device("cpu"))
    assert "\n" not in str(e.value)
    critic_cfg, (nets, objective) = tiny_unet_experiment("dmd", "critic_optim.optimizer=adamw8bit")
    with pytest.raises(ConfigError, match="critic_optim.optimizer=adamw8bit"):
        Trainer(nets, objective, batches(), critic_cfg, progress=False)
    assert estimate_memory(cfg, options).rows["optimizer states"][0] < \
        estimate_memory(*tiny_config()).rows["optimizer states"][0]


def test_on_an_accelerator_the_encoders_and_the_activations_are_not_counted_together(tmp_path):
    """The text encoders and the VAE visit an accelerator only between steps: its peak holds the larger of them and
    the activations, where CPU memory holds both; the cached embeddings stay in CPU memory."""
    from tests.test_text_to_image import save_tiny_pipeline

    cfg, options = load_config(None, ["teacher.kind=pretrained", f"teacher.pretrained={save_tiny_pipeline(tmp_path)}",
                                      "data.kind=captioned_shapes", "objective.name=dmd", "train.batch_size=4"])
    cpu = estimate_memory(cfg, options, process_memory=0)
    gpu = estimate_memory(cfg, options, process_memory=0, device="cuda")
    encoders, activations = cpu.rows["text encoders, VAE"][0], cpu.rows["activations"][0]
    assert encoders > 0 and activations > 0 and gpu.rows.keys() == cpu.rows.keys()
    # the prompt embeddings stay in CPU memory, a batch at a time on the accelerator
    caches = cpu.rows["caches"][0]
    assert caches > 0 and cpu.training - gpu.training == pytest.approx(min(encoders, activations) + caches)
