"""``data.cache_dir``: prompt embeddings and real latents written once and read by later runs without running the
encoders; a changed text encoder or VAE writes its own entries instead of reading another's."""

import shutil
from unittest import mock

import pytest
import torch
from diffusers import AutoencoderKL
from transformers import CLIPTextModel

from fdistill.errors import ConfigError
from fdistill.pipelines.cache import LatentCache
from tests.helpers import text_experiment, tiny_unet_experiment
from tests.test_text_to_image import save_tiny_pipeline


@pytest.fixture(scope="module")
def tiny_pipeline(tmp_path_factory):
    return save_tiny_pipeline(tmp_path_factory.mktemp("tiny_t2i"))


class Calls:
    """Counts the text encoder's and the VAE encoder's calls while the block runs, and the prompts encoded."""

    def __enter__(self):
        self.text, self.vae = 0, 0
        text_forward, vae_encode = CLIPTextModel.forward, AutoencoderKL.encode

        def counted_text(module, *args, **kwargs):
            self.text += 1
            return text_forward(module, *args, **kwargs)

        def counted_vae(module, *args, **kwargs):
            self.vae += 1
            return vae_encode(module, *args, **kwargs)

        self.patches = [mock.patch.object(CLIPTextModel, "forward", counted_text),
                        mock.patch.object(AutoencoderKL, "encode", counted_vae)]
        for patch in self.patches:
            patch.start()
        return self

    def __exit__(self, *exc):
        for patch in self.patches:
            patch.stop()


def prepared(pipeline, cache_dir):
    """The DMD2 (GAN on real latents) run's task with its first batch drawn, and that batch."""
    _, (_, objective, task) = text_experiment(pipeline, "dmd", "objective.gan_weight=0.1",
                                              f"data.cache_dir={cache_dir}")
    torch.manual_seed(0)
    return task, next(task.batches(objective.needs_real_data))


def test_a_second_run_reads_the_cache_and_skips_the_encoders(tiny_pipeline, tmp_path):
    with Calls() as first:
        task, batch = prepared(tiny_pipeline, tmp_path)
    assert first.text > 0 and first.vae > 0
    assert list((tmp_path / "embeddings").glob("*/shard-*.safetensors"))
    assert (next((tmp_path / "latents").iterdir()) / "complete.json").is_file()
    with Calls() as second:
        cached_task, cached_batch = prepared(tiny_pipeline, tmp_path)
    assert second.text == 0 and second.vae == 0
    assert torch.equal(cached_batch.cond, batch.cond) and torch.equal(cached_batch.real, batch.real)
    assert torch.equal(cached_task.negative, task.negative)
    assert torch.equal(cached_task.real_data[0], task.real_data[0])


def test_only_prompts_missing_from_the_cache_are_encoded(tiny_pipeline, tmp_path):
    _, (_, _, task) = text_experiment(tiny_pipeline, "dmd", f"data.cache_dir={tmp_path}")
    known = task.parts.embed(["a red circle at the top left"])
    _, (_, _, task) = text_experiment(tiny_pipeline, "dmd", f"data.cache_dir={tmp_path}")
    with mock.patch.object(task.parts, "encode_prompts", wraps=task.parts.encode_prompts) as encode:
        both = task.parts.embed(["a red circle at the top left", "a blue square at the top right"])
    encode.assert_called_once_with(["a blue square at the top right"])
    assert torch.equal(both[:1], known)


def test_a_changed_encoder_or_vae_is_not_read_from_the_cache(tiny_pipeline, tmp_path, capsys):
    cache = tmp_path / "cache"
    task, batch = prepared(tiny_pipeline, cache)
    changed = shutil.copytree(tiny_pipeline, tmp_path / "changed")
    for part, model_class in (("text_encoder", CLIPTextModel), ("vae", AutoencoderKL)):
        model = model_class.from_pretrained(changed / part)
        with torch.no_grad():
            next(model.parameters()).add_(0.5)
        model.save_pretrained(changed / part)
    capsys.readouterr()
    with Calls() as calls:
        changed_task, changed_batch = prepared(changed, cache)
    assert calls.text > 0 and calls.vae > 0
    assert "made by another text encoder" in capsys.readouterr().out
    assert not torch.equal(changed_task.negative, task.negative)
    assert not torch.equal(changed_task.real_data[0], task.real_data[0])
    assert len(list((cache / "embeddings").iterdir())) == 2 and len(list((cache / "latents").iterdir())) == 2


def test_an_unfinished_latent_write_is_not_read(tmp_path):
    cache = LatentCache(tmp_path, "digest")
    cache.save(torch.randn(5, 4, 2, 2), {})
    assert cache.load().shape == (5, 4, 2, 2)
    (cache.directory / "complete.json").unlink()
    assert cache.load() is None


def test_cache_dir_is_refused_where_nothing_is_encoded(tmp_path):
    with pytest.raises(ConfigError, match="data.cache_dir.*works on pixels"):
        tiny_unet_experiment("dmd", f"data.cache_dir={tmp_path}")


def test_an_unwritable_cache_dir_is_one_line(tiny_pipeline, tmp_path):
    blocked = tmp_path / "file"
    blocked.write_text("")
    with pytest.raises(ConfigError, match="data.cache_dir=.*cannot write there"):
        text_experiment(tiny_pipeline, "dmd", f"data.cache_dir={blocked / 'cache'}")


def test_low_precision_text_encoders_beside_a_float32_vae_in_cpu_memory(tiny_pipeline):
    """teacher.dtype reaches the text encoders; the VAE stays float32; both stay in CPU memory after the data are
    prepared."""
    _, (_, objective, task) = text_experiment(tiny_pipeline, "dmd", "teacher.dtype=bf16")
    next(task.batches(objective.needs_real_data, torch.device("cpu")))
    assert {p.dtype for p in task.parts.parts["text_encoder"].parameters()} == {torch.bfloat16}
    assert {p.dtype for p in task.parts.vae.parameters()} == {torch.float32}
    assert task.parts.device.type == "cpu"
    latents = torch.randn(5, 4, 8, 8)
    # decoded two at a time: the same images up to the convolutions' batch-size-dependent rounding
    torch.testing.assert_close(task.parts.decode_all(latents, 2), task.parts.decode(latents), rtol=0, atol=1e-5)
