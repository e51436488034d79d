"""The command line: ``fdistill train|sample|export|fid|clip-score [options]``, one module per command.

The top-level scripts (``train.py``, ``sample.py``, ``export.py``, ``eval/fid.py``, ``eval/clip_score.py``) run the
same ``main`` functions from a checkout.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "train": ("fdistill.commands.train", "train a student"),
    "sample": ("fdistill.commands.sample", "draw samples from a student, an exported pipeline or a teacher"),
    "export": ("fdistill.commands.export", "export a run's student as a diffusers pipeline"),
    "fid": ("fdistill.commands.fid", "FD/FID (and KID, precision/recall) of samples against a reference"),
    "clip-score": ("fdistill.commands.clip_score", "CLIP score of a folder of samples against prompts"),
}


def usage() -> str:
    lines = ["usage: fdistill COMMAND [options]   (fdistill COMMAND --help for its options)", "", "commands:"]
    return "\n".join(lines + [f"  {name:<11} {what}" for name, (_, what) in COMMANDS.items()])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    if argv[0] not in COMMANDS:
        print(f"error: unknown command {argv[0]!r}; choose one of {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[argv[0]][0])
    sys.argv[0] = f"fdistill {argv[0]}"
    return module.main(argv[1:]) or 0
