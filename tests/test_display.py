"""What a running search shows (issue 26): never silent, never frozen.

The CLI's first line (study, storage without credentials) and "resuming: k of n done";
``--no-progress`` lines with each trial's hyperparameters, its phases and the search's
ETA; a source's pre-training (``autometa.work.report`` inside a trial) on that trial's
line, in the calling process and in a pool's worker; the bars' phases and ETAs moving
with time between events; ``autometa.search`` drawing progress in a terminal by default.
"""

from __future__ import annotations

import io
import os
import pty
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import SMALL_SINUSOID, Install
from limits import CLI_SEARCH

from autometa.cli import main
from autometa.eta import SearchEta, TrialEta
from autometa.progress import LineProgress, RichProgress

TINY = ["--task", "sinusoid", "--algorithms", "maml,finetune", "--sources", "mlp",
        "--meta-steps", "6", "--eval-every", "3", "--pruner", "none", "--no-baselines",
        "--threads", "1", "--no-progress",
        *(a for k, v in SMALL_SINUSOID.items() for a in ("--task-param", f"{k}={v}"))]
TIME = r"\d+:\d\d:\d\d"

#: A source whose preparation reports its pre-training through autometa.work, as the
#: ``pretrained`` source does (a few reports, far enough apart not to be thinned out).
SLOW_SOURCE = """
    import time

    import torch
    from torch import nn

    from autometa import Backbone, SourceModel, hookimpl, work


    class Slow(SourceModel):
        def prepare(self, task):
            for step in range(4):
                work.report("pre-training slow", step, 3)
                time.sleep(0.3)

        def build(self, spec):
            width = 1
            for size in spec.input_shape:
                width *= size
            return Backbone(nn.Sequential(nn.Flatten(), nn.Linear(width, 8), nn.ReLU()),
                            nn.Linear(8, spec.output_size))


    @hookimpl
    def register_source_models(register):
        register("slow", "slow_source:Slow", description="reports its pre-training")
"""


def _cli(*args: str, cwd: Path, env: dict[str, str] | None = None
         ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "autometa", *args], cwd=cwd,
                          env={**os.environ, "COLUMNS": "200", **(env or {})},
                          capture_output=True, text=True, timeout=CLI_SEARCH)


def test_no_progress_says_the_study_each_trial_and_a_resume_at_once(tmp_path: Path) -> None:
    first = _cli("run", *TINY, "--trials", "2", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    lines = first.stdout.splitlines()
    assert lines[0] == "study 'sinusoid-seed0' in sqlite:///autometa.db"
    started = [line for line in lines if re.match(r"trial \d+ started on cpu: ", line)]
    # Each trial's hyperparameters, as sampled (the portfolio: each algorithm's defaults).
    assert len(started) == 2
    assert any("maml(" in line and "inner_lr=0.01" in line for line in started)
    assert any("finetune(" in line and "finetune_lr=" in line for line in started)
    ended = [line for line in lines if re.match(r"trial \d+: mse ", line)]
    assert len(ended) == 2
    assert all(re.search(rf" in {TIME}; search eta {TIME}$", line) for line in ended), ended
    scoring = [line for line in lines if line.endswith(": scoring on meta-test after "
                                                         "meta-step 6/6")]
    assert len(scoring) == 2, lines  # the phase that is always said (top_k 3: both scored)

    again = _cli("run", *TINY, "--trials", "3", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    head = again.stdout.splitlines()[:2]
    assert head[0] == lines[0]
    # The stored trials' wall times give the ETA before any trial of this run ends.
    assert re.fullmatch(rf"resuming: 2 of 3 done; eta {TIME}", head[1]), head


def test_the_first_line_hides_the_storage_password(capsys: pytest.CaptureFixture[str]) -> None:
    url = "postgresql://me:s3cret@127.0.0.1:1/db?sslmode=disable&password=hunter2"
    assert main(["run", "--task", "sinusoid", "--trials", "1", "--storage", url,
                 "--no-progress"]) == 2
    said = capsys.readouterr()
    assert said.out.splitlines() == [
        "study 'sinusoid-seed0' in postgresql://me:***@127.0.0.1:1/db?sslmode=disable"
        "&password=***"]
    assert "s3cret" not in said.err and "hunter2" not in said.err
    [error] = said.err.strip().splitlines()
    assert error.startswith("autometa: error: storage: cannot open postgresql://me:***@")

    assert main(["worker", "shared", "--storage", url, "--no-progress"]) == 2
    said = capsys.readouterr()
    assert said.out.splitlines() == [
        "joining study 'shared' in postgresql://me:***@127.0.0.1:1/db?sslmode=disable"
        "&password=***"]
    assert "s3cret" not in said.err and "hunter2" not in said.err


@pytest.mark.parametrize("workers", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_a_sources_pre_training_is_on_its_trials_line(tmp_path: Path, install: Install,
                                                       workers: int) -> None:
    """``autometa.work.report`` inside a trial reaches that trial's line, from the process
    itself and from a pool's worker (before: a bar before the trials, or a log line in a
    worker, so 15 minutes of pre-training showed as "0/300")."""
    install("slow-dist", {"slow": "slow_source"}, {"slow_source": SLOW_SOURCE})
    site = str(tmp_path / "site")
    run = _cli("run", *TINY, "--sources", "slow", "--algorithms", "finetune", "--trials",
               str(workers), "--workers", str(workers), cwd=tmp_path,
               env={"PYTHONPATH": os.pathsep.join([site, os.environ.get("PYTHONPATH", "")])})
    assert run.returncode == 0, run.stderr
    for number in range(workers):
        said = [line for line in run.stdout.splitlines()
                if line.startswith(f"trial {number}: pre-training slow ")]
        assert said[0] == f"trial {number}: pre-training slow 0/3", run.stdout
        assert said[-1] == f"trial {number}: pre-training slow 3/3", run.stdout
        assert len(said) <= 4  # the start, a tenth after 30 s of silence, the end


class Clock:
    """Time the test sets."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _shown(progress: RichProgress) -> str:
    """The bars as the terminal shows them now."""
    out = io.StringIO()
    from rich.console import Console

    Console(file=out, width=200, color_system=None).print(progress.bars.get_renderable())
    return out.getvalue()


def _line(shown: str, start: str) -> str:
    return next(line for line in shown.splitlines() if line.strip().startswith(start))


def test_bars_show_each_phase_and_etas_that_move_between_events() -> None:
    clock = Clock()
    console_out = io.StringIO()
    from rich.console import Console

    progress = RichProgress(Console(file=console_out, width=200), clock=clock)
    progress.search_started(3, 0, None, "mse")
    assert "eta after the first trial" in _line(_shown(progress), "trials")
    progress.trial_started(0, "maml(inner_lr=0.01) + mlp(hidden=40)", 30, "cpu")
    progress.trial_status(0, "pre-training slow", 0, 1000)
    clock.now += 60
    progress.trial_status(0, "pre-training slow", 100, 1000)
    line = _line(_shown(progress), "trial 0")
    assert "100/1000" in line and "pre-training slow, eta 0:09:00" in line, line

    progress.trial_status(0, "meta-train")
    clock.now += 100
    progress.step(0, 10)  # 10 s a step (MAML at its paper defaults on a CPU): 200 s left
    assert "meta-train, eta 0:03:20" in _line(_shown(progress), "trial 0")
    clock.now += 5  # no event: the ETA counts down all the same
    line = _line(_shown(progress), "trial 0")
    assert "10/30" in line and "meta-train, eta 0:03:15" in line, line

    progress.trial_status(0, "evaluating meta-val")
    clock.now += 12
    line = _line(_shown(progress), "trial 0")
    assert "evaluating meta-val 0:00:12" in line and "meta-train" not in line, line
    clock.now += 30  # a long evaluation: its time keeps moving, no stale step ETA
    assert "evaluating meta-val 0:00:42" in _line(_shown(progress), "trial 0")
    # The running trial's own projection, before any trial has finished.
    assert re.search(r"eta \d+:\d\d:\d\d", _line(_shown(progress), "trials"))

    progress.evaluated(0, 10, 0.5)
    progress.trial_status(0, "meta-train")
    clock.now += 100
    progress.step(0, 20)
    # 10 more steps at the last 10's pace (105 s of meta-training), and one more
    # evaluation of 42 s
    assert "meta-train, eta 0:02:27" in _line(_shown(progress), "trial 0")

    progress.trial_status(0, "scoring on meta-test")
    clock.now += 3
    assert "scoring on meta-test 0:00:03" in _line(_shown(progress), "trial 0")
    progress.trial_finished(0, "COMPLETE", 0.5, "")  # 310 s in all
    # Two trials left, 310 s each, one worker.
    assert "eta 0:10:20" in _line(_shown(progress), "trials")
    clock.now += 100
    progress.trial_started(1, "finetune() + mlp()", 30, "cpu")
    clock.now += 50
    assert "eta 0:09:30" in _line(_shown(progress), "trials")  # counted down
    assert "trial 0: mse 0.5" in console_out.getvalue()


def test_search_eta_uses_stored_costs_workers_and_the_timeout() -> None:
    clock = Clock()
    resumed = SearchEta(4, workers=2, timeout=None, costs=[100.0, 300.0], clock=clock)
    assert resumed.left() == 400.0  # 4 trials of 200 s on 2 workers
    capped = SearchEta(4, workers=2, timeout=60.0, costs=[100.0, 300.0], clock=clock)
    assert capped.left() == 60.0
    running = TrialEta(10, clock)
    capped.started(0, running)
    clock.now += 90  # past the timeout, a trial still runs: its own remainder, not 0
    assert capped.left() == pytest.approx(110.0)  # 200 s expected, 90 s done
    lost = SearchEta(2, workers=1, timeout=None, costs=[100.0], clock=clock)
    lost.started(1, TrialEta(10, clock))
    clock.now += 5
    lost.finished(1, again=True)  # its worker died: queued again, still owed
    assert lost.left() == 200.0 and lost.costs == [100.0]
    unknown = SearchEta(None, workers=1, timeout=None, clock=clock)
    assert unknown.left() is None and unknown.text() == "eta after the first trial"


def test_trial_eta_ends_at_the_trial_timeout_and_after_meta_training() -> None:
    """With trial_timeout 40 s a 500-step trial's ETA is what is left of the 40 s (plus
    the cut's evaluation), not 500 steps' worth; once it scores on meta-test, nothing of
    meta-training is left (the fresh user saw "eta 0:28:44" for a trial cut at 40 s)."""
    clock = Clock()
    trial = TrialEta(500, clock, time_limit=40.0)
    trial.enter("meta-train")
    for step in range(1, 5):  # 4 meta-steps of 5 s
        clock.now += 5
        trial.stepped(step)
    assert trial.left() == pytest.approx(20.0)  # 20 s of the 40 s left, no evaluation yet
    unlimited = TrialEta(500, clock)
    unlimited.enter("meta-train")
    unlimited.stepped(1)
    clock.now += 5
    unlimited.stepped(2)
    assert unlimited.left() == pytest.approx(498 * 5.0)
    trial.enter("scoring on meta-test")
    assert trial.left() == 0.0
    assert trial.text().startswith("scoring on meta-test 0:00:0")


def test_search_eta_keeps_baselines_apart() -> None:
    """Baselines take seconds; the searched trials after them take minutes: the ETA after
    the baselines comes from a searched trial's own projection, never from their mean
    (the fresh user saw "eta 0:00:14" after the baselines of a 4-minute search)."""
    clock = Clock()
    search = SearchEta(4, workers=1, timeout=None, clock=clock)
    for number in (0, 1):
        search.started(number, TrialEta(0, clock, baseline=True))
        clock.now += 2
        search.finished(number)
    assert search.left() is None  # 2 s each tells nothing of the searched trials
    trial = TrialEta(100, clock)
    search.started(2, trial)
    trial.enter("meta-train")
    clock.now += 10
    trial.stepped(10)  # 1 s a step: 90 s left, and the next trial as long (100 s)
    assert search.left() == pytest.approx(190.0)
    clock.now += 90
    trial.stepped(100)
    search.finished(2)
    assert search.left() == pytest.approx(100.0) and search.baseline_costs == [2.0, 2.0]


def test_lines_say_long_phases_sparingly(capsys: pytest.CaptureFixture[str]) -> None:
    clock = Clock()
    lines = LineProgress(clock=clock)
    lines.search_started(1, 0, None, "mse")
    lines.trial_started(0, "maml(inner_lr=0.01) + mlp(hidden=40)", 300, "cpu")
    lines.trial_status(0, "meta-train")  # at once after the start: no line
    clock.now += 10
    lines.step(0, 100)
    lines.trial_status(0, "evaluating meta-val")  # 10 s after the last line: none
    clock.now += 40
    lines.trial_status(0, "meta-train")  # 50 s of silence: a line
    clock.now += LineProgress.QUIET
    lines.step(0, 150)  # the first pace said once it means something
    clock.now += LineProgress.LONG
    lines.step(0, 160)  # then every QUIET seconds
    lines.trial_status(0, "scoring on meta-test")  # always said
    lines.trial_finished(0, "COMPLETE", 0.25, "")
    assert capsys.readouterr().out.splitlines() == [
        "trial 0 started on cpu: maml(inner_lr=0.01) + mlp(hidden=40)",
        "trial 0: meta-train after meta-step 100/300",
        "trial 0: meta-step 150/300, meta-train, eta 0:06:00",  # the last 50 in 120 s
        "trial 0: scoring on meta-test after meta-step 160/300",
        "trial 0: mse 0.25 in 0:03:20; search eta 0:00:00",
    ]


SEARCH = """
    import sys
    import autometa

    if __name__ == "__main__":
        kwargs = {{"progress": False}} if sys.argv[1:] == ["off"] else {{}}
        autometa.search("sinusoid", algorithms=["maml"], sources=["mlp"], n_trials=1,
                        meta_steps=4, eval_every=2, initial="none", pruner="none",
                        baselines=False, task_params={small}, **kwargs)
"""


def _in_a_terminal(script: Path, *args: str, cwd: Path) -> str:
    """Run ``script`` with stderr on a pseudo-terminal; returns what it wrote there."""
    leader, follower = pty.openpty()
    env = {k: v for k, v in os.environ.items()
           if k not in ("FORCE_COLOR", "TTY_COMPATIBLE", "NO_COLOR", "TERM")}
    proc = subprocess.Popen([sys.executable, str(script), *args], cwd=cwd,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=follower,
                            env={**env, "TERM": "xterm"})
    os.close(follower)
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # the other side closed (Linux: EIO)
            break
        if not chunk:
            break
        chunks.append(chunk)
    proc.communicate(timeout=CLI_SEARCH)
    os.close(leader)
    assert proc.returncode == 0, b"".join(chunks).decode(errors="replace")
    return b"".join(chunks).decode(errors="replace")


def test_python_search_shows_progress_in_a_terminal_unless_told_not_to(tmp_path: Path) -> None:
    script = tmp_path / "search.py"
    script.write_text(textwrap.dedent(SEARCH.format(small=dict(SMALL_SINUSOID))))
    shown = _in_a_terminal(script, cwd=tmp_path)
    assert "trial 0: mse " in shown and "trials" in shown
    (tmp_path / "autometa.db").unlink()
    assert "trial 0" not in _in_a_terminal(script, "off", cwd=tmp_path)



def test_a_trial_reports_each_phase_in_order() -> None:
    """The phases a display is sent, from a real tiny search: meta-train, each meta-val
    evaluation (steps 3 and 6), scoring on meta-test; the step count before each
    evaluation is the step it evaluates after."""
    import autometa
    from autometa.progress import Progress

    class Recorder(Progress):
        def __init__(self) -> None:
            self.seen: list[tuple[str, int | str]] = []

        def step(self, number: int, step: int) -> None:
            self.seen.append(("step", step))

        def trial_status(self, number: int, text: str, done: int | None = None,
                         total: int | None = None) -> None:
            self.seen.append(("phase", text))

    recorder = Recorder()
    autometa.search("sinusoid", algorithms=["maml"], sources=["mlp"], n_trials=1,
                    meta_steps=6, eval_every=3, initial="none", pruner="none",
                    baselines=False, task_params=SMALL_SINUSOID, progress=recorder)
    phases = [(kind, value) for kind, value in recorder.seen if kind == "phase"]
    assert phases == [("phase", "meta-train"), ("phase", "evaluating meta-val"),
                      ("phase", "meta-train"), ("phase", "evaluating meta-val"),
                      ("phase", "scoring on meta-test")]
    evaluations = [i for i, seen in enumerate(recorder.seen)
                   if seen == ("phase", "evaluating meta-val")]
    assert [recorder.seen[i - 1] for i in evaluations] == [("step", 3), ("step", 6)]
