"""Export a run's student as a diffusers pipeline: ``python export.py --run RUN_DIR [--out DIR]``.

The directory is a stock diffusers pipeline: ``DiffusionPipeline.from_pretrained(DIR)`` loads it without fdistill
and samples exactly like the run's student (``fdistill/pipelines/export.py``); ``DIR/fdistill.json`` records how it was
made and ``DIR/README.md`` is its model card. Default ``DIR``: ``RUN_DIR/pipeline``. ``--checkpoint`` exports an
intermediate checkpoint of the run instead of its final weights.
"""

import argparse
from pathlib import Path

from fdistill.cli import user_errors
from fdistill.errors import ConfigError


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
    parser.add_argument("--push-to-hub", metavar="REPO_ID", help="also upload the export to this Hugging Face Hub "
                        "model repository (created if absent; needs network and a login)")
    args = parser.parse_args(argv)
    with user_errors():
        from fdistill.run import export_run

        ema = None if args.ema == "none" else args.ema
        if args.push_to_hub:
            check_hub_reachable(args.push_to_hub)
        out = export_run(args.run, args.out, args.checkpoint, ema)
        print(f"wrote {out}")
        if args.push_to_hub:
            print(f"pushed to {push_to_hub(out, args.push_to_hub)}")


def check_hub_reachable(repo_id: str) -> None:
    """Offline, a push cannot succeed: say so before exporting."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        raise ConfigError(f"--push-to-hub {repo_id}: HF_HUB_OFFLINE is set, so nothing can be uploaded; export "
                          "without --push-to-hub and upload the folder where there is network (hf upload REPO_ID DIR)")


def push_to_hub(folder: Path, repo_id: str) -> str:
    """Create the model repository if needed and upload the exported folder; returns the commit's URL."""
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        api.create_repo(repo_id, repo_type="model", exist_ok=True)
        commit = api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model",
                                   commit_message="Upload a student distilled with fdistill")
    except Exception as e:  # network, authentication and permission errors come in many types
        raise ConfigError(f"--push-to-hub {repo_id}: the upload failed ({type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else 'no message'}); the export stays in {folder}; "
                          "log in with `hf auth login` and retry, or upload it yourself") from None
    return str(commit.commit_url if hasattr(commit, "commit_url") else commit)


if __name__ == "__main__":
    main()
