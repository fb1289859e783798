"""The leaderboard: trials ranked on meta-val, the best ``top_k`` scored on meta-test.

Ranking uses validation scores only; the meta-test episodes are touched once per listed
trial, after the search, and the result (mean and 95% confidence interval over episodes)
is cached in the study so that re-reading a leaderboard does not re-evaluate. A task whose
episodes come from several domains (:meth:`autometa.task.Task.episode_domains`) is also
scored per domain, from the same per-episode scores (:attr:`Leaderboard.by_domain`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
import torch

from autometa import comparison
from autometa.caveats import interval_cell, interval_text, leaderboard_caveats, val_count
from autometa.config import DEFAULT_STORAGE
from autometa.errors import ConfigError
from autometa.metrics import mean_ci95, tie_groups
from autometa.predictor import Predictor, pick
from autometa.report import write_report
from autometa.report.compare import comparison_markdown
from autometa.report.domains import domain_matrix
from autometa.study.baselines import baseline_first, is_baseline, searched
from autometa.study.build import trial_defaults
from autometa.study.completion import group_bests
from autometa.study.settings import stored_settings
from autometa.study.stored import open_stored
from autometa.study.trials import (
    TEST_ATTR,
    MetaTestScore,
    TrialPlan,
    ranked_trials,
    recorded_test,
    state_counts,
)
from autometa.trial import restore, score_meta_test

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    import optuna

    from autometa.plugins import PluginHost
    from autometa.task import Task


#: What the ``tie`` column means, for people reading a table.
TIE_NOTE = ("Trials with the same tie group cannot be told apart on meta-test (paired "
            "Wilcoxon signed-rank test on the same episodes, Holm-corrected, α = 0.05); "
            "group 1 is tied with the best.")


@dataclass
class Leaderboard:
    """A ranked table of a study's completed trials.

    Attributes:
        frame: one row per completed trial, best first. Columns: ``rank``, ``trial``,
            ``algorithm``, ``source``, ``baseline`` (True for a baseline trial, README:
            Baselines), ``val_<metric>``, ``train_<metric>`` (a task with a train split
            only: the model adapted on it, scored on it), ``test_<metric>``,
            ``test_ci95`` (the interval's larger half-width), ``test_ci_low`` and
            ``test_ci_high`` (its bounds), ``test_n`` and ``test_ci_over`` (what the
            interval is over: ``episodes``, or ``examples`` of a target dataset's single
            test split), ``test_ci_method`` (``student-t`` over episodes, ``wilson`` for
            an accuracy over test examples; :mod:`autometa.intervals`),
            ``tie_group`` (scored trials that a Holm-corrected paired Wilcoxon test on the
            same meta-test episodes cannot tell apart share a group; 1 = tied with the
            best), ``p_vs_best`` (that adjusted p-value against the best), ``fit_time_s``
            (meta-training seconds), ``adapt_ms`` (milliseconds to adapt to and predict
            one meta-val episode), ``peak_mem_mb`` (peak CUDA memory, MiB; empty on a
            CPU), ``params`` (text; with the task's per-trial settings that differ from
            their defaults), then one column per searched hyperparameter
            (``<plugin>.<name>``, empty where a trial's plugins lack it; ``task.<name>``
            for a searched per-trial task setting). Test columns are empty beyond the
            ``top_k`` best searched trials, the best of each algorithm and of each source,
            and the baselines.
        counts: trials per final state (complete, pruned, failed, interrupted, running).
        by_domain: for a task whose episodes come from several domains, meta-test per
            domain: one row per (scored trial, domain), trials best first and domains
            sorted. Columns: ``rank``, ``trial``, ``algorithm``, ``source``, ``domain``,
            ``test_<metric>`` (mean over the domain's meta-test episodes), ``test_ci95``
            (half-width, Student's t), ``test_n`` (its episodes). None for a
            single-domain task.
        by_algorithm: the best fully trained trial of each algorithm beside the ranking
            (:func:`autometa.comparison.compare`): its rank, meta-val, meta-test and tie
            group; the baselines as rows of their own; an algorithm with no fully trained
            trial as a row saying how its trials ended. None if detached.
        by_source: the same per source model.
    """

    study_name: str
    task: str
    metric: str
    direction: str
    frame: pd.DataFrame
    counts: dict[str, int]
    #: Whether the CLI writes this leaderboard's reports: False for a snapshot of a study
    #: still running elsewhere, and for every process of one search but the one that
    #: finished it (the reports are written once).
    writes_reports: bool = True
    #: The study (trials, their learning curves and user attributes), None if detached.
    study: optuna.Study | None = field(default=None, repr=False)
    #: What the study stored about its search (``autometa.config``: settings, versions,
    #: task description, input hashes).
    stored: dict[str, Any] = field(default_factory=dict, repr=False)
    #: Per-episode (or per-example) meta-test scores of each scored trial, by trial number:
    #: the paired samples behind ``tie_group``.
    test_scores: dict[int, list[float]] = field(default_factory=dict, repr=False)
    context: _Context | None = field(default=None, repr=False)
    by_domain: pd.DataFrame | None = field(default=None, repr=False)
    #: Sentences saying what the scores rest on too little to tell (:mod:`autometa.caveats`):
    #: few meta-test episodes or examples, a saturated meta-val.
    caveats: list[str] = field(default_factory=list)
    by_algorithm: pd.DataFrame | None = field(default=None, repr=False)
    by_source: pd.DataFrame | None = field(default=None, repr=False)

    @property
    def best(self) -> pd.Series:
        """The top row."""
        if self.frame.empty:
            raise ConfigError(f"study {self.study_name!r} has no completed trial yet")
        return self.frame.iloc[0]

    def to_markdown(self) -> str:
        """A Markdown report: a header line and the table."""
        arrow = "lower is better" if self.direction == "minimize" else "higher is better"
        counts = ", ".join(f"{v} {k}" for k, v in self.counts.items() if v)
        lines = [
            f"# autometa leaderboard: {self.study_name}",
            "",
            f"Task `{self.task}`, metric {self.metric} ({arrow}); trials: {counts or 'none'}. "
            f"Ranked on meta-val; meta-test shown as mean and {self.ci_text}. "
            f"{TIE_NOTE}",
            "",
            *([_md_escape(self.baseline_note), ""] if self.baseline_note else []),
            *(f"**Warning:** {c}\n" for c in self.caveats),
        ]
        rows = self.display_rows()
        header = list(rows[0]) if rows else list(self.display_columns())
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "|".join("---" for _ in header) + "|")
        for row in rows:
            lines.append("| " + " | ".join(_md_escape(v) for v in row.values()) + " |")
        if self.by_domain is not None:
            lines += ["", "## Per domain", "",
                      f"Meta-test {self.metric} on each domain's episodes (mean ± 95% CI); "
                      "columns: the scored trials in rank order.", ""]
            header, cells = self.domain_rows()
            lines.append("| " + " | ".join(header) + " |")
            lines.append("|" + "|".join("---" for _ in header) + "|")
            lines += ["| " + " | ".join(_md_escape(v) for v in row) + " |" for row in cells]
        for key, table in self.comparisons():
            lines += comparison_markdown(table, key, self.metric)
        return "\n".join(lines) + "\n"

    def comparisons(self) -> list[tuple[str, pd.DataFrame]]:
        """``[("algorithm", by_algorithm), ("source", by_source)]``, those present."""
        return [(k, t) for k, t in (("algorithm", self.by_algorithm),
                                    ("source", self.by_source)) if t is not None]

    @property
    def baseline_note(self) -> str:
        """One sentence if a baseline ranks first (:mod:`autometa.study.baselines`), else
        empty."""
        if self.frame.empty or not _true(self.frame.iloc[0].get("baseline")):
            return ""
        return baseline_first(self.best["algorithm"], self.best["source"])

    @property
    def ci_over(self) -> str:
        """What the test intervals are over: "episodes" or "examples" (a target dataset)."""
        over = {u for u in self.frame["test_ci_over"] if isinstance(u, str) and u}
        return " and ".join(sorted(over)) or "episodes"

    @property
    def ci_text(self) -> str:
        """Which intervals the test column shows: "95% CI over 600 episodes, Student t"."""
        return interval_text(self.frame)

    def display_columns(self) -> list[str]:
        """Column headers of :meth:`display_rows` (the metric is named in the title)."""
        return ["rank", "trial", "algorithm", "source", "val", "test (95% CI)", "tie", "params"]

    def display_rows(self) -> list[dict[str, str]]:
        """Rows formatted for people (terminal and Markdown)."""
        out = []
        for d in self.frame.to_dict("records"):
            test = d[f"test_{self.metric}"]
            test_text = "" if _nan(test) else interval_cell(d, test)
            group = d.get("tie_group")
            tie = "" if group is None or pd.isna(group) else str(group)
            algorithm = d["algorithm"] + (" (baseline)" if _true(d.get("baseline")) else "")
            values = [str(d["rank"]), str(d["trial"]), algorithm, d["source"],
                      f"{d[f'val_{self.metric}']:.4g}", test_text, tie, d["params"]]
            out.append(dict(zip(self.display_columns(), values, strict=True)))
        return out

    def domain_rows(self) -> tuple[list[str], list[list[str]]]:
        """:attr:`by_domain` for people (terminal and Markdown): a header and one row per
        domain, the scored trials as columns (:func:`autometa.report.domains.domain_matrix`);
        no rows for a single-domain task."""
        if self.by_domain is None:
            return [], []
        header, rows, _ = domain_matrix(self.by_domain, self.metric, self.direction)
        return header, rows

    def write(self, directory: str | Path) -> list[Path]:
        """Write ``<study>.csv`` and ``<study>.md`` into ``directory``, and
        ``<study>-domains.csv`` (:attr:`by_domain`) for a multi-domain task,
        ``<study>-algorithms.csv`` and ``<study>-sources.csv`` (:attr:`by_algorithm`,
        :attr:`by_source`); returns the paths."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        csv_path = directory / f"{self.study_name}.csv"
        md_path = directory / f"{self.study_name}.md"
        self.frame.to_csv(csv_path, index=False)
        md_path.write_text(self.to_markdown(), encoding="utf-8")
        paths = [csv_path, md_path]
        if self.by_domain is not None:
            paths.append(directory / f"{self.study_name}-domains.csv")
            self.by_domain.to_csv(paths[-1], index=False)
        for key, table in self.comparisons():
            paths.append(directory / f"{self.study_name}-{key}s.csv")
            table.to_csv(paths[-1], index=False)
        return paths

    def report(self, path: str | Path) -> Path:
        """Write the HTML report (``<study>.html``) into the directory ``path``; returns
        the file's path.

        See :func:`autometa.report.write_report` for what it holds and the errors raised.
        """
        return write_report([self], path)

    def model(self, rank: int = 1) -> Predictor:
        """The trial ranked ``rank`` on meta-val, meta-trained and ready to adapt and
        predict (see :class:`autometa.predictor.Predictor`).

        Raises:
            ConfigError: ``rank`` is not that of a completed trial, this leaderboard is
                not attached to its study, or the trial's state is not in the store.
            DataError: the state is damaged.
        """
        if self.study is None or self.context is None:
            raise ConfigError("this leaderboard is not attached to its study; use "
                              "autometa.load_model(study, rank, storage=...)")
        c = self.context
        return Predictor.from_trial(self.study, pick(self.study, rank), c.task, c.host,
                                    artifacts=c.artifacts, root=c.root, rank=rank)


def _number(value: Any) -> float:
    """A stored number, NaN where none was recorded."""
    return math.nan if value is None else float(value)


def _true(value: Any) -> bool:
    """A stored flag (a leaderboard without the column gives None: False)."""
    return bool(pd.notna(value) and value)


def _nan(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def compute_leaderboard(
    study: optuna.Study, task: Task, host: PluginHost, *, top_k: int, artifacts: str,
    root: Path | None = None, cache: bool = True,
    phase: Callable[[str], None] = lambda text: None,
) -> Leaderboard:
    """Rank ``study``'s completed trials and score the ``top_k`` best on meta-test.

    A trial among the best ``top_k`` when it finished was scored by its worker (its
    ``test_*`` user attributes); any other listed trial is rebuilt here, its state
    downloaded and scored, and the result cached in the study. Scored trials are grouped
    into statistical ties (:func:`autometa.metrics.tie_groups`).

    Args:
        artifacts: the artifact store the trials' states were uploaded to (a directory or
            ``s3://bucket``, see :mod:`autometa.study.artifacts`).
        root: where relative input paths resolve (default: the working directory).
        cache: store new meta-test scores in the study; False for a snapshot of a study
            that is still running (nothing is written to the storage then).
        phase: told what is being done when trials must be scored here (a progress line).

    Raises:
        ConfigError: a listed trial's state is not in the store.
    """
    from optuna.trial import TrialState

    metric = task.metric
    stored = stored_settings(study)
    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    ranked = ranked_trials(study, complete)  # without those pruned during evaluation
    context = _Context(task, host, artifacts, root)
    # The best top_k searched trials, the best of each algorithm and source (the
    # comparison tables), and every baseline (taking no place among them).
    best = {t.number for t in searched(ranked)[:top_k]} | group_bests(searched(ranked))
    listed = [t for t in ranked if t.number in best or is_baseline(t)]
    tests = {n: test.with_interval(binary=metric.binary) for n, test in
             _meta_test_scores(study, listed, context, cache, phase).items()}
    scored = [t.number for t in listed if t.number in tests and not tests[t.number].failure]
    groups, pvalues = tie_groups([list(tests[n].scores) for n in scored])
    tie = dict(zip(scored, zip(groups, pvalues, strict=True), strict=True))
    rows, hyper = [], sorted({k for t in ranked for k in t.params} - {"algorithm", "source"})
    task_defaults = trial_defaults(task)  # "params" names the task settings changed
    for rank, t in enumerate(ranked, start=1):
        plan = TrialPlan.of(t)
        test = tests.get(t.number)
        group, p = tie.get(t.number, (None, math.nan))
        rows.append({
            "rank": rank,
            "trial": t.number,
            "algorithm": plan.algorithm,
            "source": plan.source,
            "baseline": is_baseline(t),
            f"val_{metric.name}": t.value,
            f"train_{metric.name}": test.train if test else math.nan,
            f"test_{metric.name}": test.mean if test else math.nan,
            "test_ci95": test.ci95 if test else math.nan,
            "test_ci_low": test.low if test else math.nan,
            "test_ci_high": test.high if test else math.nan,
            "test_n": test.n if test else 0,
            "test_ci_over": test.over if test and not test.failure else "",
            "test_ci_method": test.method if test and not test.failure else "",
            "tie_group": group,
            "p_vs_best": p,
            **{k: _number(t.user_attrs.get(k)) for k in COST_COLUMNS},
            "params": plan.params_text(task_defaults),
            **{k: t.params.get(k) for k in hyper},
        })
    columns = ["rank", "trial", "algorithm", "source", "baseline", f"val_{metric.name}",
               f"train_{metric.name}", f"test_{metric.name}", "test_ci95", "test_ci_low",
               "test_ci_high", "test_n", "test_ci_over", "test_ci_method", "tie_group",
               "p_vs_best", *COST_COLUMNS, "params", *hyper]
    frame = pd.DataFrame(rows, columns=columns)
    if frame[f"train_{metric.name}"].isna().all():  # no train split (few-shot episodes)
        frame = frame.drop(columns=f"train_{metric.name}")
    frame["tie_group"] = frame["tie_group"].astype("Int64")
    for k in hyper:  # as sampled: an integer stays one beside trials that lack it
        frame[k] = pd.Series([row[k] for row in rows], dtype=object)
    counts = state_counts(trials, len(complete) - len(ranked))
    by_domain = _by_domain(frame, {n: list(tests[n].scores) for n in scored},
                           task.episode_domains("meta-test"), metric.name)
    return Leaderboard(
        study_name=study.study_name,
        task=stored.get("config", {}).get("task", "?"),
        metric=metric.name,
        direction=metric.direction,
        frame=frame,
        counts=counts,
        study=study,
        stored=stored,
        test_scores={n: list(tests[n].scores) for n in scored},
        context=context,
        by_domain=by_domain,
        caveats=leaderboard_caveats(frame, metric, val_count(task), ranked),
        by_algorithm=comparison.compare(frame, trials, "algorithm", metric.name, stored),
        by_source=comparison.compare(frame, trials, "source", metric.name, stored),
    )


#: Columns of :attr:`Leaderboard.by_domain` before the metric's.
DOMAIN_KEYS = ("rank", "trial", "algorithm", "source", "domain")


def _by_domain(frame: pd.DataFrame, scores: dict[int, list[float]],
               domains: list[str] | None, metric: str) -> pd.DataFrame | None:
    """Meta-test per (scored trial, domain) from the per-episode ``scores`` (by trial
    number) and each episode's domain (None: a single-domain task, no table)."""
    if domains is None:
        return None
    rows = []
    for d in frame.to_dict("records"):  # best first
        mine = scores.get(int(d["trial"]))
        if mine is None:
            continue
        if len(mine) != len(domains):  # scored on other episodes (an older version?)
            log.warning("trial %s has %d meta-test scores for %d episodes with a domain; "
                        "it is left out of the per-domain table", d["trial"], len(mine),
                        len(domains))
            continue
        by = torch.tensor(mine, dtype=torch.float64)
        for domain in sorted(set(domains)):
            picked = by[torch.tensor([e == domain for e in domains])]  # (its episodes,)
            mean, half = mean_ci95(picked)
            rows.append({**{k: d[k] for k in DOMAIN_KEYS[:4]}, "domain": domain,
                         f"test_{metric}": mean, "test_ci95": half, "test_n": len(picked)})
    return pd.DataFrame(rows, columns=[*DOMAIN_KEYS, f"test_{metric}", "test_ci95", "test_n"])


#: Cost columns of the leaderboard: the trial user attributes a worker records
#: (:data:`autometa.study.trials.COST_ATTRS`): meta-training seconds, milliseconds to adapt
#: to and predict one episode, peak CUDA memory in MiB (empty on a CPU).
COST_COLUMNS = ("fit_time_s", "adapt_ms", "peak_mem_mb")


@dataclass(frozen=True)
class _Context:
    """What rebuilding a listed trial's model needs (scoring it, or handing it back)."""

    task: Task
    host: PluginHost
    artifacts: str
    root: Path | None


def _meta_test_scores(study: optuna.Study, listed: list[optuna.trial.FrozenTrial],
                      context: _Context, cache: bool, phase: Callable[[str], None]
                      ) -> dict[int, MetaTestScore]:
    """The meta-test result of each of the ``listed`` trials: from its user attributes
    (scored by its worker), from the study's cache, or scored now (and cached)."""
    cached: dict[str, dict[str, Any]] = dict(study.user_attrs.get(TEST_ATTR, {}))
    tests: dict[int, MetaTestScore] = {}
    missing = []
    for t in listed:
        test = recorded_test(t, cached)
        if test is not None:
            tests[t.number] = test
        else:
            missing.append(t)
    if not missing:
        return tests
    phase(f"scoring {len(missing)} trial(s) on meta-test")
    for t in missing:
        algorithm = restore(study, t, context.task, context.host,
                            artifacts=context.artifacts, root=context.root)
        test = score_meta_test(algorithm, context.task, precision=TrialPlan.of(t).precision)
        if test.failure:  # listed without a test score, never ranked on NaN
            log.warning("trial %d has no meta-test score: %s", t.number, test.failure)
        tests[t.number] = test
        cached[str(t.number)] = test.to_json()
        if cache:
            study.set_user_attr(TEST_ATTR, cached)
    return tests


def check_top_k(top_k: object) -> int:
    """``top_k`` if it is a positive integer (trials scored on meta-test), else ConfigError."""
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ConfigError(f"top_k: expected a positive number of trials to score on meta-test, "
                          f"got {top_k!r}")
    return top_k


def load_leaderboard(
    study_name: str,
    storage: str | None = None,
    *,
    host: PluginHost | None = None,
    top_k: int | None = None,
    artifacts: str | None = None,
    data_root: str | None = None,
    device: str | None = None,
    cache_dir: str | None = None,
) -> Leaderboard:
    """The leaderboard of a stored study (evaluating on meta-test what is not cached yet).

    A study with trials still running is shown as it stands and nothing is written to the
    storage (its meta-test scores are cached once it has finished). Any machine with the
    storage, the artifact store and the same input files computes the same leaderboard.

    Args:
        artifacts: the artifact store as this machine reaches it (default: the study's).
        data_root: where relative input paths resolve (default: the working directory).
        device: the torch device to score on (default: the study's first device).
        cache_dir: where an image task's decoded store is (default:
            :func:`autometa.cache.cache_dir`).

    Raises:
        ConfigError: no such study, an input file that differs from the study's, or a
            trial state missing from the store; nothing is written then.
    """
    from optuna.trial import TrialState

    if top_k is not None:
        check_top_k(top_k)
    stored = open_stored(study_name, storage or DEFAULT_STORAGE, host=host,
                         artifacts=artifacts, data_root=data_root, device=device,
                         cache_dir=cache_dir)
    task = stored.build_task()
    study = stored.study
    running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    return compute_leaderboard(study, task, stored.host, top_k=top_k or stored.config.top_k,
                               artifacts=stored.config.artifacts, root=stored.root,
                               cache=not running)
