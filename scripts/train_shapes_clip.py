"""Train the tiny open_clip model shipped in fdistill/assets/shapes_clip, for CLIP scores on captioned shapes.

    python scripts/train_shapes_clip.py [--config configs/assets/shapes_clip.yaml] [key=value ...]

A pretrained CLIP has never seen 32 px coloured shapes and cannot be downloaded offline, so the CLIP score of
the text-to-image default uses this model instead: the standard symmetric contrastive loss with a learnable
logit scale, on every combination (split "all"), with the attribute classifier's degradations. The asset is
an ``open_clip_config.json`` and float16 safetensors weights (the 49408-token embedding is most of the model),
loaded as float32 by ``load_clip("local-dir:...")``. The recorded numbers come from that loaded asset through
``fdistill.metrics.clip_score``, so tests recompute them exactly.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import time
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from safetensors.torch import save_file
from train_shapes_attributes import augment, shapes_data

from fdistill.data.captions import ALL_COMBINATIONS, caption
from fdistill.metrics.clip_score import (
    CLIP_CONFIG_FILE,
    CLIP_WEIGHTS_FILE,
    clip_retrieval_accuracy,
    clip_score_tensors,
    load_shapes_clip,
)
from fdistill.metrics.features import weights_hash

ROOT = Path(__file__).resolve().parent.parent


def evaluate(clip, images: torch.Tensor, combos: torch.Tensor, seed: int) -> dict:
    """Retrieval accuracy among the 48 captions, and mean CLIP scores with the own and a random wrong caption."""
    prompts = [caption(*c) for c in ALL_COMBINATIONS]
    own = [caption(*c) for c in combos.tolist()]
    shift = torch.randint(1, len(prompts), (len(own),), generator=torch.Generator().manual_seed(seed))
    wrong = [prompts[(prompts.index(p) + int(s)) % len(prompts)] for p, s in zip(own, shift, strict=True)]
    return {"retrieval_accuracy": round(clip_retrieval_accuracy(clip, images, own, prompts), 4),
            "clip_score_matching": round(clip_score_tensors(clip, images, own), 4),
            "clip_score_mismatched": round(clip_score_tensors(clip, images, wrong), 4)}


def train(cfg) -> dict:
    torch.set_num_threads(1)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    model_cfg = OmegaConf.to_container(cfg.model_cfg)
    model = open_clip.CLIP(**model_cfg)
    tokens = open_clip.SimpleTokenizer(context_length=model_cfg["text_cfg"]["context_length"])(
        [caption(*c) for c in ALL_COMBINATIONS])
    images, combos = shapes_data(cfg.data.train_images, cfg.seed)
    index = {c: i for i, c in enumerate(ALL_COMBINATIONS)}
    by_caption = [[] for _ in ALL_COMBINATIONS]
    for i, combo in enumerate(combos.tolist()):
        by_caption[index[tuple(combo)]].append(i)
    by_caption = [torch.tensor(ids) for ids in by_caption]

    t = cfg.train
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": t.weight_decay}, {"params": rest, "weight_decay": 0}],
                            lr=t.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / t.warmup, 1) * 0.5 * (
        1 + math.cos(math.pi * min(s / t.steps, 1))))
    target = torch.arange(len(ALL_COMBINATIONS))
    start = time.time()
    for step in range(1, t.steps + 1):
        model.train()
        idx = torch.stack([ids[torch.randint(len(ids), (1,), generator=gen)] for ids in by_caption]).squeeze(1)
        image_emb, text_emb, logit_scale = model(augment(images[idx], cfg.augment, gen), tokens)[:3]
        logits = logit_scale * image_emb @ text_emb.T
        loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():  # CLIP's cap on the temperature, 1 / 100
            model.logit_scale.clamp_(0, math.log(100))
        if step % 250 == 0 or step == t.steps:
            accuracy = (logits.argmax(1) == target).float().mean().item()
            print(f"step {step:5d}  loss {loss.item():.4f}  batch retrieval {accuracy:.3f}  "
                  f"logit scale {logit_scale.item():.1f}", flush=True)
    wall_time = time.time() - start

    out = ROOT / cfg.out
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().half().contiguous() for k, v in model.state_dict().items()}, out / CLIP_WEIGHTS_FILE)
    open_clip_config = {"model_cfg": model_cfg, "preprocess_cfg": OmegaConf.to_container(cfg.preprocess_cfg)}
    (out / CLIP_CONFIG_FILE).write_text(json.dumps(open_clip_config, indent=2) + "\n")
    clip = load_shapes_clip(path=out)
    eval_images, eval_combos = shapes_data(cfg.data.eval_images, cfg.data.eval_seed)
    provenance = {
        "script": "scripts/train_shapes_clip.py",
        "config": OmegaConf.to_container(cfg),
        "steps": t.steps,
        "data": f"fdistill.data.captions.CaptionedShapes(split='all'), 32 px RGB in [-1, 1]: "
        f"{cfg.data.train_images} training images (seed {cfg.seed}), augmented, each batch one image per caption; "
        f"evaluated on {cfg.data.eval_images} clean images of seed {cfg.data.eval_seed}",
        "held_out_seed": {"seed": cfg.data.eval_seed, "num_images": cfg.data.eval_images,
                          "candidates": len(ALL_COMBINATIONS),
                          "wrong_caption_seed": cfg.data.eval_seed,
                          **evaluate(clip, eval_images, eval_combos, cfg.data.eval_seed)},
        "logit_scale": round(model.logit_scale.exp().item(), 2),
        "weights_dtype": "float16",
        "weights_sha256_16": weights_hash(out / CLIP_WEIGHTS_FILE),
        "wall_time_s": round(wall_time, 1),
        "date": datetime.date.today().isoformat(),
        "torch_version": torch.__version__,
        "open_clip_version": open_clip.__version__,
    }
    (out / "provenance.json").write_text(json.dumps(provenance, indent=2) + "\n")
    return provenance


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs/assets/shapes_clip.yaml"))
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.steps=100")
    args = parser.parse_args()
    cfg = OmegaConf.merge(OmegaConf.load(args.config), OmegaConf.from_dotlist(args.overrides))
    print(json.dumps(train(cfg), indent=2))


if __name__ == "__main__":
    main()
