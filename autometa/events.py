"""What lifecycle hooks receive: one frozen dataclass per event, and the trial attributes.

Every lifecycle hook (:mod:`autometa.hookspecs`) takes an ``event`` argument holding one
of these. Fields are only ever added (hooks evolve by adding, never removing), so a
reporter written against this version keeps working. Each event carries ``options``: the
receiving plugin's own settings, the ``[plugins.<name>]`` table of the config merged with
``--plugin-option <name>.KEY=VALUE`` flags (``<name>`` is the plugin's entry-point name),
and ``out``: the folder the command writes its reports to (``autometa run --out``), None
from Python unless given.

Where the events are sent (all in the process that runs the trial or the search):

=================  =============================================================  ======
event              when                                                           where
=================  =============================================================  ======
SearchStarted      the study is open, inputs checked, before the first trial      search
TrialStarted       a trial's configuration is sampled, before its model is built  worker
TrialPruned        a pruner stopped the trial (also marked by ``trial_finished``)  worker
TrialFailed        the trial raised (its reason in ``error``)                     worker
TrialFinished      after every trial, whatever its state                          worker
SearchFinished     the leaderboard is computed (not sent when the search raised)  search
SearchFailed       the search raised (bad input excluded: nothing had started)    search
=================  =============================================================  ======

With ``workers > 1`` trial events are sent in each worker process, which builds its own
plugin host from the installed entry points: in-process plugins (``create_host(
plugins=...)``) see the trial events of a one-worker search only.

This module imports neither torch nor Optuna.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import pandas as pd
    from optuna.trial import FrozenTrial

    from autometa.config import SearchConfig

__all__ = [
    "TRIAL_ATTRS",
    "Event",
    "LeaderboardLike",
    "SearchFailed",
    "SearchFinished",
    "SearchStarted",
    "TrialFailed",
    "TrialFinished",
    "TrialPruned",
    "TrialStarted",
]


@dataclass(frozen=True)
class Event:
    """Fields every event has."""

    study_name: str  # the Optuna study
    options: Mapping[str, Any] = field(default_factory=dict, kw_only=True)
    out: Path | None = field(default=None, kw_only=True)


@dataclass(frozen=True)
class SearchStarted(Event):
    """A search (or a worker joining one) is about to run its first trial."""

    config: SearchConfig  # the validated settings
    remaining: int | None  # trials left to run in the budget (None: until the timeout)


@dataclass(frozen=True)
class TrialStarted(Event):
    """A trial was claimed and its configuration sampled; meta-training starts next."""

    number: int  # the Optuna trial number
    algorithm: str  # meta-algorithm plugin name
    source: str  # source model plugin name
    params: Mapping[str, Any]  # Optuna's parameter names -> values ("maml.inner_lr": 0.01)
    device: str  # torch device of the trial, e.g. "cuda:1"


@dataclass(frozen=True)
class TrialPruned(Event):
    """A pruner stopped the trial after a meta-val evaluation."""

    trial: FrozenTrial  # the finished trial (state PRUNED, or COMPLETE + "pruned" for Wilcoxon)
    # the last step reported: a meta-step (Wilcoxon: a meta-val episode; Hyperband on
    # seconds: whole seconds of meta-training)
    step: int | None
    reason: str  # e.g. "hyperband: meta-val 0.41 at step 300"


@dataclass(frozen=True)
class TrialFailed(Event):
    """The trial raised (its plugin code, its data, a diverging loss)."""

    trial: FrozenTrial  # the finished trial (state FAIL)
    error: str  # one line, as in the report's failed trials: "ValueError: ..."


@dataclass(frozen=True)
class TrialFinished(Event):
    """A trial ended in any state: COMPLETE, PRUNED or FAIL (see ``trial.user_attrs``)."""

    trial: FrozenTrial


class LeaderboardLike(Protocol):
    """What ``SearchFinished.leaderboard`` offers: it is an :class:`autometa.Leaderboard`;
    this protocol names the part a hook uses, so that the plugin interface imports nothing
    above it (the leaderboard sits in the results layer)."""

    study_name: str
    task: str  # the task plugin's name
    metric: str  # the task metric's name; test/val columns are named after it
    direction: str  # "minimize" or "maximize"
    frame: pd.DataFrame  # one row per ranked trial, best first (see autometa.Leaderboard)
    counts: dict[str, int]  # trials per final state: complete, pruned, failed, running

    @property
    def best(self) -> pd.Series:
        """The top row."""
        ...

    def to_markdown(self) -> str:
        """A Markdown report: a header line and the table."""
        ...

    def write(self, directory: str | Path) -> list[Path]:
        """Write ``<study>.csv`` and ``<study>.md`` into ``directory``; their paths."""
        ...

    def report(self, path: str | Path) -> Path:
        """Write the HTML report into the directory ``path``; the file's path."""
        ...

    def model(self, rank: int = 1) -> Any:
        """The trial ranked ``rank``'s model, an :class:`autometa.predictor.Predictor`."""
        ...


@dataclass(frozen=True)
class SearchFinished(Event):
    """The search ran its trials and ranked them."""

    leaderboard: LeaderboardLike  # an autometa.Leaderboard


@dataclass(frozen=True)
class SearchFailed(Event):
    """The search raised after it started (a storage lost for good, Ctrl-C, a bug)."""

    error: BaseException  # the exception, re-raised after the hook


#: Trial user attributes (``FrozenTrial.user_attrs``) autometa writes, and what they hold.
#: optuna-dashboard shows them; reporters read them from ``event.trial``. Scores are in the
#: task metric's units (``leaderboard.metric``), times in seconds or milliseconds as named.
TRIAL_ATTRS: Mapping[str, str] = {
    "algorithm": "meta-algorithm plugin name",
    "source": "source model plugin name",
    "algorithm_params": "the algorithm's hyperparameters, without the plugin prefix",
    "source_params": "the source model's settings, without the plugin prefix",
    "task_params": "the task's per-trial settings (its trial_params), every one, defaults "
                   "included; {} for a task without them",
    "precision": "the arithmetic it trained and was scored in: 'float32', or 'bf16' "
                 "(torch.autocast; also its Optuna parameter 'precision' where searched)",
    "origin": "why the trial was queued first: 'portfolio' or 'warm start from <study> "
              "trial <n>' (absent for trials the sampler proposed)",
    "baseline": "True for a baseline trial: its plan was fixed when the study was created "
                "(nothing sampled), it uses no budget and is always scored on meta-test "
                "(absent for other trials)",
    "completion": "True for a completion trial: the best pruned configuration of an algorithm "
                  "left with no fully trained trial, re-run in full with pruning off, outside "
                  "the budget",
    "completes": "the number of the pruned trial a completion trial re-runs",
    "worker": "the process that ran it: {'host', 'pid', ...}",
    "fit_time_s": "meta-training seconds",
    "meta_steps": "meta-steps run (fewer than the budget when pruned or stopped at "
                  "trial_timeout)",
    "adapt_ms": "milliseconds to adapt to and predict one meta-val episode",
    "peak_mem_mb": "peak CUDA memory in MiB (CUDA devices only)",
    "val_curve": "[[meta-step, meta-val score], ...] (Wilcoxon pruner, or Hyperband on "
                 "seconds; else Optuna's intermediate values)",
    "stopped_at_timeout": "{'step': meta-steps run, 'seconds': meta-training seconds} of a "
                          "trial whose meta-training reached trial_timeout and stopped there "
                          "(scored on the model as it was then; absent for other trials)",
    "val_scores": "the final meta-val scores, one per episode (per example for a target "
                  "dataset, up to 5,000), paired with the best baseline's to rank (not under "
                  "the Wilcoxon pruner, whose per-episode reports are the intermediate values)",
    "pruned": "why a Wilcoxon-pruned trial stopped (it is COMPLETE with its running mean and "
              "never ranked)",
    "failure": "why a FAIL trial failed, one line",
    "crash": "why a trial was failed by another process (its worker died or went silent)",
    "test_mean": "meta-test mean, for a trial among the best top_k when it finished",
    "test_ci95": "95% interval's larger half-width around test_mean",
    "test_ci_low": "the 95% interval's lower bound",
    "test_ci_high": "the 95% interval's upper bound",
    "test_ci_method": "'student-t' (over episodes) or 'wilson' (an accuracy over test "
                      "examples)",
    "test_n": "number of meta-test scores (episodes, or test examples of a target dataset)",
    "test_ci_over": "what test_n counts: 'episodes' or 'examples'",
    "test_scores": "the meta-test scores, one per episode or example",
    "train_mean": "a target dataset's train score: the scored model adapted on its train "
                  "split and scored on it",
    "test_failure": "why meta-test scoring failed",
}
