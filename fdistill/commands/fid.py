"""FD / FID of generated samples against reference images or statistics.

    fdistill fid --samples DIR|FILE.npz --ref digits|DIR|stats.npz --features fdistill-digits [--json]
    fdistill fid ref --data DIR|digits --features NAME --out stats.npz

(or ``python eval/fid.py ...`` from a checkout).

Samples .npz files hold ``images``: uint8 NHWC, or float NCHW in [-1, 1]. See ``fdistill.metrics.fid``
for the protocol each backend implements.
"""

from __future__ import annotations

import argparse
import json
import sys

from fdistill.metrics.fid import BACKENDS, FEATURE_NETS


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--features", default="fdistill-digits", choices=FEATURE_NETS,
                        help="feature network (default: fdistill-digits, the CPU proxy)")
    parser.add_argument("--backend", default="clean", choices=BACKENDS, help="preprocessing and FD code")
    parser.add_argument("--inception-weights", metavar="PATH", help="local Inception weights file")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _parse(argv: list[str]) -> argparse.Namespace:
    if argv[:1] == ["ref"]:
        parser = argparse.ArgumentParser(prog="fdistill fid ref", description="Build reference statistics.")
        parser.add_argument("--data", required=True, help="image folder, samples .npz, or 'digits'")
        parser.add_argument("--out", required=True, help="statistics .npz to write")
        parser.add_argument("--keep-features", action="store_true",
                            help="store the features too (needed for KID and precision/recall)")
        _common(parser)
        return parser.parse_args(argv[1:], argparse.Namespace(command="ref"))
    parser = argparse.ArgumentParser(prog="fdistill fid", description=__doc__.split("\n\n")[0],
                                     epilog="`fdistill fid ref --help`: build reference statistics")
    parser.add_argument("--samples", required=True, help="image folder or samples .npz")
    parser.add_argument("--ref", required=True, help="'digits', an image folder, or a statistics .npz")
    parser.add_argument("--kid", action="store_true", help="also report KID")
    parser.add_argument("--pr", action="store_true", help="also report precision/recall (k=3)")
    parser.add_argument("--seeds", help="seeds the samples were drawn with (recorded in the result)")
    parser.add_argument("--steps", type=int, help="sampling steps (recorded in the result)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    _common(parser)
    return parser.parse_args(argv, argparse.Namespace(command="fid"))


def main(argv: list[str] | None = None) -> int:
    args = _parse(sys.argv[1:] if argv is None else argv)
    from fdistill.data.images import reference_images
    from fdistill.metrics import fid

    try:
        net = fid.load_feature_net(args.features, args.backend, args.inception_weights)
        opts = dict(batch_size=args.batch_size, progress=not args.no_progress, device=args.device)
        if args.command == "ref":
            stats = fid.compute_statistics(reference_images(args.data), net, args.backend,
                                           keep_features=args.keep_features, **opts)
            fid.save_statistics(stats, args.out)
            print(f"wrote {args.out}: {stats.num_samples} images, {stats.feature_net} "
                  f"({stats.weights_hash}), {stats.backend}")
            return 0
        result = fid.compute_fid(args.samples, reference_images(args.ref), net, args.backend, kid=args.kid,
                                 precision_recall_k=3 if args.pr else None, seeds=args.seeds,
                                 steps=args.steps, **opts)
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        extras = "".join(f", {k} {result[k]:.4g}" for k in ("kid_mean", "precision", "recall") if k in result)
        print(f"{result['metric']} {result['value']:.4f}{extras} ({result['num_samples']} samples vs "
              f"{result['num_reference']} reference, {result['feature_net']} {result['weights_hash']}, "
              f"{result['backend']}{', proxy' if result['proxy'] else ''})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
