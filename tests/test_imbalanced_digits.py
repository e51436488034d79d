"""Class-imbalanced digits: training images drawn with configured class frequencies, unconditional runs of the
imbalanced digits teacher's null class, and the class-frequency metric (frequencies and total-variation
distances)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fdistill.data.images import DigitsDataset, ImageBatches, ShapesDataset
from fdistill.errors import ConfigError
from fdistill.evaluation import class_statistics
from fdistill.evaluation.images import add_class_distances
from fdistill.metrics.class_frequencies import class_frequencies, sampling_floor, total_variation
from fdistill.recipes import load_config
from fdistill.run import build_experiment

ROOT = Path(__file__).resolve().parent.parent
CONFIG = str(ROOT / "configs/digits_imbalanced.yaml")
# the 99.9% quantile of chi-square with 9 degrees of freedom: a correct sampler fails it once in a thousand seeds
CHI2_9DOF_999 = 27.88
TINY_UNET = ("{sample_size: 16, in_channels: 1, out_channels: 1, block_out_channels: [8, 8], layers_per_block: 1, "
             "down_block_types: [DownBlock2D, DownBlock2D], up_block_types: [UpBlock2D, UpBlock2D], "
             "norm_num_groups: 8}")
# the quickstart's discriminator reads blocks of the digits UNet, which this two-block UNet lacks: its default blocks
UNCONDITIONAL_TEACHER = ["teacher.kind=unet", f"teacher.unet={TINY_UNET}", "teacher.prediction_type=v_prediction",
                         "objective.discriminator_features=null"]


def chi_square(counts: torch.Tensor, frequencies: torch.Tensor) -> float:
    expected = frequencies * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


def drawn_classes(stream, data: DigitsDataset, num_batches: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The true classes of the real images of ``num_batches`` batches (looked up from the images themselves,
    not from the batch's conditions) and the batches' conditions."""
    classes, conditions = [], []
    pixels = data.images.flatten(1)
    for _ in range(num_batches):
        batch = next(stream)
        match = (batch.real.flatten(1)[:, None] == pixels[None]).all(-1)
        assert (match.sum(1) >= 1).all()
        classes.append(data.labels[match.float().argmax(1)])
        conditions.append(batch.cond)
    return torch.cat(classes), torch.cat(conditions)


def test_the_imbalanced_config_draws_its_frequencies_and_conditions_on_the_null_class_only():
    cfg, options = load_config(CONFIG)
    assert cfg.data.unconditional and len(cfg.data.class_frequencies) == 10
    assert cfg.teacher.kind == "embedded_imbalanced"
    frequencies = torch.tensor(cfg.data.class_frequencies, dtype=torch.float64)
    frequencies /= frequencies.sum()
    assert frequencies[0] == pytest.approx(0.3) and frequencies[-1] == pytest.approx(0.02)
    _, objective, task = build_experiment(cfg, options)
    torch.manual_seed(0)
    classes, conditions = drawn_classes(task.batches(objective.needs_real_data), task.dataset, 40)
    counts = torch.bincount(classes, minlength=10).double()
    assert counts.sum() == 40 * cfg.train.batch_size
    assert chi_square(counts, frequencies) < CHI2_9DOF_999
    # the data's own (near-uniform) proportions fail the same test by far: the frequencies are really used
    assert chi_square(counts, task.dataset.labels.bincount().double() / len(task.dataset)) > 10 * CHI2_9DOF_999
    assert (conditions == 10).all()  # every network sees only the teacher's null class
    assert (task.conditions(5) == 10).all() and task.judge().fields["labels"].startswith("the null")


def test_the_protocol_keeps_conditions_apart_from_the_labels_accuracy_is_measured_against():
    _, _, task = build_experiment(*load_config(CONFIG))
    judge = task.judge()
    assert (judge.conditions == 10).all() and judge.labels is None
    _, _, task = build_experiment(*load_config(CONFIG, ["data.unconditional=false"]))
    judge = task.judge()
    assert torch.equal(judge.labels, torch.arange(len(judge.conditions)) % 10)
    assert torch.equal(judge.conditions, judge.labels) and judge.fields["labels"] == "i % 10 for sample i"


def test_class_statistics_give_frequencies_and_accuracy_only_against_labels():
    logits = torch.nn.functional.one_hot(torch.tensor([0, 0, 0, 1]), 3).float()
    stats = class_statistics(logits, None, 3)
    assert stats == {"class_frequencies": [0.75, 0.25, 0.0], "class_coverage": pytest.approx(2 / 3)}
    assert class_statistics(logits, torch.tensor([0, 1, 2, 1]), 3)["class_accuracy"] == 0.5


def test_class_frequencies_replay_under_a_seed_and_keep_labels_when_conditional():
    data = DigitsDataset(size=16)
    frequencies = [0.5, 0.5] + [0.0] * 8
    stream = iter(ImageBatches(data, 64, with_real=True, conditional=True, class_frequencies=frequencies))
    torch.manual_seed(3)
    a = next(stream)
    torch.manual_seed(3)
    b = next(stream)
    assert torch.equal(a.real, b.real) and torch.equal(a.cond, b.cond)
    classes, conditions = drawn_classes(iter([a]), data, 1)
    assert torch.equal(classes, conditions) and set(conditions.tolist()) == {0, 1}  # classes of weight 0 never come


def test_shapes_labels_are_the_labels_their_images_carry():
    data = ShapesDataset(num_images=30)
    assert data.labels.tolist() == [data[i][1] for i in range(30)]


def test_class_frequencies_and_total_variation_on_known_labels():
    f = class_frequencies(torch.tensor([0, 0, 1, 2]), 4)
    assert f.tolist() == [0.5, 0.25, 0.25, 0.0]
    assert total_variation(f, [0.25, 0.25, 0.25, 0.25]) == pytest.approx(0.25)
    assert total_variation(f, f) == 0.0
    assert total_variation([1.0, 0.0], [0.0, 1.0]) == 1.0
    # a student that drops the two rarest classes of the digits config loses exactly their mass
    ref = torch.tensor([0.3, 0.2, 0.14, 0.1, 0.08, 0.06, 0.045, 0.03, 0.025, 0.02], dtype=torch.float64)
    dropped = torch.cat([ref[:8] / ref[:8].sum(), torch.zeros(2, dtype=torch.float64)])
    assert total_variation(dropped, ref) == pytest.approx(0.045)
    with pytest.raises(ValueError, match="one length"):
        total_variation([0.5, 0.5], [1.0, 0.0, 0.0])
    with pytest.raises(ValueError, match="sum to 1"):
        total_variation([0.5, 0.6], [0.5, 0.5])
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        class_frequencies(torch.tensor([0, 4]), 4)


def test_sampling_floor_matches_the_tv_of_exact_samples():
    ref = torch.tensor([0.3, 0.2, 0.14, 0.1, 0.08, 0.06, 0.045, 0.03, 0.025, 0.02], dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    tvs = [total_variation(class_frequencies(torch.multinomial(ref, 1000, True, generator=g), 10), ref)
           for _ in range(200)]
    assert sum(tvs) / len(tvs) == pytest.approx(sampling_floor(ref, 1000), rel=0.1)


def test_evaluation_entries_get_frequencies_and_tvs_against_data_and_teacher():
    _, _, task = build_experiment(*load_config(CONFIG))
    student = [0.6, 0.4] + [0.0] * 8  # classes 0 and 1 only
    teacher = [0.1] * 10  # every class equally often
    results = [{"model": "student", "nfe": 1, "class_frequencies": student, "num_samples": 1000},
               {"model": "teacher", "nfe": 35, "class_frequencies": teacher, "num_samples": 1000}]
    add_class_distances(results, task.data_class_frequencies)
    s, t = results
    assert s["class_tv_to_teacher"] == pytest.approx(0.8) and "class_tv_to_teacher" not in t
    assert s["class_tv_to_data"] == pytest.approx(0.5)  # 1/2 (0.3 + 0.2 + the 0.5 of classes 2-9)
    assert t["class_tv_to_data"] == pytest.approx(0.34)  # 1/2 (0.2 + 0.1 + 0.04 + 0 + 0.02 + ... + 0.08)
    assert s["data_class_frequencies"][0] == pytest.approx(0.3)
    assert s["class_tv_floor"] == pytest.approx(sampling_floor(s["data_class_frequencies"], 1000))


@pytest.mark.parametrize("override, message", [
    ("data.class_frequencies=[0.5,0.5]", "2 class frequencies for 10 classes; give one per class"),
    ("data.class_frequencies=[1,1,1,1,1,1,1,1,1,1,1]", "11 class frequencies for 10 classes"),
])
def test_a_wrong_number_of_frequencies_names_the_fix(override, message):
    cfg, options = load_config(CONFIG, [override])
    _, objective, task = build_experiment(cfg, options)
    with pytest.raises(ConfigError, match=message):
        task.batches(objective.needs_real_data)


@pytest.mark.parametrize("overrides, message", [
    (["data.class_frequencies=[0.5,-0.1,0.6,0,0,0,0,0,0,0]"], "non-negative"),
    (["data.class_frequencies=[0,0,0,0,0,0,0,0,0,0]"], "not all zero"),
    (["data.kind=teacher", "teacher.kind=ring"], "data.class_frequencies needs class-labelled image data"),
    (["data.kind=captioned_shapes"], "data.class_frequencies needs class-labelled image data"),
])
def test_bad_frequencies_or_data_without_classes_are_refused_at_load(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(CONFIG, overrides)
    with pytest.raises(ConfigError, match="data.unconditional is read with class-labelled image data"):
        load_config(None, ["data.unconditional=true"])


def test_unconditional_runs_refuse_what_they_cannot_use():
    cfg, options = load_config(CONFIG, ["teacher.guidance_scale=2"])
    _, objective, task = build_experiment(cfg, options)
    with pytest.raises(ConfigError, match="guides towards a class"):
        task.batches(objective.needs_real_data)
    cfg, options = load_config(CONFIG, UNCONDITIONAL_TEACHER)
    _, objective, task = build_experiment(cfg, options)
    with pytest.raises(ConfigError, match="unconditional already"):
        task.batches(objective.needs_real_data)


def test_a_folder_without_classes_refuses_class_frequencies(tmp_path):
    from PIL import Image

    Image.new("L", (16, 16)).save(tmp_path / "a.png")
    cfg, options = load_config(CONFIG, [*UNCONDITIONAL_TEACHER, "data.unconditional=false", "data.kind=folder",
                                        f"data.path={tmp_path}"])
    _, _, task = build_experiment(cfg, options)
    with pytest.raises(ConfigError, match="one sub-folder per class"):
        task.judge()


@pytest.mark.slow
def test_a_tiny_unconditional_run_reports_class_frequencies(tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "train.py"), "--config", CONFIG, "--no-progress", f"run.dir={run}",
           "train.steps=2", "train.batch_size=8", "eval.num_samples=80", "eval.teacher_steps=2", "checkpoint.every=0",
           "log.sample_every=2", "eval.save_samples=false"]
    subprocess.run(cmd, check=True, cwd=tmp_path, capture_output=True, text=True)
    results = json.loads((run / "metrics.json").read_text())["results"]
    assert [r["model"] for r in results] == ["student", "teacher"]
    for r in results:
        assert "class_accuracy" not in r and r["labels"] == "the null class 10 for every sample (unconditional)"
        assert sum(r["class_frequencies"]) == pytest.approx(1, abs=1e-3) and 0 <= r["class_tv_to_data"] <= 1
    assert 0 <= results[0]["class_tv_to_teacher"] <= 1
