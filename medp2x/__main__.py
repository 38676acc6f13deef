"""``python -m medp2x``: the same command line as ``medp2x`` (``medp2x.cli``)."""

import sys

from medp2x.cli import main

sys.exit(main())
