"""`autometa report`: one offline HTML file per study or per set of studies, opened in a
real headless Chromium (tests/browser.py): no script error, every figure decoded, user
strings shown as text."""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pandas as pd
import pytest
from browser import open_page, screenshot_stats
from conftest import SMALL_SINUSOID

import autometa
from autometa.cli import main
from autometa.config import SearchConfig
from autometa.leaderboard import Leaderboard
from autometa.report import plots, write_report
from autometa.report.crosstask import critical_difference, cross_task, crosstask_section
from autometa.report.provenance import reproduce_yaml

INJECTED = "<script>alert(1)</script>"
#: Small enough for seconds per study on a busy CPU; two algorithms, so both get tried.
TINY = dict(algorithms=["maml", "finetune"], sources=["mlp"], n_trials=4, meta_steps=4,
            eval_every=2, top_k=2, task_params=SMALL_SINUSOID,
            algorithm_params={"maml": {"inner_steps": 1, "meta_batch_size": 4},
                              "finetune": {"finetune_steps": 10}},
            source_params={"mlp": {"hidden": 40, "layers": 1}},
            # The sampled trials these tests were written against (the defaults would
            # run both algorithms at their papers' settings first and prune at 2 steps).
            initial="none", pruner="median")


@dataclasses.dataclass
class Searched:
    storage: str
    artifacts: str
    names: list[str]


@pytest.fixture(scope="module")
def searched(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Searched]:
    """Three small sinusoid studies (seeds 0-2) in one storage; study 0 has a failed trial."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("studies")
    storage, artifacts = f"sqlite:///{root / 'a.db'}", str(root / "art")
    names = []
    for seed in range(3):
        board = autometa.search("sinusoid", seed=seed, storage=storage, artifacts=artifacts,
                                **TINY)  # type: ignore[arg-type]
        names.append(board.study_name)
    study = optuna.load_study(study_name=names[0], storage=storage)
    study.add_trial(optuna.trial.create_trial(
        state=optuna.trial.TrialState.FAIL,
        user_attrs={"failure": f"diverged: {INJECTED} & more", "algorithm": "maml"}))
    torch.set_num_threads(threads)
    yield Searched(storage, artifacts, names)


@pytest.fixture
def drawn(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """The matplotlib figures the report draws, kept to look at their axes."""
    figures: list[Any] = []
    real = plots.drawing

    @contextlib.contextmanager
    def keep(*args: Any, **kwargs: Any) -> Iterator[Any]:
        with real(*args, **kwargs) as (fig, svg):
            figures.append(fig)
            yield fig, svg

    monkeypatch.setattr(plots, "drawing", keep)
    return figures


def _board(searched: Searched, index: int = 0) -> Leaderboard:
    return autometa.load_leaderboard(searched.names[index], searched.storage,
                                     artifacts=searched.artifacts)


def _offline(text: str) -> None:
    """No URL to fetch anywhere in the file's markup."""
    assert not re.search(r"""(?:src|href|action)\s*=\s*["']?\s*(?:https?:)?//""", text, re.I)
    assert "<script" not in text.lower()


def _check_in_browser(path: Path, chromium: str, shot: Path, images: int) -> str:
    """Open ``path``: no error, no dialog, no request, every figure (at least ``images``)
    decoded, a screenshot that is not blank; returns the page's visible text."""
    check = open_page(path, shot, executable=chromium)
    assert check.console_errors == [] and check.page_errors == []
    assert check.dialogs == [] and check.requests == []
    assert len(check.images) == path.read_text(encoding="utf-8").count("<img ") >= images
    assert all(int(i["naturalWidth"]) > 0 and i["complete"] for i in check.images), check.images
    colours, ink = screenshot_stats(shot)
    assert colours > 50 and ink > 0.05, (colours, ink)  # not a blank page
    return check.text


def test_cli_report_of_one_study_opens_cleanly(searched: Searched, tmp_path: Path,
                                               chromium: str,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    name = searched.names[0]
    code = main(["report", name, "--storage", searched.storage, "--artifacts",
                 searched.artifacts, "--out", str(tmp_path / "out")])
    out = capsys.readouterr().out
    path = tmp_path / "out" / f"{name}.html"
    assert code == 0 and out.strip() == f"wrote {path}"
    text = path.read_text(encoding="utf-8")
    _offline(text)
    assert "&lt;script&gt;alert(1)&lt;/script&gt; &amp; more" in text  # the failure reason
    board = _board(searched)
    # 5 figures: Optuna's importances are drawn, its warnings (4 trials) a note under them.
    shown = _check_in_browser(path, chromium, tmp_path / "shot.png", images=5)
    assert 'alt="hyperparameter importances"' in text
    warned = re.findall(r"Optuna warned: [^\n]*", shown)
    assert warned and "`" not in "".join(warned) and len(warned) == len(set(warned))
    assert "Some regimes for parameter" in warned[0] and "maml.meta_lr" in warned[0]
    for heading in ("leaderboard", "figures", "trial accounting", "provenance",
                    "reproduce this search"):
        assert heading in shown
    assert f"diverged: {INJECTED} & more" in shown
    assert f"{board.counts['complete']} complete" in shown and "1 failed" in shown
    best = board.best
    assert f"{best['test_mse']:.4g} ± {best['test_ci95']:.2g} ({best['test_n']})" in shown
    assert "best" in shown and "maml.inner_lr" in shown  # tie badge, hyperparameter columns
    assert f"autometa run --config {name}.yaml" in shown
    assert f"autometa report {name}" in shown  # the command that made it
    import platform

    import torch

    made = re.search(r"report made at \(UTC\)\s+(\S+)", shown)
    assert made and made.group(1).endswith("+00:00")  # ISO 8601, UTC
    assert f"torch version\t{torch.__version__}" in shown
    assert f"Python version\t{platform.python_version()}" in shown
    assert "ordered by trial number (the earlier trial ranks first)" in shown
    assert "a paired Wilcoxon test on the same meta-test episodes" in shown
    # The CSV and Markdown leaderboards are still written.
    assert all(p.exists() for p in board.write(tmp_path / "csv"))


def test_reproducing_config_reads_back_as_the_same_search(searched: Searched,
                                                           tmp_path: Path) -> None:
    board = _board(searched)
    # The numbers depend on the threads the trials ran with: kept, with a comment.
    config = {**board.stored["config"], "threads": 3}
    path = tmp_path / "again.yaml"
    path.write_text(reproduce_yaml(config), encoding="utf-8")
    again = SearchConfig.from_file(path)
    assert again.fingerprint() == SearchConfig.from_dict(config, where="x").fingerprint()
    assert again.threads == 3
    text = path.read_text()
    assert "storage" not in text and "workers" not in text
    assert "# threads: the torch CPU threads the trials ran with" in text
    assert "threads" not in reproduce_yaml({**config, "threads": None})


def test_user_strings_stay_text(tmp_path: Path, chromium: str) -> None:
    """A CSV class label, a study name and an algorithm name holding markup are shown as
    text in the page and in the figures (a "$" is not math), and nothing runs."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 2))
    pd.DataFrame({"a": x[:, 0], "b": x[:, 1],
                  "y": np.where(x[:, 0] > 0, INJECTED, "plain")}).to_csv("d.csv", index=False)
    board = autometa.search("csv", task_params={"path": "d.csv", "target": "y"},
                            algorithms=["finetune"], sources=["mlp"], n_trials=1, meta_steps=2,
                            eval_every=2, top_k=1, storage=f"sqlite:///{tmp_path / 'a.db'}",
                            artifacts=str(tmp_path / "art"),
                            source_params={"mlp": {"hidden": 40, "layers": 1}})
    assert INJECTED in board.stored["task"]["class_names"]
    frame = board.frame.copy()
    frame["algorithm"] = '$x^$ <img src=x onerror="alert(3)">'
    nasty = dataclasses.replace(board, study_name="<script>alert(2)</script>", frame=frame)
    path = write_report([nasty], tmp_path / "out")
    assert path.parent == tmp_path / "out" and "/" not in path.name and "<" not in path.name
    text = path.read_text(encoding="utf-8")
    _offline(text)
    assert "<img src=x" not in text and "&lt;script&gt;alert(2)&lt;/script&gt;" in text
    # Figures hold no user text as markup: text is drawn as paths.
    for data in re.findall(r'src="data:image/svg\+xml;base64,([^"]+)"', text):
        assert "<text" not in base64.b64decode(data).decode()
    shown = _check_in_browser(path, chromium, tmp_path / "shot.png", images=3)
    assert INJECTED in shown and "<script>alert(2)</script>" in shown
    assert '<img src=x onerror="alert(3)">' in shown


def test_several_studies_get_a_cross_task_section(searched: Searched, tmp_path: Path,
                                                  chromium: str) -> None:
    boards = [_board(searched, i) for i in range(3)]
    path = write_report(boards, tmp_path / "out", command="autometa report a b c")
    assert path.name == "report.html"
    text = path.read_text(encoding="utf-8")
    _offline(text)
    assert 'alt="critical-difference diagram' in text
    shown = _check_in_browser(path, chromium, tmp_path / "shot.png", images=1 + 3 * 5)
    assert "across tasks" in shown and "average rank" in shown
    assert "The Friedman test needs 3 algorithms present in every study; here 2." in shown
    assert f"Critical difference (Nemenyi, α = 0.05): {critical_difference(2, 3):.2f}" in shown
    for name in searched.names:
        assert f"study {name}" in shown
    # Two studies: the table, and a note instead of the diagram.
    two = write_report(boards[:2], tmp_path / "two").read_text(encoding="utf-8")
    assert "critical-difference diagram not drawn" in two and "needs at least 3 studies" in two


def _frame(rows: list[tuple[str, float, float | None]], metric: str = "acc") -> pd.DataFrame:
    return pd.DataFrame([{"rank": i + 1, "trial": i, "algorithm": a, "source": "mlp",
                          f"val_{metric}": v, f"test_{metric}": np.nan if t is None else t,
                          "test_ci95": 0.01, "test_n": 0 if t is None else 10,
                          "test_ci_over": "episodes", "params": ""}
                         for i, (a, v, t) in enumerate(rows)])


def _detached(name: str, direction: str, rows: list[tuple[str, float, float | None]],
              metric: str = "acc") -> Leaderboard:
    return Leaderboard(name, "task", metric, direction, _frame(rows, metric),
                       {"complete": len(rows), "pruned": 0, "failed": 0, "running": 0})


def test_cross_task_ranks_each_study_in_its_own_direction() -> None:
    boards = [
        # maximize: b's best trial beats a on meta-val, a beats b on meta-test; a's second
        # row is not its best.
        _detached("s1", "maximize", [("b", 0.9, 0.6), ("a", 0.7, 0.8), ("a", 0.1, 0.99)]),
        # minimize: a lower is better.
        _detached("s2", "minimize", [("a", 0.1, 0.2), ("b", 0.3, 0.4)]),
        # a tie: a and b share rank 1.5.
        _detached("s3", "maximize", [("a", 0.5, 0.5), ("b", 0.5, 0.5)]),
    ]
    on_test = cross_task(boards)  # every best trial has a meta-test score: ranked on it
    assert on_test.basis == "test" and on_test.missing == []
    assert on_test.scores.loc["a", "s1"] == 0.8
    assert list(on_test.ranks["s1"].loc[["a", "b"]]) == [1.0, 2.0]
    assert list(on_test.ranks["s2"].loc[["a", "b"]]) == [1.0, 2.0]
    assert list(on_test.ranks["s3"].loc[["a", "b"]]) == [1.5, 1.5]
    assert on_test.average.to_dict() == pytest.approx({"a": 7 / 6, "b": 11 / 6})
    # c's best trial in s2 has no meta-test score: every study is ranked on meta-val.
    boards[1] = _detached("s2", "minimize", [("a", 0.1, 0.2), ("b", 0.3, 0.4), ("c", 0.5, None)])
    on_val = cross_task(boards)
    assert on_val.basis == "val" and on_val.missing == [("c", "s2")]
    assert on_val.scores.loc["a", "s1"] == 0.7
    assert list(on_val.ranks["s1"].loc[["a", "b"]]) == [2.0, 1.0]
    assert list(on_val.ranks["s2"].loc[["a", "b", "c"]]) == [1.0, 2.0, 3.0]
    assert on_val.average.to_dict() == pytest.approx({"a": 1.5, "b": 1.5, "c": 3.0})
    text = crosstask_section(boards)
    assert ("Ranked on meta-val: c in s2 has no meta-test score; raise --top-k to score it."
            in text) and "meta-test score (rank)" not in text
    assert critical_difference(4, 14) == pytest.approx(1.25, abs=0.01)  # Demšar 2006, §3.2.2


def test_cd_diagram_shows_the_friedman_test_and_an_axis_over_every_rank(
        drawn: list[Any]) -> None:
    from scipy.stats import friedmanchisquare

    orders = [("a", "b", "c"), ("b", "a", "c"), ("a", "c", "b")]  # best first, per study
    boards = [_detached(f"s{i}", "maximize", [(n, 0.9 - 0.1 * j, 0.9 - 0.1 * j)
                                                for j, n in enumerate(order)])
              for i, order in enumerate(orders)]
    text = crosstask_section(boards)
    stat, p = friedmanchisquare([1, 2, 1], [2, 1, 3], [3, 3, 2])  # a, b, c ranks
    assert f"Friedman test (3 algorithms, 3 studies): χ² = {stat:.3g}, p = {p:.3g}." in text
    assert f"Critical difference (Nemenyi, α = 0.05): {critical_difference(3, 3):.2f}" in text
    ax, = drawn[-1].axes
    low, high = ax.get_xlim()
    assert low <= 1.0 and high >= 3.0  # average ranks 1.33, 2 and 2.67, on ranks 1 to 3
    assert {1.0, 2.0, 3.0} <= {t for t in ax.get_xticks() if low <= t <= high}
    assert all(float(t).is_integer() for t in ax.get_xticks())


def _accuracy_board() -> Leaderboard:
    """Accuracy, maximized: finetune's interval (0.9333 ± 0.076) passes 1; maml unscored;
    timing columns and tie groups over the test examples of a target task."""
    board = _detached("acc", "maximize", [("finetune", 0.95, 0.9333), ("finetune", 0.95, 0.9),
                                          ("maml", 0.9, None)], metric="accuracy")
    frame = board.frame.assign(test_ci95=[0.076, 0.05, np.nan], test_ci_over="examples",
                               tie_group=[1, 1, np.nan], p_vs_best=[np.nan, 0.4, np.nan],
                               adapt_ms=[1080.4, 10.66, 0.075], fit_time_s=[0.5, 123.4, 2.0])
    return dataclasses.replace(board, frame=frame)


def test_forest_plot_clips_intervals_and_names_what_it_leaves_out(tmp_path: Path,
                                                                   drawn: list[Any]) -> None:
    text = write_report([_accuracy_board()], tmp_path).read_text(encoding="utf-8")
    assert "Student-t intervals, clipped to the metric&#x27;s range [0, 1]" in text
    assert "left out of the forest plot: algorithm maml: no trial scored on meta-test" in text
    assert "source mlp: no trial" not in text  # its best scored trial is finetune's
    forest, = (f for f in drawn if "meta-test accuracy" in f.axes[0].get_xlabel())
    ax, = forest.axes
    assert ax.get_xlim()[1] <= 1.0
    ends = [x for segment in ax.collections[0].get_segments() for x, _ in segment]
    assert max(ends) == 1.0 and min(ends) == pytest.approx(0.9333 - 0.076)


def test_leaderboard_table_numbers_and_sentences(tmp_path: Path) -> None:
    text = write_report([_accuracy_board()], tmp_path).read_text(encoding="utf-8")
    cells = re.findall(r'<td class="num">([^<]*)</td>', text)
    assert {"1080", "10.7", "0.075", "123", "0.5"} <= set(cells)
    assert not any("e+" in c or "e-" in c for c in cells)
    assert "a paired Wilcoxon test on the same meta-test examples" in text
    assert "ordered by trial number (the earlier trial ranks first)" in text


def test_single_evaluations_are_markers_and_trial_numbers_integers(drawn: list[Any]) -> None:
    from optuna.distributions import CategoricalDistribution
    from optuna.trial import TrialState, create_trial

    study = optuna.create_study(direction="minimize")
    space = {"algorithm": CategoricalDistribution(["maml"])}
    for state, value, curve in [(TrialState.COMPLETE, 0.5, {2: 0.7, 4: 0.5}),
                                (TrialState.PRUNED, None, {2: 0.9}),
                                (TrialState.COMPLETE, 0.4, {2: 0.4})]:
        study.add_trial(create_trial(state=state, value=value, params={"algorithm": "maml"},
                                     distributions=space, intermediate_values=curve))
    plots.learning_curves_figure(study.trials, 0, "mse")
    lines = drawn[-1].axes[0].get_lines()
    singles = [line for line in lines if len(line.get_xdata()) == 1]
    assert len(singles) == 2 and all(line.get_marker() == "o" for line in singles)
    assert plots.PRUNED in {line.get_color() for line in singles}
    plots.history_figure(study.trials, "minimize", "mse")
    assert all(float(t).is_integer() for t in drawn[-1].axes[0].get_xticks())


def test_a_detached_or_empty_leaderboard_gives_notes_not_errors(tmp_path: Path) -> None:
    board = _detached("lone", "maximize", [("a", 0.5, None)])
    text = write_report([board], tmp_path).read_text(encoding="utf-8")
    assert "need the study&#x27;s trials" in text and "no trial has a meta-test score" in text
    empty = dataclasses.replace(board, frame=board.frame.iloc[:0],
                                counts=dict.fromkeys(board.counts, 0))
    other = dataclasses.replace(empty, study_name="other")
    text = write_report([empty, other], tmp_path / "two").read_text(encoding="utf-8")
    assert "the leaderboard is empty" in text and "nothing to compare" in text
    with pytest.raises(autometa.ConfigError, match="no leaderboard"):
        write_report([], tmp_path)
    with pytest.raises(autometa.ConfigError,
                       match="study 'lone' is given twice; name each study once"):
        write_report([board, other, board], tmp_path / "twice")


def test_report_of_an_unknown_study_is_one_line(searched: Searched, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["report", "no-such-study", "--storage", searched.storage,
                 "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "no-such-study" in err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    name = searched.names[0]  # the same study twice would be counted twice
    code = main(["report", name, name, "--storage", searched.storage,
                 "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert f"study {name!r} is given twice; name each study once" in err


def test_optuna_dashboard_shows_the_metric_test_scores_and_states(searched: Searched) -> None:
    """optuna-dashboard's own API (its WSGI app, as `optuna-dashboard URL` serves it) labels
    the objective, lists each scored trial's test mean, CI and n, and its state artifact."""
    import json
    from wsgiref.util import setup_testing_defaults

    from optuna.artifacts import FileSystemArtifactStore
    from optuna_dashboard import wsgi

    name = searched.names[0]
    app = wsgi(searched.storage, artifact_store=FileSystemArtifactStore(searched.artifacts))

    def get(path: str) -> dict[str, Any]:
        environ: dict[str, Any] = {}
        setup_testing_defaults(environ)
        environ["PATH_INFO"] = path
        status: list[str] = []
        body = b"".join(app(environ, lambda s, h, e=None: status.append(s)))
        assert status == ["200 OK"], (status, body[:300])
        return json.loads(body)

    study_id, = (s["study_id"] for s in get("/api/studies")["study_summaries"]
                 if s["study_name"] == name)
    study = get(f"/api/studies/{study_id}")
    assert study["objective_names"] == ["meta-val mse"]
    board = _board(searched)
    for row in board.frame[board.frame["test_n"] > 0].itertuples():
        trial, = (t for t in study["trials"] if t["number"] == row.trial)
        attrs = {a["key"]: a["value"] for a in trial["user_attrs"]}
        assert float(attrs["test_mean"]) == pytest.approx(row.test_mse)
        assert float(attrs["test_ci95"]) == pytest.approx(row.test_ci95)
        assert int(attrs["test_n"]) == row.test_n
        assert [a["filename"] for a in trial["artifacts"]] == [f"trial-{row.trial}.pt"]
