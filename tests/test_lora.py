"""LoRA students (``student.lora``): only the adapters train, the student file holds them alone and reloads
exactly, and the export merges them into a stock diffusers UNet that samples like the student."""

import json

import pytest
import torch
from accelerate.state import AcceleratorState
from diffusers import DiffusionPipeline, UNet2DModel
from safetensors.torch import load_file

from fdistill.config import dump_config
from fdistill.containers import Batch
from fdistill.errors import ConfigError
from fdistill.networks.lora import is_adapter_weight, load_student_file, merged_network
from fdistill.pipelines.export import export_pipeline
from fdistill.recipes import load_config
from fdistill.run import build_experiment, export_run, load_run, save_student_files, student_file
from fdistill.training.trainer import Trainer
from tests.helpers import adapters, randomise_adapters

TINY_UNET = dict(sample_size=8, in_channels=1, out_channels=1, block_out_channels=[8, 16], layers_per_block=1,
                 down_block_types=["DownBlock2D", "DownBlock2D"], up_block_types=["UpBlock2D", "UpBlock2D"],
                 norm_num_groups=4, num_class_embeds=4)
LORA = ["teacher.kind=unet", "teacher.prediction_type=v_prediction", "objective.name=dmd", "objective.critic_steps=1",
        "generator.times=[999,500]", "student.lora.rank=2", "train.batch_size=4", "log.tensorboard=false"]
LABELS = [0, 1, 2, 1]


def tiny_experiment(*overrides):
    cfg, options = load_config(None, [*LORA, *overrides])
    cfg.teacher.unet = dict(TINY_UNET)
    return cfg, options, *build_experiment(cfg, options)[:2]


def batches():
    while True:
        yield Batch(size=4, real=torch.randn(4, 1, 8, 8).clamp(-1, 1), cond=torch.tensor(LABELS))


def count(params) -> int:
    return sum(p.numel() for p in params)


@torch.no_grad()
def student_output(student, seed=3):
    z = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(seed))
    return student.sample(z, torch.tensor(LABELS), steps=2, generator=torch.Generator().manual_seed(seed))


def test_gradients_reach_only_the_adapters_and_only_they_change():
    AcceleratorState._reset_state(True)
    cfg, _, nets, objective = tiny_experiment("fake_score.lora.rank=2")
    trainer = Trainer(nets, objective, batches(), cfg, progress=False)
    for kind in ("generator", "critic"):
        trained = [p for g in trainer.optimizers[kind].param_groups for p in g["params"]]
        network = nets.student if kind == "generator" else nets.fake_score
        assert {id(p) for p in trained} == {id(p) for p in adapters(network).values()}, kind
    before = {name: p.detach().clone() for name, p in nets.student.named_parameters()}
    for step, kind in enumerate(("critic", "generator")):
        assert trainer.train_step(step)[0] == kind
        network = nets.fake_score if kind == "critic" else nets.student
        for name, p in network.named_parameters():
            assert is_adapter_weight(name) or p.grad is None or not p.grad.any(), (kind, name)
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in adapters(network).values()), kind
        assert all(p.grad is None for n, p in nets.teacher.named_parameters() if not is_adapter_weight(n))
    changed = {name for name, p in nets.student.named_parameters() if not torch.equal(p, before[name])}
    assert changed and all(is_adapter_weight(name) for name in changed)
    AcceleratorState._reset_state(True)


def test_only_the_adapters_train_on_the_digits_teacher():
    cfg, options = load_config(None, ["teacher.kind=embedded", "objective.name=dmd", "student.lora={}"])
    nets = build_experiment(cfg, options)[0]
    student = nets.student
    trainable = [p for p in student.parameters() if p.requires_grad]
    assert count(trainable) == count(adapters(student).values()) > 0
    assert count(trainable) == count(student.parameters())  # the frozen base is the teacher's, not the student's
    base = count(p for n, p in nets.teacher.named_parameters() if not is_adapter_weight(n))
    assert count(trainable) < 0.25 * base
    assert count(p for p in nets.fake_score.parameters() if p.requires_grad) == base  # a full copy
    with torch.no_grad():  # the adapters start at zero: the student starts as the teacher
        x, t, cond = torch.randn(2, 1, 16, 16), torch.tensor([500.0, 900.0]), torch.tensor([3, 7])
        assert torch.equal(student.net(x, t, cond), nets.teacher(x, t, cond))


def test_student_file_reloads_exactly_and_merged_equals_unmerged(tmp_path):
    cfg, options, nets, _ = tiny_experiment(f"run.dir={tmp_path}")
    student = nets.student
    randomise_adapters(student)
    expected = student_output(student)
    (tmp_path / "config.yaml").write_text(dump_config(cfg))
    save_student_files(tmp_path, [(None, student.state_dict())])
    saved = load_file(str(tmp_path / student_file(None)))
    assert saved.keys() == adapters(student).keys()
    _, loaded, _ = load_run(tmp_path, ema=None)
    assert torch.equal(student_output(loaded.student), expected)
    assert not torch.equal(student_output(build_experiment(cfg, options)[0].student), expected)

    merged = merged_network(student.net)
    assert merged.state_dict().keys() == UNet2DModel(**TINY_UNET).state_dict().keys()
    assert torch.equal(student_output(student), expected)  # merging works on a copy
    x, t, cond = torch.randn(4, 1, 8, 8), torch.tensor([999.0, 700.0, 300.0, 20.0]), torch.tensor(LABELS)
    with torch.no_grad():
        assert torch.allclose(merged(x, t, class_labels=cond).sample, student.net.network_output(x, t, cond),
                              atol=1e-5, rtol=1e-5)

    other, _ = load_config(None, [*LORA, "student.lora.rank=3"])
    other.teacher.unet = dict(TINY_UNET)
    with pytest.raises(ConfigError, match="student.lora"):
        load_student_file(build_experiment(other, options)[0].student, saved)


def test_exported_pipeline_samples_like_the_lora_student(tmp_path):
    _, _, nets, _ = tiny_experiment()
    student = nets.student.eval()
    randomise_adapters(student)
    out = export_pipeline(student, tmp_path / "pipe", {"objective": "dmd"})
    unet = UNet2DModel.from_pretrained(out / "unet")
    assert unet.state_dict().keys() == UNet2DModel(**TINY_UNET).state_dict().keys()
    pipe = DiffusionPipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    for steps in (1, 2):
        g = torch.Generator().manual_seed(3)
        with torch.no_grad():
            z = student.noise(len(LABELS), generator=g)
            expected = (student.sample(z, torch.tensor(LABELS), steps=steps, generator=g) / 2 + 0.5).clamp(0, 1)
        got = pipe(batch_size=len(LABELS), class_labels=LABELS, num_inference_steps=None,
                   timesteps=student.times[:steps], generator=torch.Generator().manual_seed(3),
                   output_type="pt").images
        assert torch.allclose(got, expected, atol=1e-5), steps


def test_checkpoint_with_ema_resumes_and_exports_the_lora_student(tmp_path):
    AcceleratorState._reset_state(True)
    run_dir = tmp_path / "run"
    cfg, options, nets, objective = tiny_experiment(f"run.dir={run_dir}", "ema.averages=[{name: ema, decay: 0.5}]")
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(dump_config(cfg))
    trainer = Trainer(nets, objective, batches(), cfg, run_dir=run_dir, progress=False)
    for step in range(4):
        trainer.train_step(step)
    trainer.step = 4
    assert trainer.ema.params.keys() == adapters(nets.student).keys()
    path = trainer.save_checkpoint()
    weights = trainer.student_weights()
    save_student_files(run_dir, weights)
    assert load_file(str(run_dir / student_file("ema"))).keys() == adapters(nets.student).keys()

    resumed = build_experiment(cfg, options)[0]
    Trainer(resumed, objective, batches(), cfg, run_dir=run_dir, progress=False).load_checkpoint(path)
    assert all(torch.equal(v, resumed.student.state_dict()[k]) for k, v in nets.student.state_dict().items())

    out = export_run(run_dir, tmp_path / "export", checkpoint="latest", ema="ema")
    with trainer.ema.swapped("ema"):
        expected = merged_network(nets.student.net).state_dict()
    exported = UNet2DModel.from_pretrained(out / "unet").state_dict()
    assert exported.keys() == expected.keys()
    assert all(torch.allclose(exported[k], v) for k, v in expected.items())
    assert json.loads((out / "fdistill.json").read_text())["ema"] == "ema"
    AcceleratorState._reset_state(True)


@pytest.mark.parametrize("override, fragment", [
    ("student.lora.rnak=4", "student.lora.rank"),
    ("student.lora.rank=0", "positive"),
    ("student.lora.rank=-2", "positive"),
    ("student.lora.alpha=0", "positive"),
    ("student.lora.target_modules=[]", "target_modules"),
])
def test_bad_lora_settings_are_one_line_config_errors(override, fragment):
    with pytest.raises(ConfigError, match=fragment) as e:
        load_config(None, ["teacher.kind=unet", override])
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("overrides, fragment", [
    (["teacher.kind=ring", "student.lora={}"], "remove student.lora"),
    ([*LORA, "student.lora.target_modules=[no_such_layer]"], "target_modules"),
    (["teacher.kind=unet", "objective.name=scm", "generator.times=[1.5]", "fake_score.lora={}"],
     "trains no fake score"),
])
def test_lora_that_cannot_apply_is_a_one_line_config_error(overrides, fragment):
    cfg, options = load_config(None, overrides)
    if cfg.teacher.kind == "unet":
        cfg.teacher.unet = dict(TINY_UNET)
    with pytest.raises(ConfigError, match=fragment) as e:
        build_experiment(cfg, options)
    assert "\n" not in str(e.value)
