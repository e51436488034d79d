"""Draw samples from a student or a teacher: ``python sample.py --model MODEL --num N --out OUT``.

The same as ``fdistill sample``; the code is in ``fdistill/commands/sample.py`` (``--help`` lists the options).
"""

import sys

from fdistill.commands.sample import main

if __name__ == "__main__":
    sys.exit(main())
