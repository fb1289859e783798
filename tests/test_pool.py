"""Parallel search on one machine: workers as processes, exact budgets, crashes survived.

``devices=["cpu", "cpu"]`` stands in for two GPUs. Processes are killed for real
(``SIGKILL``, ``SIGINT``), and the budget is read back from the storage.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from limits import POOL_SEARCH, QUICK_SUBPROCESS, STOPPED_PROCESS, TRIAL_START
from optuna.trial import TrialState

import autometa
from autometa.study.storage import schema_ready

SMALL = {"val_episodes": 4, "test_episodes": 4, "eval_queries": 5}
TASK_FLAGS = [a for k, v in SMALL.items() for a in ("--task-param", f"{k}={v}")]


def _trials(db: Path, study: str = "sinusoid-seed0") -> list[optuna.trial.FrozenTrial]:
    """The study's trials, read without writing anything (a search may be creating the
    tables: even Optuna's schema check may write its version row)."""
    if not schema_ready(f"sqlite:///{db}"):  # Optuna would stamp its version rows
        raise KeyError(study)
    storage = optuna.storages.RDBStorage(f"sqlite:///{db}", skip_table_creation=True,
                                         skip_compatibility_check=True)
    return optuna.load_study(study_name=study, storage=storage).trials


def _counted(trials: list[optuna.trial.FrozenTrial]) -> list[optuna.trial.FrozenTrial]:
    """The trials a budget counts: complete, pruned, and failed ones with a reason."""
    return [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)
            or (t.state == TrialState.FAIL and "failure" in t.user_attrs)]


def _config(t: optuna.trial.FrozenTrial) -> str:
    return json.dumps(t.params, sort_keys=True)


def _searched(trials: list[optuna.trial.FrozenTrial]) -> list[optuna.trial.FrozenTrial]:
    """The budgeted trials, after checking the others: an algorithm whose every trial was
    pruned has its best configuration re-run in full once (a completion trial, outside
    the budget), so at most one per algorithm, each repeating a pruned trial's."""
    completions = [t for t in trials if t.user_attrs.get("completion")]
    algorithms = [t.params["algorithm"] for t in completions]
    assert len(set(algorithms)) == len(algorithms), algorithms
    searched = [t for t in trials if not t.user_attrs.get("completion")]
    configs = {_config(t) for t in searched}
    assert all(_config(t) in configs for t in completions)
    return searched


def _cli(*args: str, cwd: Path) -> subprocess.Popen[str]:
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.Popen([sys.executable, "-m", "autometa", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, preexec_fn=_default_ctrl_c)


def _default_ctrl_c() -> None:
    """Ctrl-C as in a terminal: a test run started in the background by a shell inherits
    SIGINT ignored, and so would the search (Ctrl-C would then do nothing)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _wait_running(db: Path, proc: subprocess.Popen[str], timeout: float = TRIAL_START,
                  after: int = 0) -> optuna.trial.FrozenTrial:
    """The first RUNNING trial numbered ``after`` or more, once its parameters are all
    sampled (its plan is recorded after the last one)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        assert proc.poll() is None, proc.communicate()
        if db.exists():
            try:
                for t in _trials(db):
                    if t.state == TrialState.RUNNING and t.number >= after \
                            and "worker" in t.user_attrs and "source_params" in t.user_attrs:
                        return t
            except Exception:  # the study or its tables are not created yet
                pass
        time.sleep(0.3)
    raise AssertionError(f"no trial started in {timeout} s: a hang")


@pytest.mark.slow  # two worker processes
def test_two_workers_finish_exactly_the_budget_with_distinct_configurations(tmp_path):
    board = autometa.search("sinusoid", algorithms=["maml", "finetune"], sources=["mlp"],
                            devices=["cpu", "cpu"], n_trials=6, meta_steps=4, eval_every=2,
                            top_k=1, task_params=SMALL, seed=0)
    trials = _searched(_trials(tmp_path / "autometa.db"))
    assert len(_counted(trials)) == len(trials) == 6
    assert len({_config(t) for t in trials}) == 6
    workers = {t.user_attrs["worker"]["worker"] for t in trials}
    assert workers == {0, 1}  # both processes ran trials
    assert {t.user_attrs["worker"]["pid"] for t in trials}.isdisjoint({os.getpid()})
    assert board.counts["complete"] + board.counts["pruned"] + board.counts["failed"] == \
        len(_trials(tmp_path / "autometa.db"))  # the 6, and any completion trial
    assert board.writes_reports


RUN = ["run", "--task", "sinusoid", "--algorithms", "maml", "--sources", "mlp",
       "--meta-steps", "150", "--eval-every", "50", "--top-k", "1", "--no-progress",
       # No pruner: whether Hyperband stops a retry depends on which trials finished first
       # (timing), and these tests are about retries, not pruning.
       "--pruner", "none",
       "--param", "maml.meta_batch_size=25", "--param", "maml.inner_steps=5",
       # Step sizes that never diverge: a retry must complete (it runs its parameters again).
       "--param", "maml.inner_lr=0.01", "--param", "maml.meta_lr=0.001",
       "--param", "mlp.hidden=40", "--param", "mlp.layers=2", *TASK_FLAGS]


@pytest.mark.slow  # a CLI search with two workers, one killed and replaced
def test_a_killed_worker_is_replaced_and_its_trial_run_again(tmp_path):
    proc = _cli(*RUN, "--trials", "4", "--workers", "2", cwd=tmp_path)
    victim = _wait_running(tmp_path / "autometa.db", proc)
    os.kill(victim.user_attrs["worker"]["pid"], signal.SIGKILL)
    out, err = proc.communicate(timeout=POOL_SEARCH)
    assert proc.returncode == 0, err
    trials = _trials(tmp_path / "autometa.db")
    assert len(_counted(trials)) == 4  # exactly the budget, the killed trial not counted
    killed = trials[victim.number]
    assert killed.state == TrialState.FAIL and "died" in killed.user_attrs["crash"]
    retries = [t for t in trials if t.system_attrs.get("failed_trial") == victim.number]
    assert len(retries) == 1 and retries[0].state == TrialState.COMPLETE, \
        [(t.number, t.state.name, t.user_attrs.get("failure")) for t in retries]
    assert retries[0].params == killed.params
    assert "wrote autometa-reports" in out


@pytest.mark.slow  # a CLI search killed, then run again
def test_a_rerun_right_after_a_kill_runs_the_stale_trial_again(tmp_path):
    proc = _cli(*RUN, "--trials", "2", cwd=tmp_path)
    victim = _wait_running(tmp_path / "autometa.db", proc)
    os.killpg(proc.pid, signal.SIGKILL)  # the whole search, as a crash or an OOM kill would
    proc.communicate(timeout=STOPPED_PROCESS)
    assert _trials(tmp_path / "autometa.db")[victim.number].state == TrialState.RUNNING
    rerun = _cli(*RUN, "--trials", "2", cwd=tmp_path)
    out, err = rerun.communicate(timeout=POOL_SEARCH)
    assert rerun.returncode == 0, err
    trials = _trials(tmp_path / "autometa.db")
    assert trials[victim.number].state == TrialState.FAIL
    retried = [t for t in trials if t.system_attrs.get("failed_trial") == victim.number]
    why = [(t.number, t.state.name, t.user_attrs.get("failure"), t.user_attrs.get("crash"),
            t.system_attrs.get("failed_trial")) for t in trials]
    assert retried and retried[0].state == TrialState.COMPLETE, (why, err)
    assert len(_counted(trials)) == 2 and "running" not in out


@pytest.mark.slow  # CLI searches with two workers, interrupted and resumed
def test_ctrl_c_stops_every_worker_with_one_line_and_a_resume_reruns_their_trials(tmp_path):
    db = tmp_path / "autometa.db"
    # A budget the search cannot spend before it is interrupted, however fast or busy the
    # machine: the snapshot below must see it running (with 6 trials, a machine at load 8
    # finished the search while the snapshot's process was still starting).
    proc = _cli(*RUN, "--trials", "1000", "--workers", "2", cwd=tmp_path)
    _wait_running(db, proc)
    # A snapshot while trials run: shown, nothing written to the storage.
    before = {t.number: t.state for t in _trials(db)}
    snapshot = subprocess.run([sys.executable, "-m", "autometa", "leaderboard",
                               "sinusoid-seed0"], cwd=tmp_path, capture_output=True, text=True,
                              timeout=QUICK_SUBPROCESS)
    assert snapshot.returncode == 0, snapshot.stderr
    assert "still running" in snapshot.stdout
    assert not (tmp_path / "autometa-reports").exists()
    running = _wait_running(db, proc)  # still one (the snapshot may take seconds when busy)
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C reaches the whole process group
    out, err = proc.communicate(timeout=STOPPED_PROCESS)
    assert proc.returncode == 130, (out, err)
    assert err.strip().splitlines() == [
        "autometa: interrupted; re-run the same command to resume"]
    trials = _trials(db)
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    assert trials[running.number].state == TrialState.FAIL
    # Said by the worker (stopped by its supervisor's SIGTERM) or the supervisor: Ctrl-C.
    assert trials[running.number].user_attrs["crash"] == "interrupted (Ctrl-C)"
    assert "autometa.test" not in optuna.load_study(
        study_name="sinusoid-seed0", storage=f"sqlite:///{db}").user_attrs
    assert before  # the snapshot saw the running study
    # The budget is not a setting a resume must repeat: two more trials than were counted,
    # which the interrupted trials (queued again, taken first) are.
    budget = len(_counted(trials)) + 2
    rerun = _cli(*RUN, "--trials", str(budget), "--workers", "2", cwd=tmp_path)
    out, err = rerun.communicate(timeout=POOL_SEARCH)
    assert rerun.returncode == 0, err
    trials = _trials(db)
    assert len(_counted(trials)) == budget
    assert [t for t in trials if t.system_attrs.get("failed_trial") == running.number]


@pytest.mark.slow  # three CLI searches at once
def test_three_processes_started_together_on_a_fresh_database_share_one_budget(tmp_path):
    args = ["run", "--task", "sinusoid", "--algorithms", "maml,finetune", "--sources", "mlp",
            "--trials", "5", "--meta-steps", "4", "--eval-every", "2", "--top-k", "1",
            "--no-progress", *TASK_FLAGS]
    procs = [_cli(*args, cwd=tmp_path) for _ in range(3)]
    results = [p.communicate(timeout=POOL_SEARCH) for p in procs]
    for p, (_out, err) in zip(procs, results, strict=True):
        assert p.returncode == 0, err
    trials = _searched(_trials(tmp_path / "autometa.db"))
    assert len(_counted(trials)) == len(trials) == 5
    assert len({_config(t) for t in trials}) == 5
    wrote = [out for out, _ in results if "wrote autometa-reports" in out]
    assert len(wrote) == 1  # the reports are written once


def test_a_resumed_study_continues_instead_of_repeating_its_first_trials(tmp_path):
    common = dict(algorithms=["maml"], sources=["mlp"], meta_steps=2, eval_every=2, top_k=1,
                  task_params=SMALL, seed=0, pruner="none")
    autometa.search("sinusoid", n_trials=2, **common)
    autometa.search("sinusoid", n_trials=4, **common)
    trials = _trials(tmp_path / "autometa.db")
    assert len({_config(t) for t in trials}) == 4


@pytest.mark.slow  # two worker processes on a journal file
@pytest.mark.parametrize("url", ["runs.log", "runs.journal"])
def test_a_journal_file_is_a_storage(tmp_path, url):
    board = autometa.search("sinusoid", algorithms=["maml"], sources=["mlp"], n_trials=2,
                            meta_steps=2, eval_every=2, top_k=1, task_params=SMALL,
                            storage=url, devices=["cpu", "cpu"])
    finished = board.counts["complete"] + board.counts["pruned"] + board.counts["failed"]
    assert finished == 2 and board.counts["running"] == 0 and (tmp_path / url).is_file()


def test_a_queued_trial_and_the_next_new_one_never_sample_alike(tmp_path):
    """A queued retry that fixes only some parameters (a trial interrupted while sampling)
    is sampled with its own number's seed, not the next new trial's."""
    common = dict(algorithms=["maml"], sources=["mlp"], meta_steps=2, eval_every=2, top_k=1,
                  task_params=SMALL, seed=3, pruner="none")
    autometa.search("sinusoid", n_trials=1, **common)
    study = optuna.load_study(study_name="sinusoid-seed3", storage="sqlite:///autometa.db")
    study.enqueue_trial({"algorithm": "maml"})  # trial 1: only the algorithm fixed
    autometa.search("sinusoid", n_trials=3, **common)
    trials = _trials(tmp_path / "autometa.db", "sinusoid-seed3")
    assert len(trials) == 3 and len({_config(t) for t in trials}) == 3
