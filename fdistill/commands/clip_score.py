"""CLIP score of a folder of samples against their prompts.

    fdistill clip-score --images DIR [--prompts prompts.txt|prompts.csv|metadata.jsonl] \
        [--model ViT-B-32 --pretrained openai|CHECKPOINT] [--model local-dir:DIR] [--json]

Without --prompts, DIR/metadata.jsonl (or metadata.json) with ``file`` and ``prompt`` fields is read.
See ``fdistill.metrics.clip_score`` for the protocol.
"""

from __future__ import annotations

import argparse
import json
import sys


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="fdistill clip-score", description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", required=True, help="folder of generated images")
    parser.add_argument("--prompts", help="text file (one per line), CSV (file,prompt) or metadata.json[l]")
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
        result = compute_clip_score(args.images, args.prompts, args.model, args.pretrained,
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
