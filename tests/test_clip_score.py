"""CLIP score on a tiny random open_clip model built from a config (no download); prompts; offline errors."""

import importlib.util
import json
import time
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from fdistill.commands.clip_score import image_prompt_pairs
from fdistill.data.captions import PromptRecord, read_prompts
from fdistill.errors import ConfigError
from fdistill.metrics import clip_score

ROOT = Path(__file__).resolve().parent.parent
TINY = "fdistill-tiny-clip-test"
TINY_CONFIG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
PROMPTS = ["a red circle", "a blue square", "two green triangles", "a yellow digit seven"]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("clip_config") / f"{TINY}.json"
    path.write_text(json.dumps(TINY_CONFIG))
    open_clip.add_model_config(path)
    torch.manual_seed(0)
    return clip_score.load_clip(TINY, pretrained=None)


@pytest.fixture
def samples(tmp_path):
    folder = tmp_path / "samples"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(len(PROMPTS)):
        Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(folder / f"{i:03d}.png")
    lines = [json.dumps({"file": f"{i:03d}.png", "prompt": p}) for i, p in enumerate(PROMPTS)]
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def _manual_scores(model, files, prompts) -> torch.Tensor:
    """100 * max(cos, 0) from the model's own forward, which returns normalised embeddings."""
    preprocess = open_clip.create_model_and_transforms(TINY, pretrained=None)[2]
    pixels = torch.stack([preprocess(Image.open(f).convert("RGB")) for f in files])
    with torch.no_grad():
        image_emb, text_emb, _ = model(pixels, open_clip.get_tokenizer(TINY)(prompts))[:3]
    return 100 * (image_emb * text_emb).sum(-1).clamp(min=0)


def test_clip_score_equals_manual_cosine(tiny_model, samples):
    files = sorted(samples.glob("*.png"))
    scores = clip_score.clip_scores(files, PROMPTS, tiny_model, batch_size=3)
    torch.testing.assert_close(scores, _manual_scores(tiny_model.model, files, PROMPTS), rtol=1e-5, atol=1e-4)


def test_local_checkpoint_and_local_dir_give_the_same_scores(tiny_model, samples, tmp_path):
    state = {k: v.contiguous() for k, v in tiny_model.model.state_dict().items()}
    torch.save(state, tmp_path / "tiny.pt")
    local_dir = tmp_path / "tiny_dir"
    local_dir.mkdir()
    (local_dir / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CONFIG}))
    save_file(state, local_dir / "open_clip_model.safetensors")
    expected = _manual_scores(tiny_model.model, sorted(samples.glob("*.png")), PROMPTS)
    for model, pretrained in ((TINY, str(tmp_path / "tiny.pt")), (f"local-dir:{local_dir}", None)):
        result = clip_score.compute_clip_score(image_prompt_pairs(samples), model, pretrained, images_dir=samples,
                                               progress=False)
        assert result["num_images"] == 4 and result["model"] == model
        assert [r["prompt"] for r in result["per_image"]] == PROMPTS
        per_image = torch.tensor([r["score"] for r in result["per_image"]])
        torch.testing.assert_close(per_image, expected, rtol=1e-5, atol=1e-4)
        assert result["value"] == pytest.approx(float(expected.mean()), abs=1e-4)


def test_prompt_file_formats_pair_the_same_way(samples, tmp_path):
    expected = [(samples / f"{i:03d}.png", p) for i, p in enumerate(PROMPTS)]
    (tmp_path / "p.txt").write_text("\n".join(PROMPTS) + "\n")
    (tmp_path / "p.csv").write_text("file,prompt\n" + "".join(f"{f.name},{p}\n" for f, p in expected[::-1]))
    (samples / "metadata.jsonl").rename(samples / "moved.jsonl")
    (samples / "metadata.json").write_text(json.dumps({f.name: p for f, p in expected}))
    assert image_prompt_pairs(samples, tmp_path / "p.txt") == expected
    assert image_prompt_pairs(samples, tmp_path / "p.csv") == expected[::-1]
    assert image_prompt_pairs(samples) == expected
    assert image_prompt_pairs(samples, samples / "moved.jsonl") == expected
    (tmp_path / "short.txt").write_text("only one prompt\n")
    with pytest.raises(ConfigError, match="1 prompts for 4 images"):
        image_prompt_pairs(samples, tmp_path / "short.txt")


def test_one_reader_takes_the_image_column_as_image_or_file(samples, tmp_path):
    """Training prompt files name a prompt's image ``image``, CLIP-score metadata ``file``: the one reader of prompt
    files takes both, relative to the prompt file or to the folder it is given."""
    rows = [{"prompt": p, "image": f"samples/{i:03d}.png"} for i, p in enumerate(PROMPTS)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "train.csv").write_text("prompt,image\n" + "".join(f"{r['prompt']},{r['image']}\n" for r in rows))
    expected = [PromptRecord(p, samples / f"{i:03d}.png") for i, p in enumerate(PROMPTS)]
    assert read_prompts(tmp_path / "train.jsonl") == read_prompts(tmp_path / "train.csv") == expected
    assert read_prompts(samples / "metadata.jsonl") == expected
    assert image_prompt_pairs(tmp_path, tmp_path / "train.jsonl") == [(r.image, r.prompt) for r in expected]
    assert read_prompts(samples / "metadata.jsonl", image_root=tmp_path) == [
        PromptRecord(p, tmp_path / f"{i:03d}.png") for i, p in enumerate(PROMPTS)]
    (tmp_path / "half.jsonl").write_text(json.dumps(rows[0]) + "\n" + json.dumps({"prompt": "x"}) + "\n")
    with pytest.raises(ConfigError, match="1 of 2 prompts name no image"):
        image_prompt_pairs(samples, tmp_path / "half.jsonl")
    (tmp_path / "bad.jsonl").write_text(json.dumps({"text": "a cat"}) + "\n")
    with pytest.raises(ConfigError, match="record 0 has no 'prompt'"):
        read_prompts(tmp_path / "bad.jsonl")


def test_offline_named_tag_without_cache_fails_at_once(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(FileNotFoundError, match="local-dir:") as err:
        clip_score.load_clip("ViT-B-32", "openai", cache_dir=str(tmp_path))
    assert time.perf_counter() - start < 2.0 and "\n" not in str(err.value)
    with pytest.raises(FileNotFoundError, match="neither a file nor a tag"):
        clip_score.load_clip("ViT-B-32", str(tmp_path / "missing.pt"))


def test_cli_errors_are_one_line_exit_2(samples, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    spec = importlib.util.spec_from_file_location("eval_clip_score", ROOT / "eval" / "clip_score.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    runs = {"not cached": ["--images", str(samples), "--cache-dir", str(tmp_path)],
            "image folder not found": ["--images", str(tmp_path / "missing")],
            "prompts file not found": ["--images", str(samples), "--prompts", str(tmp_path / "none.txt")]}
    for message, argv in runs.items():
        assert cli.main([*argv, "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and message in err


def test_cli_json_output(tiny_model, samples, tmp_path, capsys):
    torch.save(tiny_model.model.state_dict(), tmp_path / "tiny.pt")
    spec = importlib.util.spec_from_file_location("eval_clip_score", ROOT / "eval" / "clip_score.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    assert cli.main(["--images", str(samples), "--model", TINY, "--pretrained", str(tmp_path / "tiny.pt"),
                     "--json", "--no-progress"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["metric"] == "CLIP score" and len(result["per_image"]) == 4
    assert result["value"] == pytest.approx(np.mean([r["score"] for r in result["per_image"]]), rel=1e-6)
