"""Progress display of a search: trial n of N, best score so far, each running trial's
phase (pre-training, meta-train, evaluating meta-val, scoring on meta-test) and the time
left to it and to the search (:mod:`autometa.eta`).

The engine talks to a :class:`Progress`; :class:`NullProgress` shows nothing,
:class:`RichProgress` draws bars on stderr (the CLI's default, and ``autometa.search``'s in
a terminal or a notebook), :class:`LineProgress` prints plain lines (``--no-progress``).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from types import TracebackType
from typing import Any

from autometa.eta import (
    BASELINE,
    EVALUATING,
    META_TRAIN,
    Clock,
    SearchEta,
    TrialEta,
    clock_text,
)


class Progress:
    """Callbacks of the engine; every method is optional to override.

    Several trials may run at once (a pool of workers): every per-trial call names its
    trial ``number``.
    """

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        return None

    def search_started(self, total: int | None, done: int, timeout: float | None,
                       metric: str, direction: str = "minimize", workers: int = 1,
                       costs: Sequence[float] = (), trial_timeout: float | None = None
                       ) -> None:
        """``total`` trials to run (None: until timeout), ``done`` already in the study;
        ``costs``: the wall seconds of the study's finished searched trials (a resume's
        ETA); ``trial_timeout``: each trial's seconds of meta-training at most."""

    def trial_started(self, number: int, description: str, meta_steps: int,
                      device: str = "") -> None:
        """Trial ``number`` began on ``device`` with ``meta_steps`` of meta-training."""

    def step(self, number: int, step: int) -> None:
        """Trial ``number`` finished meta-step ``step`` (sent a few times a second at most)."""

    def evaluated(self, number: int, step: int, score: float) -> None:
        """Trial ``number`` scored ``score`` on meta-val after ``step`` meta-steps."""

    def trial_status(self, number: int, text: str, done: int | None = None,
                     total: int | None = None) -> None:
        """Trial ``number`` entered phase ``text`` ("meta-train", "evaluating meta-val",
        "scoring on meta-test"), or reports ``done`` of ``total`` units of it (a source's
        "pre-training ...", through :func:`autometa.work.report` inside the trial)."""

    def trial_finished(self, number: int, state: str, value: float | None, note: str,
                       again: bool = False) -> None:
        """A trial ended (``state``: COMPLETE, PRUNED or FAIL; ``note`` says why if not);
        ``again``: it was queued to run again (its process died, the storage was away), so
        the search still owes it."""

    def phase(self, text: str) -> None:
        """The search entered a phase without trials (e.g. scoring the best on meta-test)."""

    def work(self, what: str, done: int, total: int) -> None:
        """Long work before the trials (a dataset's store being built): ``done`` of
        ``total`` units of ``what`` (:mod:`autometa.work`)."""

    def work_ended(self) -> None:
        """The work reported by :meth:`work` is over (finished or interrupted)."""


NullProgress = Progress


class LineProgress(Progress):
    """Plain lines on stdout (``--no-progress``: a log file or a CI job, where bars would be
    noise but minutes of silence are worse): a line when a trial starts (with its
    hyperparameters) and ends (with the search's ETA), and, sparingly, its phases: one
    that counts its units (pre-training) at its start, every tenth and its end; any other
    when the trial's last line is :attr:`LONG` seconds old; its meta-step and ETA after
    :attr:`LONG` seconds of silence the first time, then every :attr:`QUIET` seconds."""

    #: Seconds since a trial's last line after which a change of phase gets a line.
    LONG = 30.0
    #: Seconds of silence after which a meta-training trial says where it is (again).
    QUIET = 120.0

    def __init__(self, clock: Clock = time.monotonic) -> None:
        self.metric, self.clock = "score", clock
        self.search = SearchEta(None, 1, None, clock=clock)
        self.trial_timeout: float | None = None
        self._trials: dict[int, TrialEta] = {}
        self._said: dict[int, float] = {}  # trial -> when its last line was printed
        self._tenth: dict[int, int] = {}
        self._paced: set[int] = set()  # trials whose meta-steps' pace was said

    def _say(self, number: int | None, text: str) -> None:
        print(text, flush=True)
        if number is not None:
            self._said[number] = self.clock()

    def search_started(self, total: int | None, done: int, timeout: float | None,
                       metric: str, direction: str = "minimize", workers: int = 1,
                       costs: Sequence[float] = (), trial_timeout: float | None = None
                       ) -> None:
        self.trial_timeout = trial_timeout
        self.metric = metric
        self.search = SearchEta(total, workers, timeout, costs, self.clock)
        if done:  # with the stored trials' costs, the ETA is known at once
            left = self.search.left()
            self._say(None, f"{_resuming(done, total)}"
                            f"{f'; eta {clock_text(left)}' if left is not None else ''}")

    def trial_started(self, number: int, description: str, meta_steps: int,
                      device: str = "") -> None:
        self._trials[number] = TrialEta(meta_steps, self.clock, self.trial_timeout,
                                        description.startswith(BASELINE))
        self.search.started(number, self._trials[number])
        where = f" on {device}" if device else ""
        self._say(number, f"trial {number} started{where}: {description}")

    def step(self, number: int, step: int) -> None:
        trial = self._trials.get(number)
        if trial is None:
            return
        trial.stepped(step)
        # The first ETA once it means something, then one line per QUIET seconds.
        wait = self.QUIET if number in self._paced else self.LONG
        if self.clock() - self._said.get(number, 0.0) >= wait:
            self._paced.add(number)
            self._say(number, f"trial {number}: meta-step {step}/{trial.meta_steps}, "
                              f"{trial.text()}")

    def evaluated(self, number: int, step: int, score: float) -> None:
        if number in self._trials:
            self._trials[number].evaluated(step)

    def trial_status(self, number: int, text: str, done: int | None = None,
                     total: int | None = None) -> None:
        trial = self._trials.get(number)
        if trial is None:
            return
        new = trial.enter(text, done, total)
        quiet = self.clock() - self._said.get(number, 0.0) >= self.LONG
        if done is not None and total:
            tenth = 10 * done // total
            if new or done >= total or (tenth > self._tenth.get(number, 0) and quiet):
                self._tenth[number] = tenth
                left = trial.phase_left()
                eta = f", eta {clock_text(left)}" if left is not None and done < total else ""
                self._say(number, f"trial {number}: {text} {done}/{total}{eta}")
        elif new and (quiet or text not in (META_TRAIN, EVALUATING)):
            at = f" after meta-step {trial.step}/{trial.meta_steps}" if trial.step else ""
            self._say(number, f"trial {number}: {text}{at}")

    def trial_finished(self, number: int, state: str, value: float | None, note: str,
                       again: bool = False) -> None:
        trial = self._trials.pop(number, None)
        self._said.pop(number, None)
        self._tenth.pop(number, None)
        self._paced.discard(number)
        took = "" if trial is None else f" in {clock_text(self.clock() - trial.started)}"
        self.search.finished(number, again)
        result = f"{self.metric} {value:.4g}" if state == "COMPLETE" and value is not None \
            else state.lower()
        print(f"trial {number}: {result}{f' ({note})' if note else ''}{took}; search "
              f"{self.search.text()}", flush=True)

    def phase(self, text: str) -> None:
        print(text, flush=True)

    def work(self, what: str, done: int, total: int) -> None:
        # The start, each tenth and the end: a line per minute or so on a large dataset.
        tenth = 10 * done // max(1, total)
        if done == 0 or done >= total or tenth > getattr(self, "_work_tenth", 0):
            self._work_tenth = 0 if done >= total else tenth
            print(f"{what}: {done}/{total}", flush=True)


class RichProgress(Progress):
    """Bars on stderr: trials of the search (best so far, ETA from finished trials' costs),
    and one line per running trial with its device, phase, the time left to it, and its
    latest meta-val score.

    Args:
        console: where to draw (default: stderr, see :func:`_stderr_console`).
        clock: seconds, for elapsed times and ETAs (tests pass their own).
    """

    def __init__(self, console: Any = None, clock: Clock = time.monotonic) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
        from rich.progress import Progress as Bars
        from rich.table import Column

        self.metric, self.direction, self.clock = "score", "minimize", clock
        self.bars = Bars(
            TextColumn("{task.description}"),
            BarColumn(bar_width=12),  # room for the phase and the ETA in 80 columns
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            _live_column(),
            TextColumn("{task.fields[info]}",
                       table_column=Column(no_wrap=True, overflow="ellipsis", max_width=22)),
            console=console if console is not None else _stderr_console(),
            transient=False,
            get_time=clock,
        )
        self._search: Any = None
        self._note = ""  # workers, time limit
        self.search = SearchEta(None, 1, None, clock=clock)
        self.trial_timeout: float | None = None
        # number -> (bar, description, its ETA)
        self._trials: dict[int, tuple[Any, str, TrialEta]] = {}
        self._scores: dict[int, str] = {}  # number -> "meta-val 0.1234"
        self.best: float | None = None
        self._work: Any = None  # the bar of long work before the trials (a store built)
        self._work_bar: Any = None

    def __enter__(self) -> RichProgress:
        self.bars.start()
        return self

    def work(self, what: str, done: int, total: int) -> None:
        if self._work is None:  # one bar, before the trials' display starts
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )
            from rich.progress import Progress as Bars

            self._work = Bars(TextColumn("{task.description}"), BarColumn(),
                              MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("eta"),
                              TimeRemainingColumn(), console=self.bars.console,
                              get_time=self.clock)
            self._work.start()
            self._work_bar = self._work.add_task(what, total=total)
        self._work.update(self._work_bar, completed=done, description=what)
        if done >= total:
            self.work_ended()

    def work_ended(self) -> None:
        if self._work is not None:
            self._work.stop()
            self._work = None

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.bars.stop()

    def search_started(self, total: int | None, done: int, timeout: float | None,
                       metric: str, direction: str = "minimize", workers: int = 1,
                       costs: Sequence[float] = (), trial_timeout: float | None = None
                       ) -> None:
        self.trial_timeout = trial_timeout
        from rich.text import Text

        self.metric, self.direction = metric, direction
        self.search = SearchEta(total, workers, timeout, costs, self.clock)
        if done:  # with the stored trials' costs, the ETA is known at once
            left = self.search.left()
            eta = f"; eta {clock_text(left)}" if left is not None else ""
            self.bars.console.print(Text(f"{_resuming(done, total)}{eta}"))
        # Beside the bar, not in its name: a long name would widen every trial's line.
        self._note = ", ".join(([f"{workers} workers"] if workers > 1 else [])
                               + ([f"stops after {timeout:g}s"] if timeout else []))
        self._search = self.bars.add_task(
            "trials", total=None if total is None else total + done,
            completed=done, info=self._note, live=self.search.text,
        )

    def trial_started(self, number: int, description: str, meta_steps: int,
                      device: str = "") -> None:
        where = f" on {device}" if device else ""
        eta = TrialEta(meta_steps, self.clock, self.trial_timeout,
                       description.startswith(BASELINE))
        self.search.started(number, eta)
        bar = self.bars.add_task(f"  trial {number}{where}", total=meta_steps,
                                 info=description.split("(")[0], live=eta.text)
        self._trials[number] = (bar, description, eta)

    def step(self, number: int, step: int) -> None:
        if number in self._trials:
            bar, _, eta = self._trials[number]
            eta.stepped(step)
            self.bars.update(bar, completed=step, total=eta.meta_steps)

    def evaluated(self, number: int, step: int, score: float) -> None:
        if number in self._trials:
            bar, description, eta = self._trials[number]
            eta.evaluated(step)
            self._scores[number] = f"meta-val {score:.4g}"
            self.bars.update(bar, completed=step, info=self._info(number, description))

    def trial_status(self, number: int, text: str, done: int | None = None,
                     total: int | None = None) -> None:
        if number in self._trials:
            bar, description, eta = self._trials[number]
            eta.enter(text, done, total)
            if done is not None and total:  # the bar counts the phase's own units
                self.bars.update(bar, completed=done, total=total)
            else:  # back to the meta-steps
                self.bars.update(bar, completed=eta.step, total=eta.meta_steps)

    def _info(self, number: int, description: str) -> str:
        score = self._scores.get(number)
        return description.split("(")[0] + (f"  {score}" if score else "")

    def trial_finished(self, number: int, state: str, value: float | None, note: str,
                       again: bool = False) -> None:
        from rich.text import Text

        bar, description, _ = self._trials.pop(number, (None, "", None))
        self._scores.pop(number, None)
        self.search.finished(number, again)
        if bar is not None:
            self.bars.remove_task(bar)
        if state == "COMPLETE" and value is not None and (
                self.best is None or (value < self.best if self.direction == "minimize"
                                      else value > self.best)):
            self.best = value
        result = f"{self.metric} {value:.4g}" if state == "COMPLETE" and value is not None \
            else state.lower()
        line = f"trial {number}: {result}{f' ({note})' if note else ''}  {description}"
        self.bars.console.print(Text(line), highlight=False)
        best = f"best {self.metric} {self.best:.4g}" if self.best is not None else "no result yet"
        best += f"; {self._note}" if self._note else ""
        search = next((t for t in self.bars.tasks if t.id == self._search), None)
        total = None if search is None else search.total
        if search is not None and total is not None and search.completed + 1 > total:
            # A trial beyond the count (a completion trial, queued once the budget is
            # spent): the count grows, rather than showing 13/12.
            total = search.completed + 1
        self.bars.update(self._search, total=total, advance=0 if again else 1, info=best)

    def phase(self, text: str) -> None:
        from rich.text import Text

        self.bars.console.print(Text(text), highlight=False)


def _resuming(done: int, total: int | None) -> str:
    return f"resuming: {done} of {done + total} done" if total is not None \
        else f"resuming: {done} done"


def _live_column() -> Any:
    from rich.progress import ProgressColumn
    from rich.text import Text

    class Live(ProgressColumn):
        """A bar's ``live`` field, a function called at each refresh: a phase's elapsed
        time and ETAs move between the engine's events, never frozen."""

        def __init__(self) -> None:
            from rich.table import Column

            super().__init__(table_column=Column(no_wrap=True, overflow="ellipsis"))

        def render(self, task: Any) -> Text:
            live = task.fields.get("live")
            try:
                return Text(live() if live is not None else "")
            except Exception:  # a display never stops a search (nor rich's refresh thread)
                return Text("")

    return Live()



def _stderr_console() -> Any:
    """stderr; not folded at 80 columns when it is a pipe or a log file."""
    from rich.console import Console

    console = Console(stderr=True)
    return console if console.is_terminal else Console(stderr=True, width=200)
