"""``python -m autometa`` is the ``autometa`` command."""

import sys

from autometa.cli import main

sys.exit(main())
