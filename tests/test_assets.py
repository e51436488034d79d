"""The shipped weights: they load, match their provenance, and stay small enough to ship."""

import json
from pathlib import Path

import pytest
import torch

from fdistill.data import DigitsDataset
from fdistill.metrics.features import DIGITS_CLASSIFIER_DIR, load_digits_classifier, weights_hash

ASSETS = Path(__file__).resolve().parent.parent / "fdistill" / "assets"
TEACHER_DIR = ASSETS / "digits_teacher"
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


@pytest.mark.parametrize(
    "path", [DIGITS_CLASSIFIER_DIR / "model.safetensors", TEACHER_WEIGHTS], ids=["classifier", "teacher"]
)
def test_weights_are_small_enough_to_ship(path):
    assert path.stat().st_size <= MAX_BYTES
