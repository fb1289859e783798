"""The leaderboard: trials ranked on meta-val, the best ``top_k`` scored on meta-test.

Ranking uses validation scores only; the meta-test episodes are touched once per listed
trial, after the search, and the result (mean and 95% confidence interval over episodes)
is cached in the study so that re-reading a leaderboard does not re-evaluate.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from autometa.errors import ConfigError

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    import optuna

    from autometa.plugins import PluginHost
    from autometa.task import Task

#: Study user attribute caching meta-test results: {trial number: {mean, ci95, n, over}}.
TEST_ATTR = "autometa.test"


@dataclass
class Leaderboard:
    """A ranked table of a study's completed trials.

    Attributes:
        frame: one row per completed trial, best first. Columns: ``rank``, ``trial``,
            ``algorithm``, ``source``, ``val_<metric>``, ``test_<metric>``,
            ``test_ci95`` (half-width), ``test_n`` and ``test_ci_over`` (what the interval
            is over: ``episodes``, or ``examples`` of a target dataset's single test split),
            ``params``. Test columns are empty beyond the ``top_k`` best.
        counts: trials per final state (complete, pruned, failed, running).
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
    report: bool = True

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
            f"Ranked on meta-val; meta-test shown as mean ± 95% CI over {self.ci_over}.",
            "",
        ]
        rows = self.display_rows()
        header = list(rows[0]) if rows else list(self.display_columns())
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "|".join("---" for _ in header) + "|")
        for row in rows:
            lines.append("| " + " | ".join(_md_escape(v) for v in row.values()) + " |")
        return "\n".join(lines) + "\n"

    @property
    def ci_over(self) -> str:
        """What the test intervals are over: "episodes" or "examples" (a target dataset)."""
        over = {u for u in self.frame["test_ci_over"] if isinstance(u, str) and u}
        return " and ".join(sorted(over)) or "episodes"

    def display_columns(self) -> list[str]:
        return ["rank", "trial", "algorithm", "source", f"val {self.metric}",
                f"test {self.metric} (95% CI)", "params"]

    def display_rows(self) -> list[dict[str, str]]:
        """Rows formatted for people (terminal and Markdown)."""
        out = []
        for d in self.frame.to_dict("records"):
            test = d[f"test_{self.metric}"]
            test_text = "" if _nan(test) else f"{test:.4g} ± {d['test_ci95']:.2g}"
            values = [str(d["rank"]), str(d["trial"]), d["algorithm"], d["source"],
                      f"{d[f'val_{self.metric}']:.4g}", test_text, d["params"]]
            out.append(dict(zip(self.display_columns(), values, strict=True)))
        return out

    def write(self, directory: str | Path) -> list[Path]:
        """Write ``<study>.csv`` and ``<study>.md`` into ``directory``; returns the paths."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        csv_path = directory / f"{self.study_name}.csv"
        md_path = directory / f"{self.study_name}.md"
        self.frame.to_csv(csv_path, index=False)
        md_path.write_text(self.to_markdown(), encoding="utf-8")
        return [csv_path, md_path]


def _nan(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def compute_leaderboard(
    study: optuna.Study, task: Task, host: PluginHost, *, top_k: int, artifacts: str,
    root: Path | None = None, cache: bool = True,
) -> Leaderboard:
    """Rank ``study``'s completed trials and score the ``top_k`` best on meta-test.

    Args:
        artifacts: the artifact store the trials' states were uploaded to (a directory or
            ``s3://bucket``, see :mod:`autometa.engine.artifacts`).
        root: where relative input paths resolve (default: the working directory).
        cache: store new meta-test scores in the study; False for a snapshot of a study
            that is still running (nothing is written to the storage then).

    Raises:
        ConfigError: a listed trial's state is not in the store.
    """
    import tempfile

    from optuna.trial import TrialState

    from autometa.engine.artifacts import download_state, open_store
    from autometa.engine.storage import CONFIG_ATTR
    from autometa.metrics import mean_ci95
    from autometa.trial import (
        Diverged,
        TrialPlan,
        build,
        evaluate,
        load_state,
        scored_per_example,
        trial_seed,
    )

    metric = task.metric
    stored = study.user_attrs.get(CONFIG_ATTR, {})
    search_seed = stored.get("config", {}).get("seed", 0)
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    sign = 1.0 if metric.direction == "minimize" else -1.0
    ranked = sorted(complete, key=lambda t: (sign * float(t.value or 0.0), t.number))

    tested: dict[str, dict[str, Any]] = dict(study.user_attrs.get(TEST_ATTR, {}))
    untested = [t for t in ranked[:top_k] if str(t.number) not in tested]
    store = open_store(artifacts, study.study_name) if untested else None
    tmp = tempfile.TemporaryDirectory(prefix="autometa-states-")
    rows = []
    for rank, t in enumerate(ranked, start=1):
        plan = TrialPlan(**{k: t.user_attrs[k] for k in
                            ("algorithm", "source", "algorithm_params", "source_params")})
        test: dict[str, Any] = {"mean": math.nan, "ci95": math.nan, "n": 0, "over": ""}
        if rank <= top_k:
            key = str(t.number)
            if key not in tested:
                assert store is not None
                state = download_state(study, t, store, artifacts, Path(tmp.name))
                algorithm = build(host, task, plan, trial_seed(search_seed, t.number), root)
                load_state(algorithm, state, f"trial {t.number}'s state in {artifacts!r}")
                if state.parent == Path(tmp.name):
                    state.unlink()
                episodes = task.meta_test()
                try:
                    scores = evaluate(algorithm, episodes, task, split="meta-test")
                except Diverged as exc:  # listed without a test score, never ranked on NaN
                    log.warning("trial %d has no meta-test score: %s", t.number, exc)
                    tested[key] = {"mean": math.nan, "ci95": math.nan, "n": 0, "over": "",
                                   "failure": f"diverged: {exc}"}
                else:
                    mean, half = mean_ci95(scores)
                    over = "examples" if scored_per_example(episodes, task) else "episodes"
                    tested[key] = {"mean": mean, "ci95": half, "n": len(scores), "over": over}
                if cache:
                    study.set_user_attr(TEST_ATTR, tested)
            test = {"n": tested[key].get("episodes", 0), "over": "episodes", **tested[key]}
        rows.append({
            "rank": rank,
            "trial": t.number,
            "algorithm": plan.algorithm,
            "source": plan.source,
            f"val_{metric.name}": t.value,
            f"test_{metric.name}": test["mean"],
            "test_ci95": test["ci95"],
            "test_n": int(test["n"]),
            "test_ci_over": test["over"],
            "params": plan.params_text(),
        })
    tmp.cleanup()
    columns = ["rank", "trial", "algorithm", "source", f"val_{metric.name}",
               f"test_{metric.name}", "test_ci95", "test_n", "test_ci_over", "params"]
    counts = {
        "complete": len(complete),
        "pruned": sum(t.state == TrialState.PRUNED for t in study.trials),
        "failed": sum(t.state == TrialState.FAIL for t in study.trials),
        "running": sum(t.state == TrialState.RUNNING for t in study.trials),
    }
    return Leaderboard(
        study_name=study.study_name,
        task=stored.get("config", {}).get("task", "?"),
        metric=metric.name,
        direction=metric.direction,
        frame=pd.DataFrame(rows, columns=columns),
        counts=counts,
    )


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
) -> Leaderboard:
    """The leaderboard of a stored study (evaluating on meta-test what is not cached yet).

    A study with trials still running is shown as it stands and nothing is written to the
    storage (its meta-test scores are cached once it has finished). Any machine with the
    storage, the artifact store and the same input files computes the same leaderboard.

    Args:
        artifacts: the artifact store as this machine reaches it (default: the study's).
        data_root: where relative input paths resolve (default: the working directory).
        device: the torch device to score on (default: the study's first device).

    Raises:
        ConfigError: no such study, an input file that differs from the study's, or a
            trial state missing from the store; nothing is written then.
    """
    import optuna
    from optuna.trial import TrialState

    from autometa.config import DEFAULT_STORAGE
    from autometa.engine.inputs import check_same, fingerprints, path_settings, root_of
    from autometa.engine.prepare import build_task, check_device, parse_task_params
    from autometa.engine.storage import open_storage, stored_search
    from autometa.plugins import create_host

    if top_k is not None:
        check_top_k(top_k)
    storage = storage or DEFAULT_STORAGE
    config, inputs, _ = stored_search(study_name, storage, artifacts=artifacts,
                                   data_root=data_root, device=device)
    host = host or create_host()
    params = parse_task_params(config, host)
    root = root_of(config.data_root)
    paths = path_settings(host.get("task", config.task).load(), params, "task_params")
    check_same(inputs, fingerprints(paths, root), paths, root, study_name)
    task = build_task(config, host, params, check_device(config.device))
    study = optuna.load_study(study_name=study_name,
                              storage=open_storage(storage, create_tables=False))
    running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    return compute_leaderboard(study, task, host, top_k=top_k or config.top_k,
                               artifacts=config.artifacts,
                               root=Path(data_root) if data_root is not None else None,
                               cache=not running)
