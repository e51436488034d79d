"""Export a run's student as a diffusers pipeline: ``python export.py --run RUN_DIR [--out DIR]``.

The directory is a stock diffusers pipeline: ``DiffusionPipeline.from_pretrained(DIR)`` loads it without fdistill
and samples exactly like the run's student (``fdistill/pipelines.py``); ``DIR/fdistill.json`` records how it was
made and ``DIR/README.md`` is its model card. Default ``DIR``: ``RUN_DIR/pipeline``. ``--checkpoint`` exports an
intermediate checkpoint of the run instead of its final weights.
"""

import argparse

from fdistill.cli import user_errors


def main(argv=None):
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--run", required=True, help="a run directory")
    parser.add_argument("--checkpoint", metavar="latest|NAME|DIR",
                        help="export a checkpoint of the run (latest: the newest; NAME: e.g. step-00001000) "
                             "instead of its final weights")
    parser.add_argument("--ema", default="auto", metavar="NAME|none",
                        help="weights to export: an EMA name, none (the trained weights) or auto (eval.ema, default)")
    parser.add_argument("--out", help="output directory (default RUN_DIR/pipeline)")
    args = parser.parse_args(argv)
    with user_errors():
        from fdistill.run import export_run

        ema = None if args.ema == "none" else args.ema
        out = export_run(args.run, args.out, args.checkpoint, ema)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
