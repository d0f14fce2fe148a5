"""``python -m pmetlab.cli``: the ``pmetlab`` command line where the console script is not installed."""

import sys

from .entry import main

sys.exit(main())
