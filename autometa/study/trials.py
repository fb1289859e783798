"""What a stored trial holds: the plan it ran (plugins and hyperparameters, in its user
attributes), its seed, its place in the ranking, its learning curve and its meta-test
score. The engine writes these (a worker), the results read them (leaderboard, report,
Predictor); one definition serves both.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from autometa.intervals import interval_of
from autometa.precision import DEFAULT_PRECISION

#: User attribute of a trial the Wilcoxon pruner stopped during its final evaluation: it is
#: COMPLETE with its running mean (for the sampler), and never ranked.
PRUNED_ATTR = "pruned"
#: User attribute holding ``[[meta_step, meta-val score], ...]`` when the intermediate
#: values are not the learning curve: per-episode scores (the Wilcoxon pruner), or scores
#: at whole seconds of meta-training (Hyperband with ``pruner_resource = "seconds"``).
CURVE_ATTR = "val_curve"
#: User attribute of a trial whose meta-training reached ``trial_timeout`` and stopped:
#: ``{"step": meta-steps run, "seconds": meta-training seconds}``. It was scored on the
#: model as it was then, like any finished trial.
STOPPED_ATTR = "stopped_at_timeout"
#: User attribute holding a trial's final meta-val scores, one per episode in episode
#: order (per example for a task scored per example), for the paired comparison with the
#: best baseline (:func:`prefer_baselines`); at most :data:`MAX_VAL_SCORES` of them.
VAL_SCORES_ATTR = "val_scores"
MAX_VAL_SCORES = 5000
#: A searched trial ranks above the best baseline only if a one-sided paired Wilcoxon
#: signed-rank test on their final meta-val scores finds it better at this level.
BASELINE_ALPHA = 0.05


def interrupted(trial: Any) -> bool:
    """A FAIL trial stopped from outside (Ctrl-C, SIGTERM, SIGHUP: its ``crash`` reason is
    "interrupted (...)", :func:`autometa.engine.worker.interruption`), not by its own fault;
    it was queued to run again."""
    return str(trial.state.name) == "FAIL" and str(
        trial.user_attrs.get("crash") or "").startswith("interrupted")


def state_counts(trials: list[Any], pruned_in_evaluation: int = 0) -> dict[str, int]:
    """Trials per final state as people read it: ``complete`` (ranked), ``pruned`` (with
    the ``pruned_in_evaluation`` told COMPLETE but never ranked), ``failed`` (by their
    own fault or a lost process), ``interrupted`` (:func:`interrupted`), ``running``."""
    states = [t.state.name for t in trials]
    return {
        "complete": states.count("COMPLETE") - pruned_in_evaluation,
        "pruned": states.count("PRUNED") + pruned_in_evaluation,
        "failed": states.count("FAIL") - sum(interrupted(t) for t in trials),
        "interrupted": sum(interrupted(t) for t in trials),
        "running": states.count("RUNNING"),
    }


def ranked(trial: Any) -> bool:
    """True if an Optuna trial takes a place in the ranking: COMPLETE, with a value, and
    not stopped part-way through its evaluation (:data:`PRUNED_ATTR`)."""
    from optuna.trial import TrialState

    return (trial.state == TrialState.COMPLETE and trial.value is not None
            and not trial.user_attrs.get(PRUNED_ATTR))


def rank_key(direction: str, value: float, number: int) -> tuple[float, int]:
    """The ranking's sort key: better meta-val first (``direction`` "minimize" or
    "maximize"), ties to the earlier trial."""
    return (value if direction == "minimize" else -value, number)


def ranked_trials(study: Any, complete: list[Any] | None = None) -> list[Any]:
    """The :func:`ranked` trials of an Optuna study (from ``complete``, its COMPLETE
    trials, if already read), best on meta-val first, except that a searched trial must
    beat the best baseline significantly to rank above it (:func:`prefer_baselines`):
    the leaderboard's order."""
    from optuna.study import StudyDirection
    from optuna.trial import TrialState

    if complete is None:
        complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    direction = "minimize" if study.direction == StudyDirection.MINIMIZE else "maximize"
    ordered = sorted((t for t in complete if ranked(t)),
                     key=lambda t: rank_key(direction, float(t.value), t.number))
    return prefer_baselines(ordered, direction)


def prefer_baselines(ordered: list[Any], direction: str, alpha: float = BASELINE_ALPHA
                     ) -> list[Any]:
    """``ordered`` (best meta-val first), with every searched trial ahead of the best
    baseline that does not beat it significantly on meta-val moved just behind it.

    The simpler answer wins unless the search shows it does not: a searched trial stays
    ahead only if a one-sided Wilcoxon signed-rank test (scipy) on the paired final
    meta-val scores (:func:`val_scores`: the same fixed episodes for every trial) finds
    it better at ``alpha``. A trial without paired scores (stored before they were, or
    over :data:`MAX_VAL_SCORES`) keeps its place. The order is otherwise unchanged.
    """
    from autometa.study.baselines import is_baseline

    first = next((i for i, t in enumerate(ordered) if is_baseline(t)), None)
    if not first:  # no baseline, or one is first already
        return ordered
    reference = val_scores(ordered[first])
    if reference is None:
        return ordered
    ahead: list[Any] = []
    behind: list[Any] = []
    for t in ordered[:first]:
        better = _beats(val_scores(t), reference, direction, alpha)
        (behind if better is False else ahead).append(t)
    return [*ahead, ordered[first], *behind, *ordered[first + 1:]]


def _beats(scores: list[float] | None, reference: list[float], direction: str,
           alpha: float) -> bool | None:
    """Whether ``scores`` beat ``reference`` (paired, one-sided Wilcoxon at ``alpha``);
    None if they cannot be paired."""
    if scores is None or len(scores) != len(reference):
        return None
    from scipy.stats import wilcoxon

    sign = 1.0 if direction == "maximize" else -1.0
    gains = [sign * (a - b) for a, b in zip(scores, reference, strict=True)]
    if not any(gains):  # the same scores everywhere: no gain
        return False
    return bool(wilcoxon(gains, alternative="greater").pvalue < alpha)


def val_scores(trial: Any) -> list[float] | None:
    """A trial's final meta-val scores, one per episode (or example) in order: those it
    recorded (:data:`VAL_SCORES_ATTR`), or, under the Wilcoxon pruner, its per-episode
    reports; None if it has neither."""
    recorded = trial.user_attrs.get(VAL_SCORES_ATTR)
    if recorded:
        return [float(v) for v in recorded]
    if CURVE_ATTR in trial.user_attrs:  # intermediate values are per-episode scores
        values = trial.intermediate_values
        if values and sorted(values) == list(range(len(values))):
            return [float(values[i]) for i in range(len(values))]
    return None


def learning_curve(trial: Any) -> dict[int, float]:
    """``{meta_step: meta-val score}`` of an Optuna trial, whatever its pruner."""
    if CURVE_ATTR in trial.user_attrs:
        return {int(step): float(score) for step, score in trial.user_attrs[CURVE_ATTR] or ()}
    return dict(trial.intermediate_values)


@dataclass(frozen=True)
class TrialPlan:
    """The configuration a trial runs: plugin names and their hyperparameters, and the
    task's per-trial settings (``Task.trial_params``, every one, defaults included: a
    stored trial is rebuilt with its own values even if a plugin's defaults change), and
    the precision it computes in (:mod:`autometa.precision`)."""

    algorithm: str
    source: str
    algorithm_params: dict[str, Any] = field(default_factory=dict)
    source_params: dict[str, Any] = field(default_factory=dict)
    task_params: dict[str, Any] = field(default_factory=dict)
    precision: str = DEFAULT_PRECISION  # "float32" or "bf16" (torch.autocast)

    @classmethod
    def of(cls, trial: Any) -> TrialPlan:
        """The plan a worker recorded in ``trial``'s user attributes (an Optuna trial;
        one recorded before per-trial task settings, or precisions, existed has none:
        the defaults, which it ran)."""
        attrs = trial.user_attrs
        return cls(**{k: attrs[k] for k in
                      ("algorithm", "source", "algorithm_params", "source_params")},
                   task_params=dict(attrs.get("task_params") or {}),
                   precision=str(attrs.get("precision") or DEFAULT_PRECISION))

    def describe(self, task_defaults: Mapping[str, Any] | None = None) -> str:
        """``maml(inner_lr=0.01, ...) + mlp(hidden=40)``, for logs; ``... on task(flip=True)``
        where task settings differ from ``task_defaults`` (all of them if None);
        ``... in bf16`` where the precision is not the default."""
        task = self._task_changes(task_defaults)
        return f"{self.algorithm}({_kv(self.algorithm_params, ', ')}) + " \
               f"{self.source}({_kv(self.source_params, ', ')})" \
               + (f" on task({_kv(task, ', ')})" if task else "") \
               + (f" in {self.precision}" if self.precision != DEFAULT_PRECISION else "")

    def params_text(self, task_defaults: Mapping[str, Any] | None = None) -> str:
        """``inner_lr=0.01 inner_steps=1 | hidden=40``, for tables that name the plugins (a
        source without settings adds nothing: ``C=1 normalize=True``);
        ``... | task: flip=True`` where task settings differ from ``task_defaults`` (all of
        them if None); ``... | bf16`` where the precision is not the default."""
        task = self._task_changes(task_defaults)
        source = _kv(self.source_params, " ")  # none (a baseline on raw inputs): no " | "
        return _kv(self.algorithm_params, " ") + (f" | {source}" if source else "") \
            + (f" | task: {_kv(task, ' ')}" if task else "") \
            + (f" | {self.precision}" if self.precision != DEFAULT_PRECISION else "")

    def _task_changes(self, defaults: Mapping[str, Any] | None) -> dict[str, Any]:
        if defaults is None:
            return dict(self.task_params)
        return {k: v for k, v in self.task_params.items()
                if k not in defaults or defaults[k] != v}


def _kv(params: Mapping[str, Any], sep: str) -> str:
    return sep.join(f"{k}={_short(v)}" for k, v in sorted(params.items()))


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def trial_seed(search_seed: int, trial_number: int) -> int:
    """A distinct, reproducible seed per trial."""
    return (search_seed * 1_000_003 + trial_number * 7_919) % (2**31 - 1)


@dataclass(frozen=True)
class MetaTestScore:
    """A model's meta-test result: the mean of ``scores`` and its 95% interval.

    ``scores`` has one value per meta-test episode, or per test example of a target
    dataset's single test split (``over``); every trial is scored on the same episodes, so
    two trials' ``scores`` are paired. The interval is ``[low, high]`` by ``method``
    (:mod:`autometa.intervals`: "student-t" over episodes, "wilson" for an accuracy over
    test examples); ``ci95`` is its larger half-width. ``failure`` is set (and the numbers
    NaN) when the predictions were not finite. ``train`` is the train score of a task with
    a fixed train split (:meth:`~autometa.task.Task.train_episodes`: the model adapted on
    the train split and scored on it), NaN for any other task.
    """

    mean: float
    ci95: float
    n: int
    over: str
    scores: tuple[float, ...] = ()
    failure: str = ""
    low: float = math.nan
    high: float = math.nan
    #: "student-t" or "wilson"; "" in a result stored before intervals had bounds.
    method: str = ""
    train: float = math.nan

    @classmethod
    def of(cls, scores: Sequence[float], over: str, *, binary: bool) -> MetaTestScore:
        """The result of ``scores`` (over "episodes" or "examples"), with its interval:
        Wilson's for 0/1 scores of one split's examples (``binary``: the task's metric
        is an accuracy), else Student's t (:func:`autometa.intervals.interval_of`)."""
        interval = interval_of(scores, binary=binary and over == "examples")
        return cls(interval.mean, interval.half_width, len(scores), over, tuple(scores),
                   low=interval.low, high=interval.high, method=interval.method)

    def with_interval(self, *, binary: bool) -> MetaTestScore:
        """This result with bounds: itself if it has them, else (stored before bounds
        existed) its interval computed again from its ``scores``, or, without scores,
        ``mean ± ci95`` as Student's t."""
        if self.method or self.failure:
            return self
        if self.scores:
            return MetaTestScore.of(self.scores, self.over, binary=binary)
        return replace(self, low=self.mean - self.ci95, high=self.mean + self.ci95,
                       method="student-t")

    def to_json(self) -> dict[str, Any]:
        return {"mean": self.mean, "ci95": self.ci95, "n": self.n, "over": self.over,
                "scores": list(self.scores), "low": self.low, "high": self.high,
                "method": self.method,
                **({"train": self.train} if self.train == self.train else {}),
                **({"failure": self.failure} if self.failure else {})}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> MetaTestScore:
        return cls(float(data["mean"]), float(data["ci95"]), int(data.get("n", 0)),
                   str(data.get("over", "")), tuple(map(float, data.get("scores", ()))),
                   str(data.get("failure", "")), _float(data.get("low")),
                   _float(data.get("high")), str(data.get("method", "")),
                   _float(data.get("train")))


def _float(value: Any) -> float:
    """A stored number, NaN where none was stored."""
    return math.nan if value is None else float(value)


#: Trial user attributes written by a worker (optuna-dashboard lists them per trial).
#: Costs: meta-training seconds, meta-steps run (fewer than the budget if pruned),
#: milliseconds to adapt to and predict one meta-val episode, peak CUDA memory in MiB
#: (CUDA devices only).
COST_ATTRS = ("fit_time_s", "meta_steps", "adapt_ms", "peak_mem_mb")
#: Study user attribute caching the meta-test results of listed trials that their worker
#: did not score: {trial number: {mean, ci95, n, over, scores}}.
TEST_ATTR = "autometa.test"
#: The meta-test result of a trial among the best ``top_k`` when it finished (trial user
#: attributes): mean, 95% interval (larger half-width, bounds, method), number of scores,
#: what they are over, and the per-episode scores; ``test_failure`` instead when its
#: predictions were not finite. ``train_mean``: the train score of a task with a train split.
TEST_ATTRS = ("test_mean", "test_ci95", "test_ci_low", "test_ci_high", "test_ci_method",
              "test_n", "test_ci_over", "test_scores", "train_mean")


def record_test(trial: Any, test: MetaTestScore) -> None:
    """Store a meta-test result as ``trial``'s user attributes (:data:`TEST_ATTRS`; an
    Optuna trial that is still running)."""
    if test.failure:
        trial.set_user_attr("test_failure", test.failure[:1000])
        return
    trial.set_user_attr("test_mean", test.mean)
    trial.set_user_attr("test_ci95", test.ci95 if test.ci95 == test.ci95 else None)
    trial.set_user_attr("test_ci_low", test.low if test.low == test.low else None)
    trial.set_user_attr("test_ci_high", test.high if test.high == test.high else None)
    trial.set_user_attr("test_ci_method", test.method)
    trial.set_user_attr("test_n", test.n)
    trial.set_user_attr("test_ci_over", test.over)
    trial.set_user_attr("test_scores", list(test.scores))
    if test.train == test.train:
        trial.set_user_attr("train_mean", test.train)


def recorded_test(trial: Any, cached: dict[str, Any]) -> MetaTestScore | None:
    """``trial``'s meta-test result: from its user attributes (scored by its worker, see
    :func:`record_test`), else from ``cached`` (the study's :data:`TEST_ATTR`); None if
    it was never scored."""
    attrs = trial.user_attrs
    if attrs.get("test_mean") is not None or attrs.get("test_failure"):
        return MetaTestScore(
            float(attrs.get("test_mean", math.nan)),
            float(attrs["test_ci95"] if attrs.get("test_ci95") is not None else math.nan),
            int(attrs.get("test_n", 0)), str(attrs.get("test_ci_over", "")),
            tuple(map(float, attrs.get("test_scores", ()))),
            str(attrs.get("test_failure", "")), _float(attrs.get("test_ci_low")),
            _float(attrs.get("test_ci_high")), str(attrs.get("test_ci_method") or ""),
            _float(attrs.get("train_mean")))
    if str(trial.number) in cached:
        return MetaTestScore.from_json(cached[str(trial.number)])
    return None
