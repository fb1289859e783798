"""End to end: the CLI and the Python API run the same search and show the same leaderboard."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import optuna
import pandas as pd
import pytest
from limits import CLI_SEARCH, QUICK_SUBPROCESS

import autometa

SMALL = {"val_episodes": 10, "test_episodes": 20, "eval_queries": 10}
RUN = [
    "run", "--task", "sinusoid", "--algorithms", "maml,finetune", "--sources", "mlp",
    "--trials", "4", "--meta-steps", "10", "--eval-every", "5", "--seed", "3", "--no-progress",
    *(a for k, v in SMALL.items() for a in ("--task-param", f"{k}={v}")),
]
COLUMNS = ["rank", "trial", "algorithm", "source", "baseline", "val_mse", "test_mse", "test_ci95",
           "test_ci_low", "test_ci_high", "test_n", "test_ci_over", "test_ci_method",
           "tie_group", "p_vs_best", "fit_time_s", "adapt_ms",
           "peak_mem_mb", "params"]


def autometa_cli(*args: str, cwd: Path, env: dict[str, str] | None = None
                 ) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, "COLUMNS": "200", **(env or {})}
    return subprocess.run([sys.executable, "-m", "autometa", *args], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=CLI_SEARCH)


def test_cli_search_prints_and_writes_the_leaderboard(tmp_path: Path) -> None:
    """`autometa run` exits 0, prints one row per completed trial, writes CSV and Markdown."""
    result = autometa_cli(*RUN, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    frame = pd.read_csv(tmp_path / "autometa-reports" / "sinusoid-seed3.csv")
    assert list(frame.columns[:len(COLUMNS)]) == COLUMNS
    # then one column per hyperparameter, as sampled
    hyper = list(frame.columns[len(COLUMNS):])
    assert hyper == sorted(hyper) and "mlp.hidden" in hyper
    assert set(frame["mlp.hidden"]) <= {16, 32, 40, 64, 128}
    assert (frame["fit_time_s"] > 0).all() and (frame["adapt_ms"] > 0).all()
    assert frame["peak_mem_mb"].isna().all()  # measured on CUDA only
    assert list(frame["rank"]) == list(range(1, len(frame) + 1))
    assert frame["val_mse"].is_monotonic_increasing
    assert set(frame["algorithm"]) <= {"maml", "finetune"} and set(frame["source"]) == {"mlp"}
    tested = frame[frame["test_n"] > 0]
    assert len(tested) == min(3, len(frame)) and (tested["test_n"] == 20).all()
    assert (tested["test_ci_over"] == "episodes").all()
    assert (tested["test_ci_method"] == "student-t").all()  # over episodes, as the field does
    assert tested["test_ci_low"].add(tested["test_ci95"]).sub(tested["test_mse"]).abs().max() \
        < 1e-12
    assert tested["tie_group"].iloc[0] == 1 and pd.isna(tested["p_vs_best"].iloc[0])
    assert frame.loc[frame["test_n"] == 0, "tie_group"].isna().all()
    assert "sinusoid-seed3: sinusoid, mse (lower is better)" in result.stdout
    # 20 meta-test episodes: the interval is named, and the warning says what it rests on
    printed = " ".join(result.stdout.split())
    assert "95% CI over 20 episodes, Student t" in printed
    assert "warning: The meta-test intervals and tie groups rest on 20 meta-test episodes" \
        in printed
    # --no-progress: no bars, one plain line per finished trial
    for row in frame.itertuples():
        assert f"trial {row.trial}: mse {row.val_mse:.4g}" in result.stdout
    for column in ("rank", "algorithm", "val", "test (95% CI)", "tie", "params"):
        assert column in result.stdout
    for row in frame.itertuples():
        assert f"│ {row.rank} " in result.stdout and row.params in result.stdout
    markdown = (tmp_path / "autometa-reports" / "sinusoid-seed3.md").read_text()
    ranking, *sections = markdown.split("\n## ")
    assert ranking.count("\n| ") == len(frame) + 1  # header + one line per row
    # Every searched algorithm has a fully trained trial (completion trials) and a row.
    assert sections[0].startswith("Best of each algorithm")
    assert sections[0].count("\n| ") == 1 + 2
    assert set(frame["algorithm"]) == {"maml", "finetune"}
    assert "quickstart: best of each algorithm" not in result.stdout
    assert "sinusoid-seed3: best of each algorithm" in result.stdout


def test_python_and_cli_give_the_same_leaderboard(tmp_path: Path) -> None:
    """The same settings and seed give the same leaderboard from Python and from the CLI."""
    # Same torch thread count as this process (tests/conftest.py): parallel reductions
    # with another thread count round differently.
    assert autometa_cli(*RUN, cwd=tmp_path, env={"OMP_NUM_THREADS": "1"}).returncode == 0
    cli = pd.read_csv(tmp_path / "autometa-reports" / "sinusoid-seed3.csv")
    board = autometa.search("sinusoid", algorithms=["maml", "finetune"], sources=["mlp"],
                            n_trials=4, meta_steps=10, eval_every=5, seed=3, task_params=SMALL,
                            storage=f"sqlite:///{tmp_path / 'python.db'}",
                            artifacts=str(tmp_path / "python-artifacts"))
    python = board.frame
    assert len(python) == len(cli) > 0
    study = optuna.load_study(study_name="sinusoid-seed3", storage=f"sqlite:///{tmp_path}/python.db")
    assert study.metric_names == ["meta-val mse"]  # what optuna-dashboard labels the values
    # optuna-dashboard lists each listed trial's meta-test result among its user attributes
    for row in python[python["test_n"] > 0].itertuples():
        attrs = study.trials[row.trial].user_attrs
        assert attrs["test_mean"] == row.test_mse and attrs["test_ci95"] == row.test_ci95
        assert attrs["test_n"] == row.test_n == len(attrs["test_scores"]) == 20
    for column in ("trial", "algorithm", "source", "params", "test_n", "test_ci_over"):
        assert list(python[column]) == list(cli[column].fillna(""))  # CSV: "" reads as NaN
    for column in ("val_mse", "test_mse", "test_ci95"):
        pd.testing.assert_series_equal(python[column], cli[column], rtol=1e-9,
                                       check_dtype=False)


@pytest.mark.slow  # a CLI search, then the leaderboard command
def test_leaderboard_command_reprints_a_stored_study(tmp_path: Path) -> None:
    """`autometa leaderboard STUDY` shows the stored rows; an unknown study exits 2."""
    assert autometa_cli(*RUN, cwd=tmp_path).returncode == 0
    first = pd.read_csv(tmp_path / "autometa-reports" / "sinusoid-seed3.csv")
    again = autometa_cli("leaderboard", "sinusoid-seed3", "--out", "again", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    pd.testing.assert_frame_equal(first, pd.read_csv(tmp_path / "again" / "sinusoid-seed3.csv"))
    # An 80-column terminal: every line fits, and no number or "k=v" pair is split.
    narrow = autometa_cli("leaderboard", "sinusoid-seed3", "--out", "again", cwd=tmp_path,
                          env={"COLUMNS": "80"})
    assert narrow.returncode == 0, narrow.stderr
    assert max(len(line) for line in narrow.stdout.splitlines()) <= 80
    words = narrow.stdout.split()
    assert {"rank", "trial", "algorithm", "source", "val", "test", "tie"} <= set(words)
    for row in first.itertuples():
        assert f"{row.val_mse:.4g}" in words
        assert all(pair in words for pair in row.params.split() if "=" in pair)
    missing = autometa_cli("leaderboard", "sinusoid-seed4", cwd=tmp_path)
    assert missing.returncode == 2
    assert missing.stderr.strip().splitlines() == [missing.stderr.strip()]
    assert "sinusoid-seed3" in missing.stderr  # lists the studies that exist


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["run", "--task", "sinusiod"], "did you mean 'sinusoid'"),
        (["run", "--task", "sinusoid", "--algorithms", "mamll"], "did you mean 'maml'"),
        (["run", "--task", "sinusoid", "--task-param", "shots=0"], "task_params.shots"),
        (["run", "--task", "sinusoid", "--algorithms", "maml", "--param", "maml.inner_lr=9"],
         "maml.inner_lr"),
        (["run", "--task", "sinusoid", "--algorithms", "maml", "--param",
          "maml.inner_rate=0.1"], "did you mean 'inner_lr'"),
        (["run", "--task", "sinusoid", "--trials", "0"], "n_trials"),
        (["run", "--task", "sinusoid", "--algorithms", "maml", "--sources", "conv4"], "conv4"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path: Path, args: list[str], expected: str
                                          ) -> None:
    """Bad input: exit 2, one line naming the problem, no traceback, nothing stored."""
    result = autometa_cli(*args, cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("autometa: error:"), result.stderr
    assert expected in lines[0]
    assert not (tmp_path / "autometa.db").exists()


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    """--debug re-raises so the traceback is visible."""
    result = autometa_cli("--debug", "run", "--task", "sinusiod", cwd=tmp_path)
    assert result.returncode != 0 and "Traceback" in result.stderr


def test_bad_config_key_names_it(tmp_path: Path) -> None:
    """An unknown key in a config file gets the closest valid key, exit 2."""
    (tmp_path / "c.toml").write_text('task = "sinusoid"\nn_trial = 3\n')
    result = autometa_cli("run", "--config", "c.toml", cwd=tmp_path)
    assert result.returncode == 2 and "did you mean 'n_trials'" in result.stderr


def test_resume_with_other_settings_is_refused_and_changes_nothing(tmp_path: Path) -> None:
    """Re-running a study with changed settings exits 2 and leaves the storage as it was."""
    assert autometa_cli(*RUN, cwd=tmp_path).returncode == 0
    db = tmp_path / "autometa.db"
    before = db.read_bytes()
    changed = [a if a != "10" else "20" for a in RUN]  # meta-steps 10 -> 20
    result = autometa_cli(*changed, cwd=tmp_path)
    assert result.returncode == 2 and "meta_steps" in result.stderr
    assert db.read_bytes() == before


def test_a_broken_plugin_is_listed_while_a_search_still_runs(tmp_path: Path) -> None:
    """A third-party plugin that fails to import is listed as broken; searches still work."""
    site = tmp_path / "site"
    (site / "broken_plugin-1.0.dist-info").mkdir(parents=True)
    (site / "broken_plugin-1.0.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: broken-plugin\nVersion: 1.0\n")
    (site / "broken_plugin-1.0.dist-info" / "entry_points.txt").write_text(
        "[autometa]\nbroken = broken_plugin\n")
    (site / "broken_plugin.py").write_text(textwrap.dedent("""
        raise RuntimeError("this plugin is broken on purpose")
    """))
    env = {"PYTHONPATH": str(site)}
    listing = autometa_cli("plugins", cwd=tmp_path, env=env)
    assert listing.returncode == 0, listing.stderr
    line = next(x for x in listing.stdout.splitlines() if "│ broken " in x)
    assert "broken-plugin 1.0" in line and "broken: import failed" in line
    assert "this plugin is broken on purpose" in listing.stdout
    assert autometa_cli(*RUN, cwd=tmp_path, env=env).returncode == 0
    strict = autometa_cli("plugins", cwd=tmp_path, env={**env, "AUTOMETA_STRICT_PLUGINS": "1"})
    assert strict.returncode == 2 and "Traceback" not in strict.stderr
    assert "'broken'" in strict.stderr


@pytest.mark.parametrize("command", [["--help"], ["plugins"]])
def test_help_and_plugins_do_not_import_torch(tmp_path: Path, command: list[str]) -> None:
    """`autometa --help` and `autometa plugins` stay light: no torch (and --help: no optuna)."""
    result = subprocess.run([sys.executable, "-X", "importtime", "-m", "autometa", *command],
                            cwd=tmp_path, capture_output=True, text=True,
                            timeout=QUICK_SUBPROCESS)
    assert result.returncode == 0
    modules = {line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines()
               if line.startswith("import time:")}
    assert "autometa.cli" in modules
    assert not {m for m in modules if m == "torch" or m.startswith("torch.")}
    if command == ["--help"]:
        assert not {m for m in modules if m.split(".")[0] == "optuna"}
