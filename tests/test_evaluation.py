"""The one evaluation loop: every task draws and judges its samples through it, a stale sample folder goes for
every task, every entry records the protocol, per-prompt diversity on constructed cases, an export that names no
path of the machine that made it, and ``sample.py`` drawing what the evaluation draws."""

import json
import os
from pathlib import Path

import pytest
import torch

from fdistill.evaluation import loop
from fdistill.evaluation.text import SHAPES_CLIP_NAME, portable_clip_name
from fdistill.metrics.clip_score import LOCAL_DIR, SHAPES_CLIP_DIR
from fdistill.metrics.diversity import group_diversity, mean_pairwise_distance
from fdistill.recipes import load_config
from fdistill.run import build_experiment, export_metadata

ROOT = Path(__file__).resolve().parent.parent

# task -> (config, overrides, the loop's draws: one per sampler and sample set)
TASKS = {
    "toy": ("ring_f_distill_js.yaml", ["eval.num_samples=200", "eval.teacher_steps=4"], 2),
    "images": ("quickstart.yaml", ["eval.num_samples=80", "eval.teacher_steps=2", "eval.student_steps=[1,2]",
                                   "generator.times=[999,500]"], 3),
    "text-to-image": ("quickstart_t2i_flow.yaml", ["eval.num_samples=80", "eval.teacher_steps=2",
                                                   "eval.student_steps=[1]"], 4),
}
STALE = "student_nfe9"  # a sample folder no sampler of these evaluations writes


@pytest.fixture(scope="module")
def evaluations(tmp_path_factory):
    """Each task's evaluation, run once per module when a test first asks for it."""
    done = {}

    def get(name):
        if name not in done:
            done[name] = evaluate(name, tmp_path_factory)
        return done[name]

    return get


@pytest.fixture(params=sorted(TASKS))
def evaluated(request, evaluations):
    return evaluations(request.param)


def evaluate(name, tmp_path_factory):
    """A task's evaluation with a spy on the loop's drawing and a stale sample folder beside a preview."""
    config, overrides, draws = TASKS[name]
    cfg, options = load_config(ROOT / "configs" / config, overrides)
    torch.manual_seed(0)
    nets, _, task = build_experiment(cfg, options)
    run_dir = tmp_path_factory.mktemp(name)
    stale, preview = run_dir / "samples" / STALE, run_dir / "samples" / "step-00000001.png"
    stale.mkdir(parents=True)
    (stale / "000000.png").write_bytes(b"an earlier evaluation")
    preview.write_bytes(b"a training preview")
    calls = []

    def spy(*args, **kwargs):
        calls.append(args[1])
        return real(*args, **kwargs)

    real = loop.draw_samples
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(loop, "draw_samples", spy)
        results = task.evaluate(nets, run_dir)
    return {"name": name, "cfg": cfg, "options": options, "nets": nets, "task": task, "draws": draws,
            "run_dir": run_dir, "calls": calls, "results": results}


def test_every_task_draws_every_sampler_through_the_one_loop(evaluated):
    """A task that sampled outside the loop would leave the spy with fewer draws than entries."""
    results, ec = evaluated["results"], evaluated["cfg"].eval
    assert len(evaluated["calls"]) == len(results) == evaluated["draws"]
    assert evaluated["calls"] == [ec.num_samples] * len(results)
    assert [r["model"] for r in results][-1] == "teacher"


def test_every_entry_records_the_same_protocol(evaluated):
    ec = evaluated["cfg"].eval
    for entry in evaluated["results"]:
        assert entry["num_samples"] == ec.num_samples and entry["seed"] == ec.seed
        assert entry["samples_per_second"] > 0
        if entry["model"] == "teacher":
            assert entry["sampler"] == ec.teacher_sampler and "renoise" not in entry
        else:
            assert ("renoise" in entry) == (entry["nfe"] > 1) and "sampler" not in entry


def test_a_stale_sample_folder_is_cleared_for_every_task(evaluated):
    samples = evaluated["run_dir"] / "samples"
    assert not (samples / STALE).exists()
    assert (samples / "step-00000001.png").read_bytes() == b"a training preview"
    folders = sorted(p.name for p in samples.iterdir() if p.is_dir())
    if evaluated["name"] == "toy":
        assert folders == []  # points, not images: nothing is written
    else:
        assert len(folders) == evaluated["draws"]
        assert all(len(list((samples / f).glob("*.png"))) == evaluated["cfg"].eval.num_samples for f in folders)


def test_diversity_is_reported_for_student_and_teacher(evaluated):
    key = {"toy": None, "images": "class_diversity", "text-to-image": "prompt_diversity"}[evaluated["name"]]
    for entry in evaluated["results"]:
        assert (key in entry and entry[key] > 0) if key else not any("diversity" in k for k in entry)


def test_identical_samples_have_no_diversity():
    assert group_diversity(torch.ones(6, 3), torch.tensor([0, 0, 0, 1, 1, 1])) == 0.0


def test_two_points_have_their_distance_and_prompts_count_equally():
    assert mean_pairwise_distance([[0.0, 0.0], [3.0, 4.0]]) == pytest.approx(5.0)
    features = torch.tensor([[0.0, 0.0], [3.0, 4.0], [1.0, 1.0], [1.0, 2.0], [1.0, 3.0], [9.0, 9.0]])
    groups = torch.tensor([0, 0, 1, 1, 1, 2])  # prompt 2 has one sample: no pair, left out
    assert group_diversity(features, groups) == pytest.approx((5.0 + (1 + 2 + 1) / 3) / 2)
    with pytest.raises(ValueError, match="two samples"):
        group_diversity(features[:2], torch.tensor([0, 1]))


def test_collapsed_samples_have_a_diversity_ratio_below_one():
    """Per prompt, a collapsed student repeats one sample of the teacher's: the mixture over prompts is still the
    teacher's spread, but its diversity is far below the teacher's."""
    g = torch.Generator().manual_seed(0)
    groups = torch.arange(400) % 8
    centres = 10 * torch.randn(8, 16, generator=g)
    teacher = centres[groups] + torch.randn(400, 16, generator=g)
    student = centres[groups] + 0.1 * torch.randn(8, 16, generator=g)[groups] + 0.01 * torch.randn(400, 16,
                                                                                                    generator=g)
    ratio = group_diversity(student, groups) / group_diversity(teacher, groups)
    assert ratio < 0.1
    assert group_diversity(teacher[torch.randperm(400, generator=g)], groups) > group_diversity(teacher, groups)


def test_clip_models_are_named_without_a_path_of_this_machine():
    assert portable_clip_name(f"{LOCAL_DIR}{SHAPES_CLIP_DIR}") == SHAPES_CLIP_NAME
    assert portable_clip_name(f"{LOCAL_DIR}/home/someone/models/my_clip") == f"{LOCAL_DIR}my_clip"
    assert portable_clip_name("ViT-B-32") == "ViT-B-32"


def test_an_export_records_no_absolute_path(evaluations, tmp_path, monkeypatch):
    """The flow quickstart's export, with the metrics its run records: no absolute path in fdistill.json or the
    model card (the CLIP model is named by the shipped asset)."""
    evaluated = evaluations("text-to-image")
    monkeypatch.chdir(tmp_path)
    cfg, options, task = evaluated["cfg"], evaluated["options"], evaluated["task"]
    metadata = export_metadata(cfg, options, 0, cfg.eval.ema, "runs/quickstart_t2i_flow")
    out = task.export(evaluated["nets"].student, Path("pipeline"), {**metadata, "results": evaluated["results"]})
    info = json.loads((out / "fdistill.json").read_text())

    def strings(value):
        if isinstance(value, dict):
            return [s for v in value.values() for s in strings(v)]
        if isinstance(value, list):
            return [s for v in value for s in strings(v)]
        return [value] if isinstance(value, str) else []

    assert not [s for s in strings(info) if os.path.isabs(s) or str(ROOT) in s]
    assert {r["clip_model"] for r in info["results"]} == {SHAPES_CLIP_NAME}
    assert str(ROOT) not in (out / "README.md").read_text() and SHAPES_CLIP_NAME in (out / "README.md").read_text()


def test_the_sample_command_draws_what_the_evaluation_draws():
    from fdistill.commands.sample import student_sampler, teacher_sampler
    from fdistill.evaluation import student_samples, teacher_samples
    from fdistill.evaluation.sampling import draw_samples

    cfg, options = load_config(ROOT / "configs" / "ring_f_distill_js.yaml", [])
    nets, _, _ = build_experiment(cfg, options)
    command = student_sampler(nets.student.servable(), 1, None, "cpu")
    drawn, _ = draw_samples(command.draw, 20, torch.Generator().manual_seed(5), None, 7)
    assert torch.equal(drawn, student_samples(nets, 20, 1, 5, batch_size=7))
    command = teacher_sampler(nets.teacher, 4, "heun", "cpu")
    drawn, nfe = draw_samples(command.draw, 20, torch.Generator().manual_seed(5), None, 7)
    expected, expected_nfe = teacher_samples(nets, 20, 4, "heun", 5, batch_size=7)
    assert torch.equal(drawn, expected) and nfe == expected_nfe
