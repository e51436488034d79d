"""CLIP score of a folder of samples against their prompts.

    fdistill clip-score --images DIR [--prompts prompts.txt|prompts.csv|metadata.jsonl] \
        [--model ViT-B-32 --pretrained openai|CHECKPOINT] [--model local-dir:DIR] [--json]

The prompts are read by ``fdistill.data.captions.read_prompts``: a text file (one prompt per line, paired with
the folder's images in sorted file order), or a ``.csv``/``.jsonl``/``.json`` file whose records have a
``prompt`` and the image's path (``file`` or ``image``, relative to DIR); a ``.json`` object may also map image
paths to prompts. Without --prompts, DIR/metadata.jsonl (or metadata.json) is read. See
``fdistill.metrics.clip_score`` for the protocol.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

METADATA_FILES = ("metadata.jsonl", "metadata.json")


def image_prompt_pairs(images_dir: str | Path, prompts: str | Path | None = None) -> list[tuple[Path, str]]:
    """(image file, prompt) pairs of a folder of samples.

    ``prompts`` defaults to the folder's ``metadata.jsonl`` or ``metadata.json``. A prompt file that names each
    prompt's image pairs them as named (paths relative to ``images_dir``); one that names none pairs its prompts,
    in order, with the folder's images in sorted file order, and must hold one prompt per image.
    """
    from fdistill.data.captions import read_prompts
    from fdistill.errors import ConfigError
    from fdistill.metrics.image_sources import list_images

    images_dir = Path(images_dir)
    if not images_dir.is_dir():
        raise ConfigError(f"image folder not found: {images_dir}; pass the folder of samples as --images")
    if prompts is None:
        found = [images_dir / name for name in METADATA_FILES if (images_dir / name).is_file()]
        if not found:
            raise ConfigError(f"no prompts: pass --prompts FILE or write {images_dir / METADATA_FILES[0]}")
        prompts = found[0]
    records = read_prompts(prompts, image_root=images_dir)
    unnamed = sum(r.image is None for r in records)
    if unnamed == len(records):
        files = list_images(images_dir)
        if len(files) != len(records):
            raise ConfigError(f"{prompts} has {len(records)} prompts for {len(files)} images in {images_dir}; "
                              "write one prompt per image, in sorted file order")
        return [(f, r.prompt) for f, r in zip(files, records, strict=True)]
    if unnamed:
        raise ConfigError(f"{prompts}: {unnamed} of {len(records)} prompts name no image; name an image "
                          "('file' or 'image') for every prompt, or for none")
    missing = next((r.image for r in records if not r.image.is_file()), None)
    if missing is not None:
        raise ConfigError(f"{prompts}: image {missing} not found; fix its path (relative to {images_dir})")
    return [(r.image, r.prompt) for r in records]


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="fdistill clip-score", description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", required=True, help="folder of generated images")
    parser.add_argument("--prompts", help="text file (one prompt per image, sorted file order), or CSV, JSONL or "
                                          "JSON records with 'prompt' and 'file' (or 'image'); default: "
                                          "DIR/metadata.jsonl or DIR/metadata.json")
    parser.add_argument("--model", default="ViT-B-32", help="open_clip model name, or local-dir:DIR")
    parser.add_argument("--pretrained", default="openai", help="pretrained tag or local checkpoint file")
    parser.add_argument("--cache-dir", help="open_clip weights cache directory")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--json", action="store_true", help="print the result with per-image scores as JSON")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse(sys.argv[1:] if argv is None else argv)
    from fdistill.metrics.clip_score import compute_clip_score

    try:
        pairs = image_prompt_pairs(args.images, args.prompts)
        result = compute_clip_score(pairs, args.model, args.pretrained, images_dir=args.images,
                                    batch_size=args.batch_size, progress=not args.no_progress,
                                    device=args.device, cache_dir=args.cache_dir)
    except (OSError, ValueError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"CLIP score {result['value']:.3f} ({result['num_images']} images, {result['model']}, "
              f"pretrained {result['pretrained']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
