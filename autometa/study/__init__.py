"""The stored study: what a study *is* once stored, below both the engine, which writes
it, and the results (leaderboard, report, Predictor), which read it.

One concept per module:

- :mod:`~autometa.study.urls`: what a storage URL names (a database, a journal file) and
  its driver;
- :mod:`~autometa.study.storage`: opening a storage (read-only where asked), whether its
  tables exist, whether it holds a study;
- :mod:`~autometa.study.settings`: the search's settings as the study stored them
  (``autometa.config``), and the keys each machine sets for itself;
- :mod:`~autometa.study.trials`: what a stored trial holds: its plan (plugins and
  hyperparameters), its seed, its place in the ranking, its learning curve and its
  meta-test score;
- :mod:`~autometa.study.baselines`: what marks a baseline trial, and what a ranking says
  when one ranks first;
- :mod:`~autometa.study.inputs`: input files identified by content (SHA-256);
- :mod:`~autometa.study.artifacts`: trial states in Optuna's artifact store;
- :mod:`~autometa.study.build`: the study's task built from its settings;
- :mod:`~autometa.study.stored`: a stored study opened read-only on this machine.

Nothing here imports the engine, the results or the interfaces.
"""
