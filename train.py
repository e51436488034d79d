"""Train a one-step (or few-step) student: ``python train.py --config configs/X.yaml [key=value ...]``.

The same as ``fdistill train``; the code is in ``fdistill/commands/train.py`` (``--help`` lists the options).
"""

import sys

from fdistill.commands.train import main

if __name__ == "__main__":
    sys.exit(main())
