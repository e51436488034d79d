"""Export a run's student as a diffusers pipeline: ``python export.py --run RUN_DIR [--out DIR]``.

The same as ``fdistill export``; the code is in ``fdistill/commands/export.py`` (``--help`` lists the options).
"""

import sys

from fdistill.commands.export import main

if __name__ == "__main__":
    sys.exit(main())
