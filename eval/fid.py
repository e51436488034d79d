"""FD / FID of generated samples against reference images or statistics: ``python eval/fid.py --help``.

The same as ``fdistill fid``; the code is in ``fdistill/commands/fid.py`` (``--help`` lists the options).
"""

import sys

from fdistill.commands.fid import main

if __name__ == "__main__":
    sys.exit(main())
