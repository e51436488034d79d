"""CLIP score of a folder of samples against their prompts: ``python eval/clip_score.py --help``.

The same as ``fdistill clip-score``; the code is in ``fdistill/commands/clip_score.py`` (``--help`` lists the options).
"""

import sys

from fdistill.commands.clip_score import main

if __name__ == "__main__":
    sys.exit(main())
