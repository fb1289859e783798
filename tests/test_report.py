"""`autometa report`: one offline HTML file per study or per set of studies, opened in a
real headless Chromium (tests/browser.py): no script error, every figure decoded, user
strings shown as text."""

from __future__ import annotations

import base64
import dataclasses
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pandas as pd
import pytest
import yaml
from browser import open_page, screenshot_stats
from conftest import SMALL_SINUSOID

import autometa
from autometa.cli import main
from autometa.config import SearchConfig
from autometa.leaderboard import Leaderboard
from autometa.report import write_report
from autometa.report.crosstask import critical_difference, cross_task
from autometa.report.provenance import reproduce_config

INJECTED = "<script>alert(1)</script>"
#: Small enough for seconds per study on a busy CPU; two algorithms, so both get tried.
TINY = dict(algorithms=["maml", "finetune"], sources=["mlp"], n_trials=4, meta_steps=4,
            eval_every=2, top_k=2, task_params=SMALL_SINUSOID,
            algorithm_params={"maml": {"inner_steps": 1, "meta_batch_size": 4},
                              "finetune": {"finetune_steps": 10}},
            source_params={"mlp": {"hidden": 40, "layers": 1}})


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
    # 4 figures at least: importances are a note with 4 trials (too few for Optuna).
    shown = _check_in_browser(path, chromium, tmp_path / "shot.png", images=4)
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
    # The CSV and Markdown leaderboards are still written.
    assert all(p.exists() for p in board.write(tmp_path / "csv"))


def test_reproducing_config_reads_back_as_the_same_search(searched: Searched,
                                                           tmp_path: Path) -> None:
    board = _board(searched)
    config = board.stored["config"]
    path = tmp_path / "again.yaml"
    path.write_text(yaml.safe_dump(reproduce_config(config)), encoding="utf-8")
    again = SearchConfig.from_file(path)
    assert again.fingerprint() == SearchConfig.from_dict(config, where="x").fingerprint()
    assert "storage" not in path.read_text()


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
    shown = _check_in_browser(path, chromium, tmp_path / "shot.png", images=1 + 3 * 4)
    assert "across tasks" in shown and "average rank" in shown
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


def _detached(name: str, direction: str, rows: list[tuple[str, float, float | None]]
              ) -> Leaderboard:
    return Leaderboard(name, "task", "acc", direction, _frame(rows),
                       {"complete": len(rows), "pruned": 0, "failed": 0, "running": 0})


def test_cross_task_ranks_each_study_in_its_own_direction() -> None:
    boards = [
        # maximize: b's best trial (0.9) beats a; a's second row is not its best.
        _detached("s1", "maximize", [("b", 0.9, 0.8), ("a", 0.7, 0.6), ("a", 0.1, 0.99)]),
        # minimize: a lower is better; no test score for c -> its val score is used.
        _detached("s2", "minimize", [("a", 0.1, 0.2), ("b", 0.3, 0.4), ("c", 0.5, None)]),
        # a tie: a and b share rank 1.5.
        _detached("s3", "maximize", [("a", 0.5, 0.5), ("b", 0.5, 0.5)]),
    ]
    result = cross_task(boards)
    assert result.scores.loc["a", "s1"] == 0.6 and result.basis.loc["c", "s2"] == "val"
    assert list(result.ranks["s1"].loc[["a", "b"]]) == [2.0, 1.0]
    assert list(result.ranks["s2"].loc[["a", "b", "c"]]) == [1.0, 2.0, 3.0]
    assert list(result.ranks["s3"].loc[["a", "b"]]) == [1.5, 1.5]
    assert result.average.to_dict() == pytest.approx({"a": 1.5, "b": 1.5, "c": 3.0})
    assert critical_difference(4, 14) == pytest.approx(1.25, abs=0.01)  # Demšar 2006, §3.2.2


def test_a_detached_or_empty_leaderboard_gives_notes_not_errors(tmp_path: Path) -> None:
    board = _detached("lone", "maximize", [("a", 0.5, None)])
    text = write_report([board], tmp_path).read_text(encoding="utf-8")
    assert "need the study&#x27;s trials" in text and "no trial has a meta-test score" in text
    empty = dataclasses.replace(board, frame=board.frame.iloc[:0],
                                counts=dict.fromkeys(board.counts, 0))
    text = write_report([empty, empty], tmp_path / "two").read_text(encoding="utf-8")
    assert "the leaderboard is empty" in text and "nothing to compare" in text
    with pytest.raises(autometa.ConfigError, match="no leaderboard"):
        write_report([], tmp_path)


def test_report_of_an_unknown_study_is_one_line(searched: Searched, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["report", "no-such-study", "--storage", searched.storage,
                 "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "no-such-study" in err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_optuna_dashboard_shows_the_metric_test_scores_and_states(searched: Searched) -> None:
    """optuna-dashboard's own API (its WSGI app, as `optuna-dashboard URL` serves it) labels
    the objective, lists each scored trial's test mean, CI and n, and its state artifact."""
    import json
    from wsgiref.util import setup_testing_defaults

    from optuna.artifacts import FileSystemArtifactStore
    from optuna_dashboard import wsgi

    name = searched.names[0]
    app = wsgi(searched.storage,
               artifact_store=FileSystemArtifactStore(f"{searched.artifacts}/{name}"))

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
