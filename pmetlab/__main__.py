"""``python -m pmetlab``: the ``pmetlab`` command line."""

import sys

from .cli import main

sys.exit(main())
