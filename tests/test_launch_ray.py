"""``autometa launch ray`` on a real Ray cluster of several nodes on this machine
(``ray.cluster_utils.Cluster``: a head and worker nodes, each a raylet of its own, each
declaring one GPU; the GPUs are Ray resources only, so workers compute on ``--devices
cpu``), with the study in a SQLite file every node reaches.

A node is lost as a machine would be: its raylet is killed (SIGKILL) with everything it
started.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
import pytest
from conftest import SMALL_SINUSOID
from limits import CLI_SEARCH, QUICK_SUBPROCESS, STOPPED_PROCESS, TRIAL_START
from optuna.trial import FrozenTrial, TrialState

from autometa.cli import main
from autometa.engine.claim import counts

STUDY = "rayed"
TRIALS = 8
#: Meta-steps of each trial, all of one small shape (about 1 ms each here): long enough
#: (seconds) that a node is lost while its worker is in a trial, short enough for CI.
META_STEPS = 2000


def _search(storage: str, *extra: str, study: str = STUDY, trials: int = TRIALS,
            meta_steps: int = META_STEPS) -> list[str]:
    return ["launch", "ray", "--task", "sinusoid", "--algorithms", "maml", "--sources", "mlp",
            # Trials that differ in learning rates only: each takes about as long, and none
            # diverges (small inner steps), so each completes.
            "--param", "maml.inner_lr=[0.001,0.002,0.004,0.008]", "--param",
            "maml.meta_batch_size=4", "--param", "maml.inner_steps=1", "--param",
            "maml.first_order=true", "--param", "mlp.hidden=40", "--param", "mlp.layers=1",
            "--meta-steps", str(meta_steps), "--eval-every", str(meta_steps),
            "--pruner", "none", "--no-baselines", "--threads", "1", "--trials", str(trials),
            "--study", study, "--storage", storage, "--workers", "2", "--gpus-per-worker", "1",
            "--devices", "cpu",
            *(a for k, v in SMALL_SINUSOID.items() for a in ("--task-param", f"{k}={v}")),
            *extra]


def _trials(storage: str, study: str = STUDY) -> list[FrozenTrial]:
    # SQLite's write lock may be held for seconds by a worker on a loaded machine (the
    # workers' own storages wait for it; Optuna's default gives up after 5 s)
    waits = {"connect_args": {"timeout": 60}} if storage.startswith("sqlite") else {}
    rdb = optuna.storages.RDBStorage(storage, engine_kwargs=waits)
    return optuna.load_study(study_name=study, storage=rdb).get_trials(deepcopy=False)


def _running(storage: str, study: str = STUDY) -> list[FrozenTrial]:
    """The study's trials that a worker runs (none while the study is being created)."""
    try:
        trials = _trials(storage, study)
    except KeyError:  # no such study yet
        return []
    return [t for t in trials if t.state == TrialState.RUNNING and "worker" in t.user_attrs]


def _launch(storage: str, cluster: Any, out: Path, **search: Any) -> subprocess.Popen[str]:
    """``autometa launch ray`` on ``cluster`` in a subprocess, its output in ``out``."""
    with out.open("w") as sink:
        return subprocess.Popen(
            [sys.executable, "-m", "autometa",
             *_search(storage, "--address", cluster.address, **search)],
            stdout=sink, stderr=subprocess.STDOUT, text=True, start_new_session=True,
            env={**os.environ, "COLUMNS": "200", "RAY_DEDUP_LOGS": "0"})


@pytest.fixture(scope="module")
def cluster() -> Iterator[Any]:
    """A head (no GPU: the launcher's) and two worker nodes with one GPU each (for the
    module: a test may lose a node if it adds one)."""
    pytest.importorskip("ray", reason="Ray is not installed (pip install 'autometa-ml[ray]')")
    from ray.cluster_utils import Cluster

    # A lost node is declared dead after 3 missed health checks 0.5 s apart (Ray's default:
    # 5 of 3 s), so its task is retried within seconds.
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "num_gpus": 0, "include_dashboard": False,
        "_system_config": {"health_check_period_ms": 500, "health_check_failure_threshold": 3,
                           "health_check_initial_delay_ms": 0}})
    try:
        for _ in range(2):
            cluster.add_node(num_cpus=1, num_gpus=1)
        cluster.wait_for_nodes()
        yield cluster
    finally:
        cluster.shutdown()


def _raylet_of(pid: Any, raylets: dict[int, Any]) -> Any:
    """The node (of ``raylets``: raylet pid -> node) whose raylet started process ``pid``
    (its Ray worker's child), or None."""
    while isinstance(pid, int) and pid > 1:
        if pid in raylets:
            return raylets[pid]
        try:  # the parent's pid: the field after the ")" that ends the process's name
            pid = int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[1])
        except (OSError, ValueError, IndexError):  # the process ended meanwhile
            return None
    return None


@pytest.mark.slow
def test_workers_placed_by_ray_end_the_budget_and_a_lost_node_s_trial_runs_again(
        cluster, tmp_path):
    """Two workers, one per node and GPU; once one of them is in a trial, its node is lost
    and a third joins: Ray runs the lost task again there, the lost trial is failed and
    queued again with its parameters, and the study ends at exactly 8 trials with 8
    distinct configurations."""
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    out = tmp_path / "launch.out"
    start = time.monotonic()
    launcher = _launch(storage, cluster, out)
    try:
        raylets = {node.all_processes["raylet"][0].process.pid: node
                   for node in cluster.worker_nodes}
        lost, doomed = None, None
        end = time.monotonic() + TRIAL_START
        while lost is None:
            assert time.monotonic() < end, f"no trial started: {out.read_text()[-3000:]}"
            assert launcher.poll() is None, out.read_text()[-3000:]
            for trial in _running(storage):
                node = _raylet_of(trial.user_attrs["worker"].get("pid"), raylets)
                if node is not None:  # the first worker seen in a trial loses its node
                    lost, doomed = trial, node
                    break
            time.sleep(0.2)
        print(f"{time.monotonic() - start:.0f} s: trial {lost.number} running; its node lost")
        cluster.remove_node(doomed, allow_graceful=False)  # SIGKILL, as a machine is lost
        cluster.add_node(num_cpus=1, num_gpus=1)
        launcher.wait(timeout=CLI_SEARCH)
        print(f"{time.monotonic() - start:.0f} s: the launcher ended")
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, 9)
    text = out.read_text()
    assert launcher.returncode == 0, text[-3000:]

    # What the launcher says: one line per worker, each on a node and GPU of its own (Ray
    # numbers GPUs per node), none on the lost node (its task ran again elsewhere).
    ended = re.findall(r"^worker (\d)/2: node (\w+) \(([^)]+)\), GPU (\S+): exit (-?\d+)$",
                       text, re.M)
    assert sorted(int(w[0]) for w in ended) == [1, 2], text[-3000:]
    assert all(w[4] == "0" and w[3] == "0" for w in ended)
    assert len({(w[1], w[3]) for w in ended}) == 2
    assert not any(doomed.node_id.startswith(w[1]) for w in ended)
    assert "watch: `ray status`" in text and f"autometa leaderboard {STUDY} --storage" in text

    trials = _trials(storage)
    finished = [t for t in trials if counts(t)]
    assert len(finished) == TRIALS and all(t.state == TrialState.COMPLETE for t in finished)
    assert len({tuple(sorted(t.params.items())) for t in finished}) == TRIALS
    # The lost trial: failed as its process died with its node, queued again once, and
    # finished with the same parameters.
    failed = trials[lost.number]
    assert failed.state == TrialState.FAIL, \
        f"trial {lost.number} ended {failed.state.name} before its node was lost: make " \
        "META_STEPS larger"
    assert failed.user_attrs["crash"], failed.user_attrs
    retry = [t for t in trials if t.system_attrs.get("failed_trial") == lost.number]
    assert len(retry) == 1 and retry[0].state == TrialState.COMPLETE
    assert retry[0].params == failed.params
    assert len(trials) == TRIALS + 1  # the budget, plus the one lost trial


@pytest.mark.slow
def test_a_stopped_launcher_stops_its_workers_and_their_trials_run_again(cluster, tmp_path):
    """SIGTERM to the launcher (a scheduler's stop, Ctrl-C alike): every worker fails its
    trial in flight as interrupted and queues it again, then exits; the launcher exits 143
    saying how to resume."""
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    out = tmp_path / "launch.out"
    launcher = _launch(storage, cluster, out, study="stopped", trials=4, meta_steps=100_000)
    try:
        end = time.monotonic() + TRIAL_START
        running: list[FrozenTrial] = []
        while len(running) < 2:  # both workers in a trial
            assert time.monotonic() < end, f"no trials started: {out.read_text()[-3000:]}"
            assert launcher.poll() is None, out.read_text()[-3000:]
            running = _running(storage, "stopped")
            time.sleep(0.2)
        launcher.terminate()
        assert launcher.wait(timeout=STOPPED_PROCESS) == 143, out.read_text()[-3000:]
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, 9)
    text = out.read_text()
    assert "stopping the 2 worker(s)" in text
    assert text.rstrip().endswith("autometa: stopped by SIGTERM; re-run the same command to "
                                  "resume")
    # The launcher waits for its workers up to 3 x STOP_GRACE; on a loaded machine (the full
    # suite in CI) a worker may write its trial's end just after: wait for it, bounded.
    end = time.monotonic() + STOPPED_PROCESS
    trials = _trials(storage, "stopped")
    while (any(trials[t.number].state == TrialState.RUNNING for t in running)
           and time.monotonic() < end):
        time.sleep(0.5)
        trials = _trials(storage, "stopped")
    for stopped in running:
        assert trials[stopped.number].state == TrialState.FAIL
        assert trials[stopped.number].user_attrs["crash"] == "interrupted (SIGTERM)"
        again = [t for t in trials if t.system_attrs.get("failed_trial") == stopped.number]
        assert len(again) == 1 and again[0].state == TrialState.WAITING
        assert again[0].params == trials[stopped.number].params
        assert not Path(f"/proc/{stopped.user_attrs['worker']['pid']}").exists()


def test_dry_run_prints_the_tasks_and_stores_nothing(pg_url, capsys):
    """No password in what is printed; no study stored."""
    secret = pg_url.replace("postgres@", "postgres:s3cr3t-pw@")  # trust auth ignores it
    assert main(_search(secret, "--dry-run")) == 0
    printed = capsys.readouterr()
    text = printed.out + printed.err
    assert "s3cr3t-pw" not in text
    assert "dry run: would start 2 Ray task(s)" in text
    assert "each asking for 1 GPU(s) and 1 CPU(s)" in text
    command = next(line.strip() for line in text.splitlines() if " worker rayed " in line)
    assert command.endswith(f"-m autometa worker {STUDY} --devices cpu --workers 1 --no-progress "
                            f"--artifacts {Path('autometa-artifacts').resolve()} "
                            f"--data-root {Path.cwd()} --threads 1")
    assert optuna.get_all_study_names(secret) == []


def test_without_ray_one_line_names_the_extra_and_nothing_is_stored(tmp_path, monkeypatch,
                                                                     capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray: ImportError, as uninstalled
    database = tmp_path / "s.db"
    assert main(_search(f"sqlite:///{database}", "--address", "127.0.0.1:1")) == 2
    err = capsys.readouterr().err.strip()
    assert "pip install 'autometa-ml[ray]'" in err and len(err.splitlines()) == 1
    assert not database.exists()


def test_no_cluster_at_the_address_is_one_line_and_nothing_is_stored(tmp_path, capsys):
    pytest.importorskip("ray", reason="Ray is not installed (pip install 'autometa-ml[ray]')")
    database = tmp_path / "s.db"
    assert main(_search(f"sqlite:///{database}", "--address", "127.0.0.1:1")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "nothing answers at --address 127.0.0.1:1" in err and "ray start --head" in err
    assert not database.exists()


def test_a_bad_cpus_per_worker_is_refused_before_the_study_is_stored(tmp_path, capsys):
    database = tmp_path / "s.db"
    with pytest.raises(SystemExit) as stop:  # argparse's usage error
        main(_search(f"sqlite:///{database}", "--cpus-per-worker", "-1"))
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "--cpus-per-worker: '-1': expected a number of CPUs, 0 or more" in err
    assert len(err.splitlines()) == 1 and not database.exists()


def test_help_does_not_import_ray():
    code = ("import sys\nfrom autometa.cli import main\ntry:\n    main(['launch', 'ray', "
            "'--help'])\nexcept SystemExit:\n    pass\nprint('ray imported' if 'ray' in "
            "sys.modules else 'no ray')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=QUICK_SUBPROCESS)
    assert done.stdout.strip().endswith("no ray"), done.stdout + done.stderr
    assert "--address" in done.stdout and "--cpus-per-worker" in done.stdout


def test_a_stopped_worker_outlasts_its_own_wait_for_its_trial():
    """Ray's wrapper must not kill ``autometa worker`` before the worker has waited for its
    trial process and written the trial's end (else the trial stays RUNNING)."""
    from autometa.engine.pool import STOP_GRACE as POOL_STOP_GRACE
    from autometa.launch.ray_cluster import STOP_GRACE

    assert STOP_GRACE >= POOL_STOP_GRACE + 5


def test_more_gpus_per_worker_than_any_node_has_is_one_line_and_nothing_is_stored(
        cluster, tmp_path, capsys):
    """Each node has 1 GPU: a worker asking for 2 would wait for ever (Ray's autoscaler
    repeating that no node type fits): refused before the study is stored."""
    database = tmp_path / "s.db"
    assert main(_search(f"sqlite:///{database}", "--address", cluster.address,
                        "--gpus-per-worker", "2")) == 2
    err = capsys.readouterr().err.strip()
    assert "autometa: error: ray: no node of the cluster" in err
    line = next(line for line in err.splitlines() if "no node of the cluster" in line)
    assert line == err.splitlines()[-1] and "has 2 GPU(s) and 1 CPU(s) for one worker" in line
    assert "(the largest has 1 GPU(s) and 1 CPU(s))" in line
    assert "lower --gpus-per-worker / --cpus-per-worker, or add a node with more" in line
    assert not database.exists()
