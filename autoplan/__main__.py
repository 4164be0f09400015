"""``python -m autoplan`` is the ``autoplan`` command line (see :mod:`autoplan.cli`)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
