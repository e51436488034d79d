"""The captioned-shapes evaluators: the attribute classifier and the tiny CLIP reproduce their provenance, read
real images right and wrong captions as wrong, and name the script to run when their files are missing."""

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from fdistill.commands.clip_score import image_prompt_pairs
from fdistill.data.captions import ALL_COMBINATIONS, CaptionedShapes, caption
from fdistill.metrics import clip_score
from fdistill.metrics.attributes import (
    SHAPES_ATTRIBUTES_DIR,
    compositional_accuracy,
    load_attribute_classifier,
)
from fdistill.metrics.features import weights_hash
from fdistill.metrics.fid import FEATURE_DIMS, load_feature_net
from fdistill.metrics.image_sources import to_uint8_nchw

CLIP_DIR = clip_score.SHAPES_CLIP_DIR
PROMPTS = [caption(*c) for c in ALL_COMBINATIONS]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These small batches run fastest on one thread, and many times slower on two when the CPU is shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def provenance(folder):
    return json.loads((folder / "provenance.json").read_text())


def shapes(num_images: int, seed: int) -> tuple[torch.Tensor, list[tuple[int, int, int]]]:
    data = CaptionedShapes(num_images, split="all", seed=seed)
    return data.images, [data.attributes(i) for i in range(num_images)]


@pytest.fixture(scope="module")
def held_out_seed():
    """The images the provenance numbers were measured on (both assets use the same seed and count)."""
    recorded = provenance(SHAPES_ATTRIBUTES_DIR)["held_out_seed"]
    assert provenance(CLIP_DIR)["held_out_seed"]["seed"] == recorded["seed"]
    return shapes(recorded["num_images"], recorded["seed"])


def test_classifier_reproduces_recorded_held_out_seed_accuracy(held_out_seed):
    recorded = provenance(SHAPES_ATTRIBUTES_DIR)
    result = compositional_accuracy(load_attribute_classifier(), *held_out_seed)
    for key in ("accuracy", "colour", "shape", "position"):
        assert result[key] == pytest.approx(recorded["held_out_seed"][key], abs=1e-3), key
    assert result["accuracy"] >= 0.99
    assert weights_hash(SHAPES_ATTRIBUTES_DIR / "model.safetensors") == recorded["weights_sha256_16"]


def test_compositional_accuracy_is_one_on_real_combos_and_low_on_shuffled_ones():
    classifier = load_attribute_classifier()
    images, combos = shapes(240, seed=7)
    assert compositional_accuracy(classifier, images, combos, batch_size=100) == {
        "accuracy": 1.0, "colour": 1.0, "shape": 1.0, "position": 1.0}
    shuffled = combos[1:] + combos[:1]  # each image judged against its neighbour's caption
    wrong = compositional_accuracy(classifier, images, shuffled)
    assert wrong["accuracy"] < 0.1 and max(wrong["colour"], wrong["shape"], wrong["position"]) < 0.5
    upscaled = torch.nn.functional.interpolate(images[:48], scale_factor=2, mode="nearest")
    assert compositional_accuracy(classifier, upscaled, combos[:48])["accuracy"] == 1.0  # resized to 32 px
    with pytest.raises(ValueError, match="240 images but 239"):
        compositional_accuracy(classifier, images, combos[1:])


def test_fdistill_shapes_feature_net_is_the_classifier():
    net = load_feature_net("fdistill-shapes")
    images, _ = shapes(8, seed=3)
    uint8 = ((images + 1) * 127.5).round()
    assert net.name == "fdistill-shapes" and FEATURE_DIMS[net.name] == 64
    assert net.weights_hash == provenance(SHAPES_ATTRIBUTES_DIR)["weights_sha256_16"]
    expected = load_attribute_classifier().features(uint8 / 127.5 - 1)
    torch.testing.assert_close(net(uint8), expected)
    assert expected.shape == (8, 64)


def test_clip_reproduces_recorded_retrieval_and_scores(held_out_seed):
    recorded = provenance(CLIP_DIR)["held_out_seed"]
    clip = clip_score.load_shapes_clip()
    assert next(clip.model.parameters()).dtype == torch.float32
    images, combos = held_out_seed
    own = [caption(*c) for c in combos]
    shift = torch.randint(1, len(PROMPTS), (len(own),),
                          generator=torch.Generator().manual_seed(recorded["wrong_caption_seed"]))
    wrong = [PROMPTS[(PROMPTS.index(p) + int(s)) % len(PROMPTS)] for p, s in zip(own, shift, strict=True)]
    accuracy = clip_score.clip_retrieval_accuracy(clip, images, own, PROMPTS, batch_size=500)
    matching = clip_score.clip_score_tensors(clip, images, own, batch_size=500)
    mismatched = clip_score.clip_score_tensors(clip, images, wrong, batch_size=500)
    assert accuracy == pytest.approx(recorded["retrieval_accuracy"], abs=2e-3)
    assert matching == pytest.approx(recorded["clip_score_matching"], abs=0.05)
    assert mismatched == pytest.approx(recorded["clip_score_mismatched"], abs=0.05)
    assert accuracy > 0.9 and matching > mismatched + 30


def test_in_memory_clip_scores_equal_the_folder_route(tmp_path):
    images, combos = shapes(6, seed=5)
    prompts = [caption(*c) for c in combos]
    lines = []
    for i, pixels in enumerate(to_uint8_nchw(images)):  # as samples are saved
        Image.fromarray(pixels.permute(1, 2, 0).numpy()).save(tmp_path / f"{i}.png")
        lines.append(json.dumps({"file": f"{i}.png", "prompt": prompts[i]}))
    (tmp_path / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    folder = clip_score.compute_clip_score(image_prompt_pairs(tmp_path), f"local-dir:{CLIP_DIR}", progress=False)
    clip = clip_score.load_shapes_clip()
    assert clip_score.clip_score_tensors(clip, images, prompts) == pytest.approx(folder["value"], abs=1e-4)
    with pytest.raises(ValueError, match="not among the candidates"):
        clip_score.clip_retrieval_accuracy(clip, images, prompts, PROMPTS[:1])


@pytest.mark.parametrize("present", [None, "config.json", "open_clip_config.json"])
def test_missing_asset_files_name_the_file_and_the_script(tmp_path, present):
    """A config without weights included: open_clip alone would build a random model from it without a word."""
    if present:
        (tmp_path / present).write_text(json.dumps({"model_cfg": {}}))
    cases = ((load_attribute_classifier, "train_shapes_attributes.py",
              "model.safetensors" if present == "config.json" else "config.json"),
             (clip_score.load_shapes_clip, "train_shapes_clip.py",
              "open_clip_model.safetensors" if present == "open_clip_config.json" else "open_clip_config.json"))
    for loader, script, missing in cases:
        with pytest.raises(FileNotFoundError) as err:
            loader(path=tmp_path)
        message = str(err.value)
        assert f"{tmp_path / missing} is missing" in message and script in message and "\n" not in message


def test_assets_are_small():
    assert (SHAPES_ATTRIBUTES_DIR / "model.safetensors").stat().st_size < 300_000
    assert sum(f.stat().st_size for f in CLIP_DIR.iterdir()) < 4_000_000


@pytest.mark.parametrize("teacher, config", [("shapes_t2i_teacher", "quickstart_t2i.yaml"),
                                             ("shapes_flow_teacher", "quickstart_t2i_flow.yaml")])
def test_text_to_image_teacher_reproduces_its_recorded_metrics(teacher, config):
    """A shipped teacher under the protocol its provenance records (scripts/evaluate_shapes_t2i_teacher.py)."""
    from fdistill.recipes import load_config
    from fdistill.run import build_experiment

    root = Path(__file__).resolve().parent.parent
    evaluation = json.loads((root / f"fdistill/assets/{teacher}/provenance.json").read_text())["evaluation"]
    overrides = [f"{k}={v}" for k, v in evaluation["protocol"].items()]
    cfg, options = load_config(root / "configs" / config,
                               [*overrides, "eval.student_steps=[]", "eval.save_samples=false"])
    nets, _, task = build_experiment(cfg, options)
    results = {r["prompts"]: r for r in task.evaluate(nets, root / "unused")}
    for prompts, recorded in evaluation["metrics"].items():
        for key, value in recorded.items():
            assert results[prompts][key] == pytest.approx(value, rel=1e-3, abs=1e-3), (prompts, key)


def test_flow_teacher_shares_the_text_to_image_defaults_vae_and_text_encoder():
    """The flow-matching teacher was trained on the UNet teacher's frozen VAE and CLIP (its provenance says so):
    the weights are the same, and the pipeline loads with plain diffusers, its T5 slot empty."""
    from diffusers import DiffusionPipeline

    from fdistill.teachers import EMBEDDED_FLOW_TEACHER_DIR, EMBEDDED_T2I_TEACHER_DIR

    flow = DiffusionPipeline.from_pretrained(EMBEDDED_FLOW_TEACHER_DIR, text_encoder_3=None, tokenizer_3=None)
    unet = DiffusionPipeline.from_pretrained(EMBEDDED_T2I_TEACHER_DIR)
    assert type(flow).__name__ == "StableDiffusion3Pipeline" and flow.scheduler.config.shift == 3.0
    for name, p in unet.vae.state_dict().items():
        assert torch.equal(flow.vae.state_dict()[name], p), name
    for encoder in (flow.text_encoder, flow.text_encoder_2):
        weights = encoder.state_dict()
        for name, p in unet.text_encoder.state_dict().items():
            assert torch.equal(weights[f"text_model.{name}"], p), name
    assert flow.vae.config.shift_factor == 0.0
    size = sum(f.stat().st_size for f in EMBEDDED_FLOW_TEACHER_DIR.rglob("*.safetensors"))
    assert size < 12_000_000
