"""``autometa launch slurm`` against a real single-node SLURM cluster that the tests start
(tests/slurm_cluster.py): a job array of workers runs a study to exactly its budget, one
fake GPU each; a pre-empted task's trial is queued again and the requeued task joins the
study again; ``--dry-run`` prints the sbatch script and no password; a missing submitit is
one line. Real ``autometa``, ``sbatch``, ``slurmctld`` and ``slurmd`` processes."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
from limits import CLI_SEARCH, QUICK_SUBPROCESS, SLURM_ARRAY, TRIAL_START
from optuna.trial import FrozenTrial, TrialState
from stored_trials import stored_trials

from autometa.study.settings import stored_settings

#: Every test here starts real processes (autometa, SLURM's daemons and jobs).
pytestmark = pytest.mark.slow

STUDY = "sinusoid-seed0"
#: Set by CI: no SLURM fails the cluster tests instead of skipping them.
REQUIRE = "AUTOMETA_REQUIRE_SLURM"
TASK_FLAGS = [a for k, v in {"val_episodes": 4, "test_episodes": 4, "eval_queries": 5}.items()
              for a in ("--task-param", f"{k}={v}")]
#: A tiny sinusoid study whose trials always complete: no pruner, step sizes that never
#: diverge (the configurations still differ in their other hyperparameters).
SEARCH = ["--task", "sinusoid", "--algorithms", "maml", "--sources", "mlp", "--no-baselines",
          "--top-k", "1", "--pruner", "none", "--threads", "1",
          "--param", "maml.inner_lr=0.01", "--param", "maml.meta_lr=0.001", *TASK_FLAGS]


@pytest.fixture(scope="module")
def slurm() -> Iterator[object]:
    """A single-node SLURM cluster for this module's tests (see tests/slurm_cluster.py).

    Skips where it cannot start (not root, binaries missing), unless
    AUTOMETA_REQUIRE_SLURM=1 (CI sets it) turns that into a failure."""
    from slurm_cluster import SlurmCluster, missing

    reason = missing()
    if reason:
        if os.environ.get(REQUIRE) == "1":
            pytest.fail(f"{REQUIRE}=1 but {reason}", pytrace=False)
        pytest.skip(reason)
    with SlurmCluster() as cluster:
        yield cluster


def _launch(*args: str, cwd: Path, env: dict[str, str] | None = None,
            timeout: float = CLI_SEARCH) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "autometa", "launch", "slurm", *args],
                          cwd=cwd, env={**(env or os.environ), "COLUMNS": "200"},
                          capture_output=True, text=True, timeout=timeout)


def _array(stdout: str) -> str:
    match = re.search(r"submitted SLURM job(?: array)? (\d+): ", stdout)
    assert match, stdout
    return match.group(1)


def test_a_job_array_runs_the_study_to_exactly_its_budget_one_gpu_per_worker(slurm, tmp_path):
    """Three array tasks with one (fake) GPU each: exactly 6 complete trials with distinct
    parameters; each task ran a worker on its own GPU; the storage URL is in no file
    submitit wrote (its pickles, the script)."""
    db = tmp_path / "study.db"
    started = time.monotonic()
    result = _launch(*SEARCH, "--trials", "6", "--meta-steps", "10", "--eval-every", "5",
                     "--storage", f"sqlite:///{db}", "--workers", "3",
                     "--gpus-per-worker", "1", "--devices", "cpu", "--partition", "debug",
                     "--time-limit", "10", "--wait", cwd=tmp_path, env=slurm.env(),
                     timeout=SLURM_ARRAY)
    seconds = time.monotonic() - started
    logs = tmp_path / "autometa-slurm"
    assert result.returncode == 0, (result.stdout, result.stderr, slurm.logs())
    array = _array(result.stdout)
    assert f"{array}_[0-2], 1 GPU(s) each, time limit 10 min, partition debug" in result.stdout
    assert f"logs: {logs}/{array}_<task>_0_log.out" in result.stdout
    assert f"watch: squeue -j {array}" in result.stdout
    assert f"autometa leaderboard {STUDY} --storage sqlite:///{db}" in result.stdout
    assert f"SLURM job {array}: 3 of 3 task(s) ended cleanly" in result.stdout

    trials = stored_trials(db)
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 6, \
        [(t.number, t.state.name, t.user_attrs.get("crash")) for t in trials]
    assert len({json.dumps(t.params, sort_keys=True) for t in trials}) == 6
    # --workers 3 counts the tasks: not stored as each worker's own trials at once.
    settings = stored_settings(optuna.load_study(study_name=STUDY, storage=f"sqlite:///{db}"))
    assert "task" in settings and settings.get("workers") is None
    starts = [line for path in sorted(logs.glob(f"{array}_*_0_log.out"))
              for line in path.read_text().splitlines() if "autometa worker on " in line]
    assert len(starts) == 3, starts
    gpus = {re.search(r", GPUs (\S+): ", line).group(1) for line in starts}  # type: ignore
    assert gpus == {"0", "1", "2"}, starts  # one distinct GPU per task, as SLURM gave them
    written = [p for p in logs.iterdir() if p.suffix in (".pkl", ".sh")]
    assert written and not [p for p in written if str(db).encode() in p.read_bytes()]
    print(f"3-task array, 6 trials: {seconds:.1f} s")
    again = _launch(*SEARCH, "--trials", "6", "--meta-steps", "10", "--eval-every", "5",
                    "--storage", f"sqlite:///{db}", "--workers", "3",
                    "--gpus-per-worker", "1", "--devices", "cpu", "--partition", "debug",
                    "--time-limit", "10", "--wait", cwd=tmp_path, env=slurm.env(),
                    timeout=SLURM_ARRAY)
    assert again.returncode == 0, again.stderr
    assert again.stdout.splitlines()[-1] == (f"study {STUDY!r}: its budget of 6 trials is "
                                             "spent; nothing submitted (a larger --trials "
                                             "runs more)")
    assert len(stored_trials(db)) == 6


def _wait_running(db: Path, proc: subprocess.Popen[str]) -> FrozenTrial:
    end = time.monotonic() + TRIAL_START
    while time.monotonic() < end:
        assert proc.poll() is None, proc.communicate()
        for t in stored_trials(db):
            if t.state == TrialState.RUNNING and "source_params" in t.user_attrs:
                return t
        time.sleep(0.3)
    raise AssertionError(f"no trial running after {TRIAL_START} s: a hang")


def test_a_preempted_task_queues_its_trial_and_its_requeued_task_finishes_the_study(
        slurm, tmp_path):
    """submitit's pre-emption signal (USR2, as SLURM sends it before a time limit or a
    pre-emption) to the only task: its worker fails the trial in flight as interrupted
    and queues it; the task requeues itself; the requeued task joins the study again and
    runs the queued copy (same parameters) and the rest: exactly 2 trials counted."""
    db = tmp_path / "study.db"
    proc = subprocess.Popen(
        [sys.executable, "-m", "autometa", "launch", "slurm", *SEARCH, "--trials", "2",
         "--meta-steps", "300", "--eval-every", "150", "--storage", f"sqlite:///{db}",
         "--workers", "1", "--gpus-per-worker", "0", "--time-limit", "10", "--wait"],
        cwd=tmp_path, env={**slurm.env(), "COLUMNS": "200"}, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)
    try:
        victim = _wait_running(db, proc)
        subprocess.run(["scancel", "--signal=USR2", _job_of(tmp_path)], check=True,
                       env=slurm.env(), timeout=QUICK_SUBPROCESS)
        out, err = proc.communicate(timeout=SLURM_ARRAY)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, (out, err, slurm.logs())
    trials = stored_trials(db)
    states = [(t.number, t.state.name, t.user_attrs.get("crash"),
               t.system_attrs.get("failed_trial")) for t in trials]
    interrupted = trials[victim.number]
    assert interrupted.state == TrialState.FAIL, states
    assert interrupted.user_attrs["crash"].startswith("interrupted (SIGTERM"), states
    [copy] = [t for t in trials if t.system_attrs.get("failed_trial") == victim.number]
    assert copy.state == TrialState.COMPLETE and copy.params == interrupted.params
    assert sum(t.state == TrialState.COMPLETE for t in trials) == 2, states
    log = "".join(p.read_text() for p in (tmp_path / "autometa-slurm").glob("*_log.*"))
    assert "Requeued job" in log and log.count("autometa worker on ") == 2, log


def test_scancel_queues_the_trials_in_flight_and_wait_says_the_tasks_failed(slurm, tmp_path):
    """``scancel`` (the printed "stop" line): SLURM's SIGTERM reaches the worker, whose
    trial is failed as interrupted and queued again; ``--wait`` names the task that ended
    without a result, says how to resume, and exits 1."""
    db = tmp_path / "study.db"
    proc = subprocess.Popen(
        [sys.executable, "-m", "autometa", "launch", "slurm", *SEARCH, "--trials", "2",
         "--meta-steps", "10000000", "--eval-every", "5000000",
         "--storage", f"sqlite:///{db}", "--workers", "1", "--gpus-per-worker", "0",
         "--wait"],
        cwd=tmp_path, env={**slurm.env(), "COLUMNS": "200"}, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)
    try:
        victim = _wait_running(db, proc)
        job = _job_of(tmp_path)
        subprocess.run(["scancel", job], check=True, env=slurm.env(),
                       timeout=QUICK_SUBPROCESS)
        out, err = proc.communicate(timeout=SLURM_ARRAY)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 1, (out, err)
    assert f"task {job} failed: ended without a result (cancelled, killed or out of time)" \
        in out, out
    assert f"SLURM job {job}: 0 of 1 task(s) ended cleanly" in out
    assert "re-run the same `autometa launch slurm` command" in out
    trials = stored_trials(db)
    assert trials[victim.number].state == TrialState.FAIL
    assert trials[victim.number].user_attrs["crash"].startswith("interrupted (SIGTERM")
    [copy] = [t for t in trials if t.system_attrs.get("failed_trial") == victim.number]
    assert copy.state == TrialState.WAITING and copy.params == trials[victim.number].params


def _job_of(folder: Path) -> str:
    """The job's id, from the job folder submitit wrote (the launch is still waiting)."""
    end = time.monotonic() + QUICK_SUBPROCESS
    while time.monotonic() < end:
        scripts = list((folder / "autometa-slurm").glob("*_submission.sh"))
        if scripts:
            return scripts[0].name.split("_")[0]
        time.sleep(0.2)
    raise AssertionError("no job submitted")


def test_dry_run_prints_the_sbatch_script_without_the_password_and_stores_nothing(
        pg_url, tmp_path):
    """The array, partition, time, account, GPUs and CPUs as sbatch options; the worker's
    command; no password anywhere; no study stored, no folder made. No sbatch on PATH: the
    cluster is not asked, and the script says so."""
    url = pg_url.replace("://postgres@", "://postgres:s3cret-pw@")  # trust auth: any password
    path = os.pathsep.join(d for d in os.environ.get("PATH", "").split(os.pathsep)
                           if d and not (Path(d) / "sbatch").exists())
    result = _launch("--task", "sinusoid", "--algorithms", "maml", "--sources", "mlp",
                     "--trials", "6", "--storage", url, "--workers", "3",
                     "--gpus-per-worker", "2", "--partition", "gpu", "--time-limit", "120",
                     "--account", "lab", "--cpus-per-worker", "4", "--sbatch", "qos=high",
                     "--dry-run", cwd=tmp_path, env={**os.environ, "PATH": path})
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "\n# the cluster was not asked (no sbatch here)" in out, out
    for line in ("#SBATCH --array=0-2%3", "#SBATCH --partition=gpu", "#SBATCH --time=120",
                 "#SBATCH --account=lab", "#SBATCH --gpus-per-node=2",
                 "#SBATCH --cpus-per-task=4", "#SBATCH --qos=high",
                 "#SBATCH --signal=USR2@90", "#SBATCH --requeue",
                 "-u -m submitit.core._submit"):
        assert line in out, out
    assert f"-m autometa worker {STUDY} --devices cuda --workers 2 --no-progress" in out
    assert "s3cret-pw" not in out + result.stderr
    assert not (tmp_path / "autometa-slurm").exists()
    import psycopg

    with psycopg.connect(pg_url.replace("postgresql+psycopg", "postgresql")) as conn:
        tables = conn.execute("select count(*) from information_schema.tables "
                              "where table_schema = 'public'").fetchone()
    assert tables == (0,)  # nothing stored


@pytest.mark.parametrize("flags, env, expected", [
    (("--gpus-per-worker", "0.5"), {}, "--gpus-per-worker 0.5: SLURM gives whole GPUs"),
    (("--sbatch", "qos"), {}, "--sbatch 'qos': expected KEY=VALUE"),
    (("--time-limit", "2"), {}, "--time-limit 2: under 5 minutes; SLURM warns a task 90 s "
                                "before its limit"),
    ((), {"SBATCH_EXPORT": "NONE"}, "SBATCH_EXPORT=NONE keeps AUTOMETA_STORAGE (the storage "
                                    "URL) from the worker tasks"),
])
def test_bad_slurm_flags_are_one_line_before_anything_is_stored(tmp_path, flags, env,
                                                                expected):
    result = _launch("--task", "sinusoid", "--storage", f"sqlite:///{tmp_path}/s.db",
                     *flags, "--dry-run", cwd=tmp_path, env={**os.environ, **env},
                     timeout=QUICK_SUBPROCESS)
    assert result.returncode == 2
    [line] = result.stderr.strip().splitlines()
    assert expected in line, line
    assert not (tmp_path / "s.db").exists()


@pytest.mark.parametrize("flags, expected", [
    (("--partition", "nope"), "sbatch refuses the job: invalid partition specified: nope"),
    (("--gpus-per-worker", "9"), "sbatch refuses the job: "),  # the node has 3
    (("--partition", "gpu", "--dry-run"),  # a dry run asks the cluster too
     "sbatch refuses the job: invalid partition specified: gpu"),
])
def test_what_the_cluster_refuses_is_one_line_before_anything_is_stored(slurm, tmp_path,
                                                                        flags, expected):
    """``sbatch --test-only`` asks the cluster itself before the study is created (before
    a dry run prints its script too)."""
    result = _launch("--task", "sinusoid", "--storage", f"sqlite:///{tmp_path}/s.db",
                     "--workers", "2", *flags, cwd=tmp_path, env=slurm.env(),
                     timeout=QUICK_SUBPROCESS)
    assert result.returncode == 2, result.stderr
    [line] = result.stderr.strip().splitlines()
    assert line.startswith(f"autometa: error: {expected}"), line
    assert not (tmp_path / "s.db").exists() and not (tmp_path / "autometa-slurm").exists()


def test_a_dry_run_the_cluster_accepts_prints_the_script_saying_so(slurm, tmp_path):
    result = _launch("--task", "sinusoid", "--storage", f"sqlite:///{tmp_path}/s.db",
                     "--workers", "2", "--partition", "debug", "--dry-run", cwd=tmp_path,
                     env=slurm.env(), timeout=QUICK_SUBPROCESS)
    assert result.returncode == 0, result.stderr
    assert "\n# the cluster accepted it (sbatch --test-only)\n" in result.stdout
    assert "#SBATCH --partition=debug" in result.stdout
    assert not (tmp_path / "s.db").exists() and not (tmp_path / "autometa-slurm").exists()


def test_without_submitit_the_launch_is_one_line_naming_the_extra(tmp_path):
    """A ``submitit`` that cannot be imported (a shim ahead of site-packages stands for an
    environment without it): one line naming the install, exit 2, nothing stored."""
    shim = tmp_path / "shim" / "submitit"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text("raise ImportError(\"No module named 'submitit'\")\n")
    env = {**os.environ, "PYTHONPATH": str(shim.parent)}
    result = _launch("--task", "sinusoid", "--storage", f"sqlite:///{tmp_path}/s.db",
                     cwd=tmp_path, env=env, timeout=QUICK_SUBPROCESS)
    assert result.returncode == 2, result.stderr
    [line] = result.stderr.strip().splitlines()
    assert "pip install 'autometa-ml[slurm]'" in line, line
    assert not (tmp_path / "s.db").exists()
