"""The search engine: validate inputs, open the study, run trials, rank them.

Modules, imports pointing down: :mod:`~autometa.engine.run` (the public ``search`` and
``run_search``) uses :mod:`~autometa.engine.storage` (the study in its storage: settings,
budget, stale trials) and :mod:`~autometa.engine.prepare` (every input checked before
anything is stored). This package imports nothing on its own import.
"""
