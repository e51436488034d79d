"""diffusers interoperability: teachers load from pipeline directories, students export to a stock diffusers
pipeline that samples bit for bit like ``Generator.sample`` without fdistill, and ``sample.py`` samples exported
students and teachers."""

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate.state import AcceleratorState
from diffusers import DDPMPipeline, DDPMScheduler, DiffusionPipeline, UNet2DConditionModel, UNet2DModel
from PIL import Image
from safetensors.torch import save_file

from fdistill.config import dump_config
from fdistill.containers import Batch
from fdistill.errors import ConfigError
from fdistill.networks.denoisers import MLPDenoiser, UNetDenoiser
from fdistill.networks.generator import Generator
from fdistill.pipelines.export import export_pipeline
from fdistill.pipelines.loading import load_diffusers_teacher
from fdistill.recipes import load_config
from fdistill.run import build_experiment, export_run, student_file
from fdistill.schedules import DiscreteVPSchedule, EDMSchedule
from fdistill.training.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
TINY_UNET = dict(sample_size=8, in_channels=1, out_channels=1, block_out_channels=[8, 16], layers_per_block=1,
                 norm_num_groups=4, down_block_types=["DownBlock2D", "DownBlock2D"],
                 up_block_types=["UpBlock2D", "UpBlock2D"])
TIMES = [999, 500]
LABELS = [0, 1, 2, 1]


def tiny_unet() -> UNet2DModel:
    """Random weights, four class embeddings (the last is fdistill's null class)."""
    torch.manual_seed(0)
    return UNet2DModel(**TINY_UNET, num_class_embeds=4)


def tiny_student(prediction_type="v_prediction") -> Generator:
    schedule = DiscreteVPSchedule.from_diffusers(DDPMScheduler())
    return Generator(UNetDenoiser(tiny_unet(), schedule, prediction_type), TIMES).eval()


def load_pipeline(path):
    pipe = DiffusionPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def reference_images(student, steps, seed=3):
    """What the exported pipeline must reproduce: ``Generator.sample`` with the pipeline's seeding."""
    g = torch.Generator().manual_seed(seed)
    z = student.noise(len(LABELS), generator=g)
    return (student.sample(z, torch.tensor(LABELS), steps=steps, generator=g) / 2 + 0.5).clamp(0, 1)


def pipeline_images(pipe, steps, seed=3):
    return pipe(batch_size=len(LABELS), class_labels=LABELS, num_inference_steps=None, timesteps=TIMES[:steps],
                generator=torch.Generator().manual_seed(seed), output_type="pt").images


# ------------------------------------------------------------------------------------------------- teachers


def test_teacher_pipeline_directory_loads_with_its_prediction_type_and_weights(tmp_path):
    unet, scheduler = tiny_unet(), DDPMScheduler(prediction_type="v_prediction", beta_schedule="squaredcos_cap_v2")
    DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(tmp_path)
    teacher = load_diffusers_teacher(tmp_path)
    assert isinstance(teacher, UNetDenoiser) and teacher.prediction_type == "v_prediction"
    assert torch.equal(teacher.schedule.log_alpha_bar, DiscreteVPSchedule.from_diffusers(scheduler).log_alpha_bar)
    loaded = teacher.unet.state_dict()
    assert loaded.keys() == unet.state_dict().keys()
    assert all(torch.equal(loaded[k], v) for k, v in unet.state_dict().items())
    assert load_diffusers_teacher(tmp_path, prediction_type="epsilon").prediction_type == "epsilon"


def test_hub_id_offline_fails_at_once_with_one_line():
    assert os.environ["HF_HUB_OFFLINE"] == "1"  # set by conftest before huggingface_hub reads it
    start = time.time()
    with pytest.raises(ConfigError) as e:
        load_diffusers_teacher("fdistill-test/no-such-teacher")
    assert time.time() - start < 10
    message = str(e.value)
    assert "\n" not in message and "teacher.pretrained" in message and "fdistill-test/no-such-teacher" in message


# --------------------------------------------------------------------------------------------------- export


@pytest.mark.parametrize("prediction_type", ["v_prediction", "epsilon"])
def test_exported_pipeline_is_stock_diffusers_and_samples_bit_for_bit_like_the_generator(tmp_path, prediction_type):
    student = tiny_student(prediction_type)
    out = export_pipeline(student, tmp_path / "pipe", {"objective": "test"})
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "ConsistencyModelPipeline"
    assert index["scheduler"] == ["diffusers", "LCMScheduler"] and index["unet"] == ["diffusers", "UNet2DModel"]
    pipe = load_pipeline(out)
    assert pipe.scheduler.config.prediction_type == prediction_type and pipe.scheduler.init_noise_sigma == 1.0
    assert torch.equal(pipe.scheduler.alphas_cumprod, student.schedule.alphas_cumprod)
    for steps in (1, 2):
        expected = reference_images(student, steps)
        got = pipeline_images(pipe, steps)
        assert got.dtype == expected.dtype and torch.equal(got, expected), (prediction_type, steps)
    assert not torch.equal(reference_images(student, 1), reference_images(student, 2))
    info = json.loads((out / "fdistill.json").read_text())
    assert info["student_times"] == TIMES and info["prediction_type"] == prediction_type
    assert info["objective"] == "test" and info["num_class_embeds"] == 4 and info["null_class"] == 3
    card = (out / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: diffusers\n") and "- test" in card and "timesteps=[999]" in card


def consistency_student(objective: str = "rcm") -> Generator:
    cfg, options = load_config(None, ["teacher.kind=unet", f"objective.name={objective}",
                                      "generator.times=[1.5676, 1.2]", "teacher.prediction_type=v_prediction"])
    cfg.teacher.unet = {**TINY_UNET, "num_class_embeds": 4}
    torch.manual_seed(0)
    return build_experiment(cfg, options)[0].student.eval()


@pytest.mark.slow
def test_plain_diffusers_loads_the_exports_without_fdistill(tmp_path):
    """A fresh interpreter that never imports fdistill samples v-, epsilon- and rCM students in 1 and 2 steps,
    equal to fdistill's samples."""
    cases = {}
    for name, student in (("v", tiny_student("v_prediction")), ("eps", tiny_student("epsilon")),
                          ("rcm", consistency_student())):
        served = student.servable()
        export_pipeline(student, tmp_path / name)
        cases[name] = [int(t) for t in served.times]
        torch.save({k: reference_images(served, k) for k in (1, 2)}, tmp_path / f"{name}.pt")
    script = f"""
import sys
import torch
from diffusers import DiffusionPipeline
for name, times in {cases!r}.items():
    pipe = DiffusionPipeline.from_pretrained({str(tmp_path)!r} + "/" + name)
    pipe.set_progress_bar_config(disable=True)
    expected = torch.load({str(tmp_path)!r} + f"/{{name}}.pt")
    for steps in (1, 2):
        images = pipe(batch_size=4, class_labels={LABELS}, num_inference_steps=None, timesteps=times[:steps],
                      generator=torch.Generator().manual_seed(3), output_type="pt").images
        assert torch.equal(images, expected[steps]), (name, steps, "not bit-exact")
assert not any(m == "fdistill" or m.startswith("fdistill.") for m in sys.modules), "fdistill was imported"
print("ok")
"""
    # CPU kernels may sum in another order with another thread count: give the child this process's count
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(torch.get_num_threads())}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300,
                          cwd=tmp_path)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


@pytest.mark.parametrize("objective", ["rcm", "scm"])
def test_consistency_students_export_at_their_matched_timesteps_and_plain_diffusers_reproduces_them(tmp_path,
                                                                                                   objective):
    """An sCM/rCM student at TrigFlow times is served as its UNet at the SNR-matched (rounded) teacher timesteps."""
    student = consistency_student(objective)
    served = student.servable()
    assert served.net is student.net.net and served.stock is not None
    assert served.times[0] == 999 and all(t == int(t) for t in served.times) and served.times[1] < 999
    out = export_pipeline(student, tmp_path / "pipe")
    assert json.loads((out / "fdistill.json").read_text())["student_times"] == [int(t) for t in served.times]
    expected = reference_images(served, 2)
    pipe = load_pipeline(out)
    got = pipe(batch_size=len(LABELS), class_labels=LABELS, num_inference_steps=None, timesteps=served.times,
               generator=torch.Generator().manual_seed(3), output_type="pt").images
    assert torch.equal(got, expected)


def test_export_refuses_students_it_cannot_represent(tmp_path):
    toy = Generator(MLPDenoiser(2, EDMSchedule()), [80.0])
    with pytest.raises(ValueError, match="export needs a diffusers UNet or transformer student"):
        export_pipeline(toy, tmp_path / "toy")
    torch.manual_seed(0)
    text_unet = UNet2DConditionModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                                     layers_per_block=1, norm_num_groups=4, cross_attention_dim=8,
                                     attention_head_dim=2, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                     up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    schedule = DiscreteVPSchedule.from_diffusers(DDPMScheduler())
    with pytest.raises(ValueError, match="exports with its teacher's VAE, text encoder and tokenizer"):
        export_pipeline(Generator(UNetDenoiser(text_unet, schedule), [999.0]), tmp_path / "text")
    assert not any(tmp_path.iterdir()), "a refused export must leave nothing behind"


def test_students_of_diffusers_teachers_sample_at_integer_timesteps_with_fresh_noise():
    schedule = DiscreteVPSchedule.from_diffusers(DDPMScheduler())
    with pytest.raises(ValueError, match="integer timesteps 0..999"):
        Generator(UNetDenoiser(tiny_unet(), schedule, "epsilon"), [999.0, 500.5])
    with pytest.raises(ValueError, match=r"range \[0, 999\], got \[2000.0\]"):
        Generator(UNetDenoiser(tiny_unet(), schedule, "epsilon"), [2000])
    student = tiny_student()
    with pytest.raises(ValueError, match="fresh noise"):
        student.sample(student.noise(2), torch.tensor([0, 1]), steps=2, mode="ode")


def test_export_replaces_an_earlier_export_but_nothing_else(tmp_path):
    out = tmp_path / "pipe"
    export_pipeline(tiny_student(), out, {"objective": "first"})
    export_pipeline(tiny_student(), out, {"objective": "second"})
    assert json.loads((out / "fdistill.json").read_text())["objective"] == "second"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipe"]  # no temporary or old directories left
    other = tmp_path / "run"
    other.mkdir()
    (other / "config.yaml").write_text("precious")
    with pytest.raises(ConfigError, match="not an exported pipeline"):
        export_pipeline(tiny_student(), other)
    assert (other / "config.yaml").read_text() == "precious"


@pytest.fixture(scope="module")
def image_run(tmp_path_factory):
    """A two-step DMD run on a tiny unconditional UNet teacher: a checkpoint with an EMA, and final weights."""
    AcceleratorState._reset_state(True)
    run_dir = tmp_path_factory.mktemp("image_run") / "run"
    run_dir.mkdir()
    source = run_dir.parent / "experiment.yaml"
    source.write_text(json.dumps({
        "teacher": {"kind": "unet", "unet": TINY_UNET}, "generator": {"times": [800, 400]},
        "objective": {"name": "dmd"}, "train": {"batch_size": 4}, "log": {"tensorboard": False},
        "ema": {"averages": [{"name": "ema", "decay": 0.5}]}, "eval": {"ema": "ema"}}))
    cfg, options = load_config(str(source), [f"run.dir={run_dir}"])
    (run_dir / "config.yaml").write_text(dump_config(cfg))
    nets, objective, _ = build_experiment(cfg, options)

    def batches():
        while True:
            yield Batch(size=4, real=torch.randn(4, 1, 8, 8).clamp(-1, 1))

    trainer = Trainer(nets, objective, batches(), cfg, run_dir=run_dir, progress=False)
    while trainer.ema.averages["ema"].updates < 2:
        trainer.train_step(trainer.step)
        trainer.step += 1
    trainer.save_checkpoint()
    weights = dict(trainer.student_weights())
    for name, state in weights.items():
        save_file({k: v.contiguous() for k, v in state.items()}, str(run_dir / student_file(name)))
    AcceleratorState._reset_state(True)
    return run_dir, weights, trainer.step, nets.student.times


def test_export_run_from_a_checkpoint_with_and_without_ema(image_run, tmp_path):
    run_dir, weights, steps, times = image_run
    assert not torch.equal(weights["ema"]["net.unet.conv_in.weight"], weights[None]["net.unet.conv_in.weight"])
    for ema in ("ema", None):
        out = export_run(run_dir, tmp_path / f"export-{ema}", checkpoint="latest", ema=ema)
        unet = UNet2DModel.from_pretrained(out / "unet")
        expected = {k.removeprefix("net.unet."): v for k, v in weights[ema].items()}
        assert all(torch.equal(v, expected[k]) for k, v in unet.state_dict().items()), ema
        info = json.loads((out / "fdistill.json").read_text())
        assert info["ema"] == ema and info["training_steps"] == steps and info["objective"] == "dmd"
        assert info["student_times"] == times and "results" not in info  # a checkpoint was never evaluated
    with pytest.raises(ConfigError, match="no EMA 'slow'"):
        export_run(run_dir, tmp_path / "export-slow", checkpoint="latest", ema="slow")
    with pytest.raises(ConfigError, match="not a checkpoint directory"):
        export_run(run_dir, tmp_path / "export-bad", checkpoint=str(tmp_path))


def test_sampling_a_run_and_its_export_gives_the_same_images(image_run, sample_cli, tmp_path):
    run_dir = image_run[0]
    out = export_run(run_dir)  # the finished run's eval.ema weights, into RUN_DIR/pipeline
    assert out == run_dir / "pipeline"
    for model in (run_dir, out):
        sample_cli(["--model", str(model), "--num", "3", "--steps", "2", "--out", str(tmp_path / f"{model.name}.npz")])
    from_run, from_export = (np.load(tmp_path / f"{name}.npz")["images"] for name in (run_dir.name, out.name))
    assert from_run.shape == (3, 8, 8, 1) and np.array_equal(from_run, from_export)


# ----------------------------------------------------------------------------------------------- sample.py


@pytest.fixture(scope="module")
def sample_cli():
    spec = importlib.util.spec_from_file_location("sample_cli", ROOT / "sample.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    return export_pipeline(tiny_student(), tmp_path_factory.mktemp("export") / "pipe")


def test_sample_cli_writes_folder_grid_and_npz(sample_cli, exported, tmp_path):
    common = ["--model", str(exported), "--num", "5", "--batch-size", "2", "--steps", "2", "--seed", "7"]
    sample_cli([*common, "--out", str(tmp_path / "npz.npz")])
    data = np.load(tmp_path / "npz.npz")
    assert data["images"].shape == (5, 8, 8, 1) and data["images"].dtype == np.uint8
    assert data["labels"].tolist() == [0, 1, 2, 0, 1] and int(data["nfe"]) == 2 and int(data["seed"]) == 7
    sample_cli([*common, "--out", str(tmp_path / "folder")])
    files = sorted((tmp_path / "folder").iterdir())
    assert [f.name for f in files] == [f"{i:06d}.png" for i in range(5)]
    for i, f in enumerate(files):
        image = Image.open(f)
        assert image.mode == "L" and np.array_equal(np.asarray(image), data["images"][i, :, :, 0])
    sample_cli([*common, "--out", str(tmp_path / "grid.png")])
    grid = Image.open(tmp_path / "grid.png")
    assert grid.mode == "L" and grid.size == (3 * 10 + 2, 2 * 10 + 2)  # 5 images of 8 px: 3 x 2, 2-px gaps
    sample_cli([*common, "--class-labels", "2,0", "--out", str(tmp_path / "labels.npz")])
    assert np.load(tmp_path / "labels.npz")["labels"].tolist() == [2, 0, 2, 0, 2]


def assert_one_line_error(capsys, call, fragment):
    with pytest.raises(SystemExit) as e:
        call()
    assert e.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], lines


@pytest.mark.parametrize("args, fragment", [
    (["--class-labels", "1,x"], "--class-labels"),
    (["--class-labels", "4"], "0..3"),
    (["--steps", "3"], "1..2 steps"),
])
def test_sample_cli_bad_input_is_one_line(sample_cli, exported, tmp_path, capsys, args, fragment):
    argv = ["--model", str(exported), "--num", "2", "--out", str(tmp_path / "x.npz"), *args]
    assert_one_line_error(capsys, lambda: sample_cli(argv), fragment)


def test_sample_cli_missing_model_is_one_line(sample_cli, tmp_path, capsys):
    argv = ["--model", str(tmp_path / "missing"), "--out", str(tmp_path / "x.npz")]
    assert_one_line_error(capsys, lambda: sample_cli(argv), "not found")


def test_sample_cli_samples_the_embedded_teacher(sample_cli, tmp_path):
    sample_cli(["--model", "embedded", "--steps", "2", "--num", "4", "--out", str(tmp_path / "t.npz")])
    data = np.load(tmp_path / "t.npz")
    assert data["images"].shape == (4, 16, 16, 1) and data["labels"].tolist() == [0, 1, 2, 3]
    assert int(data["nfe"]) == 2 and data["images"].std() > 0


def test_exports_record_paths_that_are_portable(tmp_path, monkeypatch):
    """No absolute path of the machine that made an export: below the working directory a path is relative,
    elsewhere it keeps its last two parts; a hub id is kept as it is."""
    from fdistill.pipelines.export import portable_path

    monkeypatch.chdir(tmp_path)
    assert portable_path(tmp_path / "runs" / "x") == "runs/x"
    assert portable_path("/elsewhere/runs/x/step-00000010") == "x/step-00000010"
    assert portable_path("me/hub-id") == "me/hub-id"
