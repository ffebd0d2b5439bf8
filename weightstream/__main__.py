"""``python -m weightstream``: the command line of :mod:`weightstream.cli`."""

import sys

from .cli import main

if __name__ == "__main__":  # not in a spawned child, which imports this module as __mp_main__
    sys.exit(main())
