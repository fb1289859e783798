"""How a search proposes and stops trials: Optuna's seeded TPE sampler and the pruner."""

from __future__ import annotations

import warnings

import optuna


def sampler(seed: int) -> optuna.samplers.BaseSampler:
    """Multivariate, grouped TPE (the space is conditional on the chosen plugins), seeded.

    TPE's constant liar (Optuna's default) counts running trials as bad ones, so workers
    sampling at the same time move apart instead of proposing alike.
    """
    with warnings.catch_warnings():  # multivariate/group TPE are flagged experimental
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True)


def pruner(name: str) -> optuna.pruners.BasePruner:
    """``"median"``: Optuna's median rule after 5 trials; ``"none"``: never prune."""
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=5)
    return optuna.pruners.NopPruner()


def trial_sampler(seed: int, number: int) -> optuna.samplers.BaseSampler:
    """The sampler that proposes trial ``number`` of a search seeded ``seed``.

    Seeded per trial number rather than once per process: whichever worker or process
    claims a trial samples it the same way, no two trials share a random stream (so
    parallel workers never repeat each other's random start-up proposals), and a resumed
    study continues where it stopped instead of restarting its sequence.
    """
    return sampler((seed * 1_000_003 + number * 104_729) % 2**32)
