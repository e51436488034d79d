"""Shared command-line behaviour: user errors end with one ``error: ...`` line and exit code 2."""

from __future__ import annotations

import sys
from contextlib import contextmanager

from fdistill.errors import ConfigError


@contextmanager
def user_errors():
    try:
        yield
    except (ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
