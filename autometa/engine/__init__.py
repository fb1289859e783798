"""The search engine: validate inputs, create or resume the study, run trials, rank them.

Modules, imports pointing down: :mod:`~autometa.engine.run` (the public ``search`` and
``run_search``, and joining a stored study) → :mod:`~autometa.engine.pool` (worker
processes and their supervisor) → :mod:`~autometa.engine.worker` (claim, run, tell) →
:mod:`~autometa.engine.storage` (the study created or resumed) and
:mod:`~autometa.engine.claim` (the budget, dead trials) → :mod:`~autometa.engine.initial`
(queued initial trials) → :mod:`~autometa.engine.prepare` (every input checked before
anything is stored) → :mod:`~autometa.engine.warm_start`,
:mod:`~autometa.engine.sampling`, :mod:`~autometa.engine.lock`,
:mod:`~autometa.engine.outage`, :mod:`~autometa.engine.signals`. The engine writes the study through
:mod:`autometa.study`, which the results read. This package imports nothing on its own
import.
"""
