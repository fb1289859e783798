"""The ``autometa`` command line: ``run``, ``worker``, ``plugins``, ``leaderboard``,
``report``, ``predict`` and ``export``.

All user-facing output lives here (:mod:`~autometa.cli.app`: the parser and ``main``;
:mod:`~autometa.cli.search`: ``run`` and ``worker``; :mod:`~autometa.cli.results`: a stored
study's leaderboard, report and models; :mod:`~autometa.cli.plugins`). Errors print one
line and exit 2 (``--debug`` shows the traceback). Imports of torch and Optuna are deferred
to the commands that need them.
"""

from autometa.cli.app import build_parser, main

__all__ = ["build_parser", "main"]
