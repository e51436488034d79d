"""CLIP score (Hessel et al. 2021, arXiv:2104.08718, eq. 1 with w = 100): 100 * max(cos(E_image, E_text), 0),
averaged over images, computed directly from open_clip embeddings (torchmetrics' ``CLIPScore`` goes through
transformers and breaks with transformers 5).

Models: an open_clip name with a pretrained tag (weights from the usual caches; offline and uncached is an
immediate error), a local checkpoint file as ``pretrained``, a ``local-dir:DIR`` model
(``open_clip_config.json`` plus weights), or ``pretrained=None`` for a randomly initialised model (tests).
:func:`load_shapes_clip` loads the shipped tiny model trained on captioned shapes
(``scripts/train_shapes_clip.py``), the CLIP of the text-to-image default: no pretrained CLIP knows 32 px
shapes. Images are PIL images, files, or in-memory batches (float NCHW in [-1, 1] or uint8 NHWC, quantised
as saving them to PNG would, so in-memory and folder scores agree).
:func:`compute_clip_score` scores (image file, prompt) pairs; the ``clip-score`` command
(``fdistill/commands/clip_score.py``) makes them from a folder of samples and a prompt file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from fdistill.metrics.fid import module_hash
from fdistill.metrics.image_sources import to_uint8_nchw

LOCAL_DIR = "local-dir:"
SHAPES_CLIP_DIR = Path(__file__).resolve().parent.parent / "assets" / "shapes_clip"
CLIP_CONFIG_FILE, CLIP_WEIGHTS_FILE = "open_clip_config.json", "open_clip_model.safetensors"


@dataclass
class ClipModel:
    model: nn.Module
    preprocess: object  # PIL image -> tensor [3, S, S]
    tokenizer: object  # list[str] -> token ids
    name: str
    pretrained: str | None


def _hub_offline() -> bool:
    from huggingface_hub import constants

    flag = os.environ.get("HF_HUB_OFFLINE", "").upper()  # read now: the constant is fixed at import
    return constants.HF_HUB_OFFLINE or flag in {"1", "ON", "YES", "TRUE"}


def cached_weights(model: str, tag: str, cache_dir: str | None = None) -> str | None:
    """Path of the cached weights open_clip would load for ``model``/``tag``, or None when not cached."""
    import open_clip
    from huggingface_hub import try_to_load_from_cache
    from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME

    cfg = open_clip.get_pretrained_cfg(model, tag)
    if "file" in cfg:
        return cfg["file"] if os.path.isfile(cfg["file"]) else None
    if cfg.get("hf_hub"):  # open_clip prefers the hub, trying a .safetensors twin first
        repo, filename = os.path.split(cfg["hf_hub"])
        filename = filename or HF_WEIGHTS_NAME
        names = [HF_SAFE_WEIGHTS_NAME] if filename == HF_WEIGHTS_NAME else []
        if filename != HF_WEIGHTS_NAME and filename.endswith((".bin", ".pth")):
            names.append(os.path.splitext(filename)[0] + ".safetensors")
        for name in [*names, filename]:
            found = try_to_load_from_cache(repo, name, cache_dir=cache_dir)
            if isinstance(found, str):
                return found
        return None
    path = Path(cache_dir or Path.home() / ".cache" / "clip") / os.path.basename(cfg.get("url", ""))
    return str(path) if path.is_file() else None


def load_clip(model: str = "ViT-B-32", pretrained: str | None = "openai", device="cpu",
              cache_dir: str | None = None) -> ClipModel:
    """An open_clip model, its eval preprocessing and tokenizer; never waits on an offline hub."""
    import open_clip

    if model.startswith(LOCAL_DIR):
        pretrained = None  # the directory holds the weights
    elif pretrained is not None and not os.path.isfile(pretrained):
        if not open_clip.get_pretrained_cfg(model, pretrained):
            tags = ", ".join(open_clip.list_pretrained_tags_by_model(model)) or "none"
            raise FileNotFoundError(f"pretrained {pretrained!r} is neither a file nor a tag of {model} "
                                    f"(tags: {tags})")
        if _hub_offline() and cached_weights(model, pretrained, cache_dir) is None:
            raise FileNotFoundError(
                f"open_clip weights {model}/{pretrained} are not cached and the hub is offline; pass a local "
                f"checkpoint (--pretrained FILE) or a model directory (--model {LOCAL_DIR}DIR)")
    net, _, preprocess = open_clip.create_model_and_transforms(model, pretrained=pretrained, device=device,
                                                               cache_dir=cache_dir)
    tokenizer = open_clip.get_tokenizer(model, cache_dir=cache_dir)
    return ClipModel(net.eval(), preprocess, tokenizer, model, pretrained)


def load_shapes_clip(device="cpu", path: str | Path | None = None) -> ClipModel:
    """The shipped captioned-shapes CLIP (or ``path``'s), float32 from its float16 weights. The files are
    checked here because open_clip silently builds a random model from a local directory without weights."""
    folder = Path(path) if path is not None else SHAPES_CLIP_DIR
    missing = [folder / name for name in (CLIP_CONFIG_FILE, CLIP_WEIGHTS_FILE) if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(f"shapes CLIP file {missing[0]} is missing; recreate it with "
                                "`python scripts/train_shapes_clip.py`")
    return load_clip(f"{LOCAL_DIR}{folder}", None, device)


def _rgb(image) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    with Image.open(image) as im:
        return im.convert("RGB")


def _image_list(images) -> list:
    """PIL images or files as given; an in-memory batch as PIL images, quantised like a saved PNG."""
    if not isinstance(images, (torch.Tensor, np.ndarray)):
        return list(images)
    return [Image.fromarray(im.permute(1, 2, 0).squeeze(-1).numpy()) for im in to_uint8_nchw(images)]


def _encode_images(clip: ClipModel, images: list, device) -> torch.Tensor:
    pixels = torch.stack([clip.preprocess(_rgb(im)) for im in images]).to(device)
    return clip.model.encode_image(pixels).float()


@torch.no_grad()
def clip_scores(images, prompts: list[str], clip: ClipModel, batch_size: int = 64,
                progress: bool = False, device="cpu") -> torch.Tensor:
    """Per-pair CLIP scores 100 * max(cos, 0) of images (see the module docstring) and prompts, embeddings
    in fp32."""
    images = _image_list(images)
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
    scores = []
    for i in tqdm(range(0, len(images), batch_size), desc="CLIP score", disable=not progress):
        image_emb = _encode_images(clip, images[i : i + batch_size], device)
        text_emb = clip.model.encode_text(clip.tokenizer(prompts[i : i + batch_size]).to(device)).float()
        scores.append(100 * F.cosine_similarity(image_emb, text_emb, dim=-1).clamp(min=0))
    return torch.cat(scores).cpu()


def clip_score_tensors(clip: ClipModel, images, prompts: list[str], batch_size: int = 64,
                       device="cpu") -> float:
    """Mean CLIP score of an in-memory batch (float NCHW in [-1, 1], e.g. a generator's output) and the
    prompts it was generated from: the number a folder of the same images saved as PNG would get."""
    return float(clip_scores(images, prompts, clip, batch_size, device=device).mean())


@torch.no_grad()
def clip_retrieval_accuracy(clip: ClipModel, images, prompts: list[str], candidates: list[str],
                            batch_size: int = 64, device="cpu") -> float:
    """Fraction of images whose own prompt is the most similar of ``candidates`` (which must contain every
    prompt). Unlike the CLIP score, whose scale depends on the model, it says directly whether the model
    tells an image's prompt from the others, e.g. a held-out combination from its training neighbours."""
    images = _image_list(images)
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
    unknown = sorted(set(prompts) - set(candidates))
    if unknown:
        raise ValueError(f"{len(unknown)} prompts are not among the candidates, e.g. {unknown[0]!r}")
    text_emb = F.normalize(clip.model.encode_text(clip.tokenizer(candidates).to(device)).float(), dim=-1)
    index = {p: i for i, p in enumerate(candidates)}
    target = torch.tensor([index[p] for p in prompts])
    predicted = [(F.normalize(_encode_images(clip, images[i : i + batch_size], device), dim=-1) @ text_emb.T)
                 .argmax(1).cpu() for i in range(0, len(images), batch_size)]
    return (torch.cat(predicted) == target).float().mean().item()


def compute_clip_score(pairs: list[tuple[Path, str]], model: str = "ViT-B-32", pretrained: str | None = "openai",
                       *, images_dir: str | Path | None = None, batch_size: int = 64, progress: bool = True,
                       device="cpu", cache_dir: str | None = None) -> dict:
    """Mean CLIP score of (image file, prompt) pairs, the per-image scores and the protocol. Files are named
    relative to ``images_dir`` in ``per_image`` when they lie inside it."""
    if not pairs:
        raise ValueError("no (image, prompt) pairs to score")
    files, prompts = [Path(f) for f, _ in pairs], [p for _, p in pairs]
    clip = load_clip(model, pretrained, device, cache_dir)
    scores = clip_scores(files, prompts, clip, batch_size, progress, device)
    root = Path(images_dir) if images_dir is not None else None
    names = [str(f.relative_to(root)) if root is not None and f.is_relative_to(root) else str(f) for f in files]
    return {"metric": "CLIP score", "value": float(scores.mean()), "num_images": len(pairs), "model": model,
            "pretrained": clip.pretrained, "weights_hash": module_hash(clip.model),
            "per_image": [{"file": name, "prompt": p, "score": float(s)}
                          for name, p, s in zip(names, prompts, scores, strict=True)]}
