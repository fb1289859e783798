"""What every launcher relies on (issue 27): ``autometa worker`` takes its storage URL from
``AUTOMETA_STORAGE`` (launched workers: a password stays out of command lines, scripts and
manifests), and ``autometa launch --dry-run`` checks the search and stores nothing."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import optuna
from limits import CLI_SEARCH

from autometa.launch import STORAGE_ENV, WorkerJob

SEARCH = ["--task", "sinusoid", "--algorithms", "maml", "--sources", "mlp", "--meta-steps",
          "2", "--eval-every", "2", "--top-k", "1", "--no-baselines", "--task-param",
          "val_episodes=4", "--task-param", "test_episodes=4", "--task-param",
          "eval_queries=5", "--param", "maml.inner_steps=1", "--storage", "sqlite:///a.db",
          "--study", "s", "--artifacts", "art"]


def cli(cwd: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith("AUTOMETA_") or k == "AUTOMETA_CACHE_DIR"}
    return subprocess.run([sys.executable, "-m", "autometa", *args], cwd=cwd,
                          env={**clean, **env, "COLUMNS": "200"}, capture_output=True,
                          text=True, timeout=CLI_SEARCH)


def test_a_worker_reads_its_storage_from_the_environment(tmp_path: Path) -> None:
    made = cli(tmp_path, "run", *SEARCH, "--trials", "2", "--timeout", "0.001",
               "--no-progress")
    assert made.returncode == 0, made.stderr
    missing = cli(tmp_path, "worker", "s", "--artifacts", "art", "--no-progress")
    assert missing.returncode == 2
    assert missing.stderr.strip() == ("autometa: error: give the study's storage: --storage "
                                      f"URL, or set {STORAGE_ENV}")
    joined = cli(tmp_path, "worker", "s", "--artifacts", "art", "--timeout", "3600",
                 "--no-progress", **{STORAGE_ENV: "sqlite:///a.db"})
    assert joined.returncode == 0, joined.stderr
    assert joined.stdout.splitlines()[0] == "joining study 's' in sqlite:///a.db"
    study = optuna.load_study(study_name="s", storage=f"sqlite:///{tmp_path / 'a.db'}")
    assert sum(t.state.name == "COMPLETE" for t in study.trials) == 2
    # Every command's --storage: the variable when not given (no password in argv).
    (tmp_path / "elsewhere").mkdir()
    board = cli(tmp_path / "elsewhere", "leaderboard", "s", "--artifacts", "../art",
                "--data-root", "..", **{STORAGE_ENV: f"sqlite:///{tmp_path / 'a.db'}"})
    assert board.returncode == 0, board.stderr
    assert "s: sinusoid, mse" in board.stdout and "maml" in board.stdout, board.stdout
    pins = cli(tmp_path / "elsewhere", "requirements", "s",
               **{STORAGE_ENV: f"sqlite:///{tmp_path / 'a.db'}"})
    assert pins.returncode == 0 and "autometa-ml==" in pins.stdout, pins.stderr
    assert not (tmp_path / "elsewhere" / "autometa.db").exists()


def test_the_worker_command_holds_no_storage_url() -> None:
    job = WorkerJob(study="s", storage="postgresql://u:secret@db/x", artifacts="/shared/art",
                    data_root="/shared/data", devices="cuda", threads=4, python="python")
    assert job.argv() == ["python", "-m", "autometa", "worker", "s", "--devices", "cuda",
                          "--workers", "1", "--no-progress", "--artifacts", "/shared/art",
                          "--data-root", "/shared/data", "--threads", "4"]
    assert "secret" not in job.command()
    assert job.env() == {STORAGE_ENV: "postgresql://u:secret@db/x"}
