"""``python -m weightstream``."""

import sys

from .cli import main

sys.exit(main())
