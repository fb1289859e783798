"""``python -m autometa.cli`` is the ``autometa`` command."""

import sys

from autometa.cli.app import main

sys.exit(main())
