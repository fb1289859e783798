"""How a search proposes and stops trials: Optuna's seeded TPE sampler and the pruner."""

from __future__ import annotations

import warnings

import optuna


def sampler(seed: int) -> optuna.samplers.BaseSampler:
    """Multivariate, grouped TPE (the space is conditional on the chosen plugins), seeded."""
    with warnings.catch_warnings():  # multivariate/group TPE are flagged experimental
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True)


def pruner(name: str) -> optuna.pruners.BasePruner:
    """``"median"``: Optuna's median rule after 5 trials; ``"none"``: never prune."""
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=5)
    return optuna.pruners.NopPruner()
