"""Trial states in Optuna's artifact store (``--artifacts``, ``keep``) and input files
identified by content (``autometa worker``, ``--data-root``), on an embedded storage.

The same paths on PostgreSQL, across processes in separate directories, are in
``test_postgres.py``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import pytest
from optuna.trial import TrialState

import autometa
from autometa import ConfigError
from autometa.cli import main
from autometa.study.artifacts import REMOVED_ATTR, state_artifact

SMALL = {"val_episodes": 4, "test_episodes": 4, "eval_queries": 5}
TINY = dict(task_params=SMALL, algorithms=["finetune"], sources=["mlp"], meta_steps=2,
            eval_every=2, seed=0, pruner="none")


def _states(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.is_file()) if directory.is_dir() else []


def test_keep_bounds_the_states_to_the_best_k_on_meta_val(tmp_path):
    url = f"sqlite:///{tmp_path / 'a.db'}"
    board = autometa.search("sinusoid", n_trials=5, keep=2, top_k=2, storage=url,
                            artifacts=str(tmp_path / "art"), **TINY)
    store = tmp_path / "art"  # every study's states side by side, as optuna-dashboard reads
    assert len(_states(store)) == 2  # 5 trials ran, each uploaded its state
    study = optuna.load_study(study_name="sinusoid-seed0", storage=url)
    complete = sorted((t for t in study.trials if t.state == TrialState.COMPLETE),
                      key=lambda t: t.value)
    kept = {state_artifact(t, study._storage) for t in complete[:2]}
    assert {p.name for p in _states(store)} == kept  # exactly the two best states
    assert sorted(study.user_attrs[REMOVED_ATTR]) == sorted(t.number for t in complete[2:])
    assert board.frame["test_mse"].notna().sum() == 2
    # Every trial is listed in Optuna's own artifact records (what optuna-dashboard shows).
    assert all(state_artifact(t, study._storage) for t in complete)


def test_keep_fewer_than_top_k_is_refused_before_anything_is_stored(tmp_path):
    with pytest.raises(ConfigError, match="^keep: 1 is fewer than top_k=3"):
        autometa.search("sinusoid", keep=1, top_k=3, storage=f"sqlite:///{tmp_path}/a.db")
    with pytest.raises(ConfigError, match="^keep: expected 'all' or a number"):
        autometa.search("sinusoid", keep="some", storage=f"sqlite:///{tmp_path}/a.db")
    assert not (tmp_path / "a.db").exists()


def test_artifacts_given_on_resume_are_used(tmp_path):
    url = f"sqlite:///{tmp_path / 'a.db'}"
    autometa.search("sinusoid", n_trials=1, top_k=1, storage=url,
                    artifacts=str(tmp_path / "first"), **TINY)
    autometa.search("sinusoid", n_trials=2, top_k=1, storage=url,
                    artifacts=str(tmp_path / "second"), **TINY)
    assert len(_states(tmp_path / "first")) == 1
    assert len(_states(tmp_path / "second")) == 1  # not ignored
    # A store without the states: one line naming the store and the fix.
    with pytest.raises(ConfigError, match=r"is not in the artifact store '.*empty'; give the "
                                          r"store the workers wrote to"):
        autometa.load_model("sinusoid-seed0", storage=url, artifacts=str(tmp_path / "empty"))


def test_states_stored_in_a_folder_per_study_are_still_read_and_removed(tmp_path):
    """Earlier versions kept a directory store's states in ``<store>/<study>``: loading,
    resuming and ``keep`` find them there, while new states go to the store itself."""
    url, art = f"sqlite:///{tmp_path / 'a.db'}", tmp_path / "art"
    autometa.search("sinusoid", n_trials=2, top_k=2, storage=url, artifacts=str(art), **TINY)
    earlier = art / "sinusoid-seed0"
    earlier.mkdir()
    for state in _states(art):
        state.rename(earlier / state.name)  # the layout those versions wrote
    assert {autometa.load_model("sinusoid-seed0", rank, storage=url).trial
            for rank in (1, 2)} == {0, 1}
    board = autometa.search("sinusoid", n_trials=4, keep=1, top_k=1, storage=url,
                            artifacts=str(art), **TINY)
    study = optuna.load_study(study_name="sinusoid-seed0", storage=url)
    assert len(study.user_attrs[REMOVED_ATTR]) == 3  # from either place
    kept, = _states(art) + _states(earlier)
    best = autometa.load_model("sinusoid-seed0", storage=url)
    assert best.trial == board.frame["trial"].iloc[0]
    assert kept.name == state_artifact(study.trials[best.trial], study._storage)


# -- input files: the same data on every machine -----------------------------------------
def _csv(path: Path, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    a, b = rng.normal(size=60), rng.normal(size=60)
    pd.DataFrame({"a": a, "b": b, "y": 3 * a - b}).to_csv(path, index=False)


def _run_csv(url: str, artifacts: Path) -> int:
    return main(["run", "--task", "csv", "--task-param", "path=data.csv", "--task-param",
                 "target=y", "--algorithms", "finetune", "--sources", "mlp", "--trials", "1",
                 "--meta-steps", "2", "--eval-every", "2", "--top-k", "1", "--storage", url,
                 "--study", "shared", "--artifacts", str(artifacts), "--no-progress"])


def _n_trials(url: str) -> int:
    return len(optuna.load_study(study_name="shared", storage=url).trials)


def test_a_worker_needs_the_same_input_files(tmp_path, monkeypatch, capsys):
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    first, other, empty = (tmp_path / d for d in ("first", "other", "empty"))
    for d in (first, other, empty):
        d.mkdir()
    _csv(first / "data.csv")
    monkeypatch.chdir(first)
    assert _run_csv(url, tmp_path / "art") == 0
    capsys.readouterr()

    _csv(other / "data.csv", seed=1)  # another file under the same name
    monkeypatch.chdir(other)
    assert main(["worker", "shared", "--storage", url, "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("autometa: error: task_params.path: ")
    assert "data.csv' differs from the file study 'shared' was created with" in err[0]

    monkeypatch.chdir(empty)
    assert main(["worker", "shared", "--storage", url, "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "input 'data.csv' of study 'shared' is not at" in err[0]
    assert "--data-root" in err[0]
    assert _n_trials(url) == 1  # nothing ran, nothing was stored

    # The same file under another root: accepted (the budget is spent: it shows the board).
    assert main(["worker", "shared", "--storage", url, "--data-root", str(first),
                 "--no-progress"]) == 0
    assert "shared: csv" in capsys.readouterr().out

    # Resuming where the file has changed since is refused too.
    _csv(first / "data.csv", seed=2)
    monkeypatch.chdir(first)
    assert _run_csv(url, tmp_path / "art") == 2
    assert "has changed since study 'shared' was created" in capsys.readouterr().err


def test_a_worker_never_creates_a_study(tmp_path, capsys):
    url = f"sqlite:///{tmp_path / 'a.db'}"
    autometa.search("sinusoid", n_trials=1, top_k=1, storage=url, study_name="real",
                    artifacts=str(tmp_path / "art"), **TINY)
    assert main(["worker", "reel", "--storage", url]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no study 'reel' in sqlite:///" in err[0]
    assert "(did you mean 'real'?); studies there: real" in err[0]
    assert main(["worker", "real", "--storage", f"sqlite:///{tmp_path / 'none.db'}"]) == 2
    assert "no database at" in capsys.readouterr().err
    assert not (tmp_path / "none.db").exists()
    assert optuna.get_all_study_names(url) == ["real"]


def test_postgresql_without_a_driver_says_which_extra_to_install(tmp_path, monkeypatch, capsys):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in (
        "psycopg", "psycopg2") else find_spec(name, *a))
    # A URL of its own: a process keeps one lock engine per URL, and another test may have
    # opened one for a URL like it with the driver installed.
    code = main(["run", "--task", "sinusoid", "--storage",
                 "postgresql://u:pw9@127.0.0.1:1/no_driver", "--trials", "1", "--meta-steps",
                 "1", "--eval-every", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert err[0] == ("autometa: error: storage: postgresql://u:***@127.0.0.1:1/no_driver needs a "
                      "PostgreSQL driver; install it with pip install 'autometa-ml[postgres]' "
                      "(psycopg 3)")


def test_a_worker_refuses_an_artifact_store_the_others_do_not_share(tmp_path, monkeypatch,
                                                                      capsys):
    url = f"sqlite:///{tmp_path / 'a.db'}"
    monkeypatch.chdir(tmp_path)
    autometa.search("sinusoid", n_trials=1, top_k=1, storage=url, **TINY)  # ./autometa-artifacts
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main(["worker", "sinusoid-seed0", "--storage", url]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "keeps trial states in 'autometa-artifacts', a folder relative to " \
                             "the machine that created it; give --artifacts" in err[0]
    assert main(["worker", "sinusoid-seed0", "--storage", url, "--artifacts",
                 str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "lacks trial 0's state, which another worker stored" in err[0]
    assert not (elsewhere / "autometa-artifacts").exists()
    assert main(["worker", "sinusoid-seed0", "--storage", url, "--artifacts",
                 str(tmp_path / "autometa-artifacts")]) == 0  # the right store: accepted


@pytest.mark.parametrize("url, says", [
    ("postgres://u@127.0.0.1:1/x", "write postgresql://, not postgres://"),
    ("postgresql://u:pa@ss@127.0.0.1:1/x", "the user name or password holds '@'; "
                                           "percent-encode it"),
])
def test_storage_url_mistakes_are_one_line_with_the_fix(tmp_path, capsys, url, says):
    code = main(["run", "--task", "sinusoid", "--storage", url, "--trials", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and says in err[0]
    assert "ss@127" not in err[0]  # no part of a password
