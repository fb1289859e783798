"""How a search proposes and stops trials: Optuna's seeded sampler (TPE or random) and
its pruner (median, Hyperband, Wilcoxon or none)."""

from __future__ import annotations

import warnings
import zlib
from typing import TYPE_CHECKING

import optuna

if TYPE_CHECKING:
    from autometa.config import SearchConfig

#: Wilcoxon pruner: p-value under which a trial is judged worse than the best (Optuna's
#: default), and the paired episodes needed before the first test.
WILCOXON_P = 0.1
WILCOXON_STARTUP = 10
#: Hyperband: each rung keeps 1 / HYPERBAND_ETA of the trials (Li et al. 2018's eta = 3).
HYPERBAND_ETA = 3


def sampler(seed: int, kind: str = "tpe") -> optuna.samplers.BaseSampler:
    """``"tpe"``: multivariate, grouped TPE (the space is conditional on the chosen
    plugins); ``"random"``: independent uniform draws. Seeded.

    TPE's constant liar (Optuna's default) counts running trials as bad ones, so workers
    sampling at the same time move apart instead of proposing alike.
    """
    if kind == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    with warnings.catch_warnings():  # multivariate/group TPE are flagged experimental
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True)


def pruner(name: str, *, meta_steps: int = 1, eval_every: int = 1
           ) -> optuna.pruners.BasePruner:
    """The pruner named in the config (see :class:`~autometa.config.SearchConfig`).

    - ``"median"``: Optuna's median rule after 5 trials, at each meta-val evaluation.
    - ``"hyperband"``: Optuna's HyperbandPruner (Li et al. 2018) with meta-steps as the
      resource: from ``eval_every`` (the first evaluation) to ``meta_steps``, keeping a
      third at each rung; ``meta_steps / eval_every`` below 3 leaves one bracket, and a
      trial evaluated once (``eval_every = meta_steps``) is never pruned.
    - ``"wilcoxon"``: Optuna's WilcoxonPruner; trials report one meta-val score per
      episode (the episode's index as the step) and stop once a paired signed-rank test
      finds them worse than the best trial (p < :data:`WILCOXON_P`).
    - ``"none"``: never prune.
    """
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=5)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=eval_every,
                                              max_resource=meta_steps,
                                              reduction_factor=HYPERBAND_ETA)
    if name == "wilcoxon":
        with warnings.catch_warnings():  # flagged experimental since Optuna 3.6
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.pruners.WilcoxonPruner(p_threshold=WILCOXON_P,
                                                 n_startup_steps=WILCOXON_STARTUP)
    return optuna.pruners.NopPruner()


def trial_sampler(seed: int, number: int, kind: str = "tpe", study: str = ""
                  ) -> optuna.samplers.BaseSampler:
    """The sampler that proposes trial ``number`` of study ``study`` seeded ``seed``.

    Seeded per trial number rather than once per process: whichever worker or process
    claims a trial samples it the same way, no two trials share a random stream (so
    parallel workers never repeat each other's random start-up proposals), and a resumed
    study continues where it stopped instead of restarting its sequence. The study's name
    enters the seed too: a study warm-started from another of the same seed would
    otherwise propose that study's configurations again.
    """
    name = zlib.crc32(study.encode())
    return sampler((seed * 1_000_003 + number * 104_729 + name) % 2**32, kind)


def strategy(config: SearchConfig) -> tuple[optuna.samplers.BaseSampler,
                                             optuna.pruners.BasePruner]:
    """The study's sampler (seeded by the search seed) and pruner, from its settings."""
    return (sampler(config.seed, config.sampler),
            pruner(config.pruner, meta_steps=config.meta_steps, eval_every=config.eval_every))
