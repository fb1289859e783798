"""How a search proposes and stops trials: Optuna's seeded sampler (TPE, random, or one a
plugin registers) and its pruner (median, Hyperband, Wilcoxon, none, or a plugin's)."""

from __future__ import annotations

import math
import warnings
import zlib
from typing import TYPE_CHECKING, Any

import optuna

from autometa.config import PRUNERS, SAMPLERS
from autometa.errors import ConfigError, PluginError, closest

if TYPE_CHECKING:
    from autometa.config import SearchConfig
    from autometa.plugins import Kind, PluginHost

#: Wilcoxon pruner: p-value under which a trial is judged worse than the best (Optuna's
#: default), and the paired episodes needed before the first test.
WILCOXON_P = 0.1
WILCOXON_STARTUP = 10
#: Hyperband: each rung keeps 1 / HYPERBAND_ETA of the trials (Li et al. 2018's eta = 3).
HYPERBAND_ETA = 3


def sampler(seed: int, kind: str = "tpe", host: PluginHost | None = None
            ) -> optuna.samplers.BaseSampler:
    """``"tpe"``: multivariate, grouped TPE (the space is conditional on the chosen
    plugins); ``"random"``: independent uniform draws; another name: the sampler a plugin
    registered under it, ``factory(seed=seed)``. Seeded.

    TPE's constant liar (Optuna's default) counts running trials as bad ones, so workers
    sampling at the same time move apart instead of proposing alike.

    Raises:
        PluginError: no plugin registers ``kind``, or its factory failed or returned
            something other than an ``optuna.samplers.BaseSampler``.
    """
    if kind == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if kind != "tpe":
        return _from_plugin(host, "sampler", kind, optuna.samplers.BaseSampler, seed=seed)
    with warnings.catch_warnings():  # multivariate/group TPE are flagged experimental
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True)


def pruner(name: str, *, meta_steps: int = 1, eval_every: int = 1,
           direction: str = "maximize", host: PluginHost | None = None,
           resource: str = "meta_steps", trial_timeout: float | None = None
           ) -> optuna.pruners.BasePruner:
    """The pruner named in the config (see :class:`~autometa.config.SearchConfig`).

    - ``"median"``: Optuna's median rule after 5 trials, at each meta-val evaluation.
    - ``"hyperband"``: Optuna's HyperbandPruner (Li et al. 2018) with meta-steps as the
      resource: from ``eval_every`` (the first evaluation) to ``meta_steps``, keeping a
      third at each rung; ``meta_steps / eval_every`` below 3 leaves one bracket, and a
      trial evaluated once (``eval_every = meta_steps``) is never pruned. With
      ``resource="seconds"``, whole seconds of meta-training are the resource instead
      (trials report them as the step): :func:`seconds_budget` of ``trial_timeout``.
    - ``"wilcoxon"``: Optuna's WilcoxonPruner; trials report one meta-val score per
      episode (the episode's index as the step) and stop once a paired signed-rank test
      finds them worse than the best trial (p < :data:`WILCOXON_P`).
    - ``"none"``: never prune.
    - another name: the pruner a plugin registered under it, ``factory(meta_steps=...,
      eval_every=..., direction=...)``; trials report every ``eval_every`` meta-steps.

    Raises:
        PluginError: as :func:`sampler`, for ``optuna.pruners.BasePruner``.
    """
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=5)
    if name == "hyperband":
        low, high = (eval_every, meta_steps) if resource == "meta_steps" else \
            seconds_budget(trial_timeout)
        return optuna.pruners.HyperbandPruner(min_resource=low, max_resource=high,
                                              reduction_factor=HYPERBAND_ETA)
    if name == "wilcoxon":
        with warnings.catch_warnings():  # flagged experimental since Optuna 3.6
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.pruners.WilcoxonPruner(p_threshold=WILCOXON_P,
                                                 n_startup_steps=WILCOXON_STARTUP)
    if name == "none":
        return optuna.pruners.NopPruner()
    return _from_plugin(host, "pruner", name, optuna.pruners.BasePruner,
                        meta_steps=meta_steps, eval_every=eval_every, direction=direction)


def seconds_budget(trial_timeout: float | None) -> tuple[int, int]:
    """Hyperband's ``(min_resource, max_resource)`` in whole seconds of meta-training: up
    to ``trial_timeout``, from a ninth of it (two rungs of :data:`HYPERBAND_ETA` below),
    both rounded up and 1 s at least.

    Rounded up, the third rung (nine times the first) falls at or after the time limit,
    where a trial's last evaluation is never pruned, rather than a moment before it: with
    ``trial_timeout = 300``, rungs at 34 s and 102 s (and 306 s, never reached).

    Raises:
        ConfigError: ``trial_timeout`` is None (the config refuses that before).
    """
    if trial_timeout is None:
        raise ConfigError("pruner_resource: 'seconds' needs trial_timeout")
    return (max(1, math.ceil(trial_timeout / HYPERBAND_ETA**2)),
            max(1, math.ceil(trial_timeout)))


def _from_plugin(host: PluginHost | None, kind: Kind, name: str, base: type, **kwargs: Any
                 ) -> Any:
    """``factory(**kwargs)`` of the ``kind`` plugin ``name``, checked to be a ``base``."""
    builtin = PRUNERS if kind == "pruner" else SAMPLERS
    if host is None or not host.registered(kind, name):
        plugins = host.names(kind) if host is not None else []
        raise PluginError(f"unknown {kind} {name!r}{closest(name, [*builtin, *plugins])}; "
                          f"built in: {', '.join(builtin)}; from plugins: "
                          f"{', '.join(plugins) or 'none installed'} (see `autometa plugins`)")
    reg = host.get(kind, name)
    factory = reg.load()
    with reg.guard("raised when called"):
        made = factory(**kwargs)
    if not isinstance(made, base):
        raise PluginError(f"{kind} {name!r} from plugin {reg.origin} returned a "
                          f"{type(made).__name__}; expected an {base.__module__.split('.')[0]}."
                          f"{base.__module__.split('.')[1]}.{base.__name__}")
    return made


def trial_sampler(seed: int, number: int, kind: str = "tpe", study: str = "",
                  host: PluginHost | None = None) -> optuna.samplers.BaseSampler:
    """The sampler that proposes trial ``number`` of study ``study`` seeded ``seed``.

    Seeded per trial number rather than once per process: whichever worker or process
    claims a trial samples it the same way, no two trials share a random stream (so
    parallel workers never repeat each other's random start-up proposals), and a resumed
    study continues where it stopped instead of restarting its sequence. The study's name
    enters the seed too: a study warm-started from another of the same seed would
    otherwise propose that study's configurations again.
    """
    name = zlib.crc32(study.encode())
    return sampler((seed * 1_000_003 + number * 104_729 + name) % 2**32, kind, host)


def strategy(config: SearchConfig, host: PluginHost | None = None,
             direction: str = "maximize") -> tuple[optuna.samplers.BaseSampler,
                                                   optuna.pruners.BasePruner]:
    """The study's sampler (seeded by the search seed) and pruner, from its settings
    (``host``: where plugins' samplers and pruners are found; ``direction``: the task
    metric's, passed to a plugin's pruner).

    Raises:
        PluginError: as :func:`sampler` and :func:`pruner`.
    """
    return (sampler(config.seed, config.sampler, host),
            pruner(config.pruner, meta_steps=config.meta_steps, eval_every=config.eval_every,
                   direction=direction, host=host, resource=config.pruner_resource,
                   trial_timeout=config.trial_timeout))
