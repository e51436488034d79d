"""The shipped weights: they load, match their provenance, and stay small enough to ship."""

import json
from pathlib import Path

import pytest
import torch

from fdistill.data import DigitsDataset
from fdistill.metrics.features import DIGITS_CLASSIFIER_DIR, load_digits_classifier, weights_hash

ASSETS = Path(__file__).resolve().parent.parent / "fdistill" / "assets"
TEACHER_DIR = ASSETS / "digits_teacher"
IMBALANCED_TEACHER_DIR = ASSETS / "digits_imbalanced_teacher"
MAX_BYTES = 5 * 1024 * 1024


def test_classifier_reaches_recorded_held_out_accuracy():
    provenance = json.loads((DIGITS_CLASSIFIER_DIR / "provenance.json").read_text())
    model = load_digits_classifier()
    test = DigitsDataset("test")
    with torch.no_grad():
        accuracy = (model(test.images).argmax(1) == test.labels).float().mean().item()
        features = model.features(test.images[:4])
    assert accuracy == pytest.approx(provenance["held_out_accuracy"], abs=0.01)
    assert accuracy > 0.95
    assert features.shape == (4, 64)
    assert weights_hash() == provenance["weights_sha256_16"]


def test_missing_classifier_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_digits_classifier(path=tmp_path)


def test_teacher_loads_with_diffusers_and_samples():
    from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel

    unet = UNet2DModel.from_pretrained(TEACHER_DIR, subfolder="unet").eval()
    scheduler = DDPMScheduler.from_pretrained(TEACHER_DIR, subfolder="scheduler")
    assert scheduler.config.prediction_type == "v_prediction" and unet.config.num_class_embeds == 11
    ddim = DDIMScheduler.from_config(scheduler.config)
    ddim.set_timesteps(6)
    labels = torch.arange(20) % 10
    x = torch.randn(20, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for t in ddim.timesteps:
            x = ddim.step(unet(x, t, class_labels=labels).sample, t, x).prev_sample
        predicted = load_digits_classifier()(x.clamp(-1, 1)).argmax(1)
    assert x.shape == (20, 1, 16, 16) and torch.isfinite(x).all()
    assert (predicted == labels).float().mean() >= 0.7  # a 6-step sample already shows the asked-for digit


def test_teacher_provenance_records_its_metric():
    metric = json.loads((TEACHER_DIR / "provenance.json").read_text())["metric"]
    assert metric["num_samples"] == 1000 and metric["fd"] > 0 and 0 <= metric["label_accuracy"] <= 1


TEACHER_WEIGHTS = TEACHER_DIR / "unet" / "diffusion_pytorch_model.safetensors"
IMBALANCED_TEACHER_WEIGHTS = IMBALANCED_TEACHER_DIR / "unet" / "diffusion_pytorch_model.safetensors"


@pytest.mark.parametrize(
    "path", [DIGITS_CLASSIFIER_DIR / "model.safetensors", TEACHER_WEIGHTS, IMBALANCED_TEACHER_WEIGHTS],
    ids=["classifier", "teacher", "imbalanced teacher"],
)
def test_weights_are_small_enough_to_ship(path):
    assert path.stat().st_size <= MAX_BYTES


# the TV to its target frequencies that the imbalanced teacher reached (1000 samples, where exact samples of the
# target show a TV of about 0.034)
IMBALANCED_TEACHER_TV = 0.062


def without_names(config: dict) -> dict:
    """A diffusers config without the entries that name where and by which version it was saved."""
    return {k: v for k, v in config.items() if not k.startswith("_")}


def test_imbalanced_teacher_is_the_digits_teacher_architecture():
    from diffusers import DDPMScheduler, UNet2DModel

    from fdistill.recipes import load_config
    from fdistill.teachers import build_teacher

    directories = (TEACHER_DIR, IMBALANCED_TEACHER_DIR)
    unets = [UNet2DModel.from_pretrained(d, subfolder="unet") for d in directories]
    schedulers = [DDPMScheduler.from_pretrained(d, subfolder="scheduler") for d in directories]
    assert without_names(unets[0].config) == without_names(unets[1].config)
    assert without_names(schedulers[0].config) == without_names(schedulers[1].config)
    shapes = [{name: p.shape for name, p in unet.named_parameters()} for unet in unets]
    assert shapes[0] == shapes[1] and not torch.equal(unets[0].class_embedding.weight, unets[1].class_embedding.weight)
    teacher = build_teacher(load_config(None, ["teacher.kind=embedded_imbalanced"])[0])
    assert teacher.num_class_embeds == 11 and teacher.prediction_type == "v_prediction"
    assert teacher.sample_shape == (1, 16, 16)


def test_imbalanced_teacher_provenance_records_frequencies_near_its_target():
    from omegaconf import OmegaConf

    from fdistill.metrics.class_frequencies import total_variation

    provenance = json.loads((IMBALANCED_TEACHER_DIR / "provenance.json").read_text())
    metric, null = provenance["metric"], provenance["metric"]["null_class"]
    assert (metric["num_samples"], metric["seed"], provenance["config"]["eval"]["steps"]) == (1000, 1234, 35)
    assert weights_hash() in metric["classifier"]
    target = OmegaConf.load(Path(__file__).resolve().parent.parent / "configs/digits_imbalanced.yaml").data
    assert null["target_frequencies"] == pytest.approx(target.class_frequencies)
    assert sum(null["class_frequencies"]) == pytest.approx(1)
    assert null["tv_to_target"] == pytest.approx(total_variation(null["class_frequencies"], null["target_frequencies"]),
                                                 abs=1e-4)
    assert null["tv_to_target"] <= IMBALANCED_TEACHER_TV
    assert metric["conditional"]["label_accuracy"] >= 0.95  # the digits 0..9 stay conditional classes
    assert provenance["train_wall_time_s"] < 12 * 60 and provenance["threads"] == 1


def test_imbalanced_teacher_null_class_draws_zeros_most_often():
    """200 null-class samples of 8 Euler steps: digit 0 (frequency 0.3) leads, where the digits teacher is balanced."""
    from fdistill.recipes import load_config
    from fdistill.samplers.ode import sample_ode
    from fdistill.teachers import build_teacher

    teacher = build_teacher(load_config(None, ["teacher.kind=embedded_imbalanced"])[0])
    z = torch.randn((200, *teacher.sample_shape), generator=torch.Generator().manual_seed(0))
    x, _ = sample_ode(teacher, z, 8, "euler", torch.full((200,), 10))
    with torch.no_grad():
        counts = torch.bincount(load_digits_classifier()(x.clamp(-1, 1)).argmax(1), minlength=10)
    assert counts.argmax() == 0 and counts[0] >= 0.2 * 200
