"""Progress display of a search: trial n of N, best score so far, steps of the running trial.

The engine talks to a :class:`Progress`; :class:`NullProgress` shows nothing (the default
from Python), :class:`RichProgress` draws bars on stderr (the CLI's default).
"""

from __future__ import annotations

from types import TracebackType
from typing import Any


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
                       metric: str, direction: str = "minimize", workers: int = 1) -> None:
        """``total`` trials to run (None: until timeout), ``done`` already in the study."""

    def trial_started(self, number: int, description: str, meta_steps: int,
                      device: str = "") -> None:
        """Trial ``number`` began on ``device`` with ``meta_steps`` of meta-training."""

    def step(self, number: int, step: int) -> None:
        """Trial ``number`` finished meta-step ``step`` (sent a few times a second at most)."""

    def evaluated(self, number: int, step: int, score: float) -> None:
        """Trial ``number`` scored ``score`` on meta-val after ``step`` meta-steps."""

    def trial_status(self, number: int, text: str) -> None:
        """Trial ``number`` is doing ``text`` (e.g. "scoring on meta-test")."""

    def trial_finished(self, number: int, state: str, value: float | None, note: str) -> None:
        """A trial ended (``state``: COMPLETE, PRUNED or FAIL; ``note`` says why if not)."""

    def phase(self, text: str) -> None:
        """The search entered a phase without trials (e.g. scoring the best on meta-test)."""

    def work(self, what: str, done: int, total: int) -> None:
        """Long work before the trials (a dataset's store being built): ``done`` of
        ``total`` units of ``what`` (:mod:`autometa.work`)."""

    def work_ended(self) -> None:
        """The work reported by :meth:`work` is over (finished or interrupted)."""


NullProgress = Progress


class LineProgress(Progress):
    """One plain line per finished trial and per phase on stdout (``--no-progress``: a log
    file or a CI job, where bars would be noise but minutes of silence are worse)."""

    def __init__(self) -> None:
        self.metric = "score"

    def search_started(self, total: int | None, done: int, timeout: float | None,
                       metric: str, direction: str = "minimize", workers: int = 1) -> None:
        self.metric = metric

    def trial_finished(self, number: int, state: str, value: float | None, note: str) -> None:
        result = f"{self.metric} {value:.4g}" if state == "COMPLETE" and value is not None \
            else state.lower()
        print(f"trial {number}: {result}{f' ({note})' if note else ''}", flush=True)

    def phase(self, text: str) -> None:
        print(text, flush=True)

    def work(self, what: str, done: int, total: int) -> None:
        # The start, each tenth and the end: a line per minute or so on a large dataset.
        tenth = 10 * done // max(1, total)
        if done == 0 or done >= total or tenth > getattr(self, "_tenth", 0):
            self._tenth = 0 if done >= total else tenth
            print(f"{what}: {done}/{total}", flush=True)


class RichProgress(Progress):
    """Bars on stderr: trials of the search (best so far, ETA), and one line per running
    trial with its device, meta-step and latest meta-val score."""

    def __init__(self) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )
        from rich.progress import Progress as Bars

        self.metric, self.direction = "score", "minimize"
        self.bars = Bars(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            TextColumn("{task.fields[info]}"),
            console=_stderr_console(),
            transient=False,
        )
        self._search: Any = None
        self._trials: dict[int, tuple[Any, str]] = {}  # number -> (bar, description)
        self.best: float | None = None
        self._work: Any = None  # the bar of long work before the trials (a store built)
        self._work_bar: Any = None

    def __enter__(self) -> RichProgress:
        self.bars.start()
        return self

    def work(self, what: str, done: int, total: int) -> None:
        if self._work is None:  # one bar, before the trials' display starts
            from rich.progress import Progress as Bars

            self._work = Bars(*self.bars.columns[:-1], console=self.bars.console)
            self._work.start()
            self._work_bar = self._work.add_task(what, total=total, info="")
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
                       metric: str, direction: str = "minimize", workers: int = 1) -> None:
        self.metric, self.direction = metric, direction
        limit = f" (stops after {timeout:g}s)" if timeout else ""
        pool = f", {workers} workers" if workers > 1 else ""
        self._search = self.bars.add_task(
            f"trials{pool}{limit}", total=None if total is None else total + done,
            completed=done, info="",
        )

    def trial_started(self, number: int, description: str, meta_steps: int,
                      device: str = "") -> None:
        where = f" on {device}" if device else ""
        bar = self.bars.add_task(f"  trial {number}{where}", total=meta_steps,
                                 info=description.split("(")[0])
        self._trials[number] = (bar, description)

    def step(self, number: int, step: int) -> None:
        if number in self._trials:
            self.bars.update(self._trials[number][0], completed=step)

    def evaluated(self, number: int, step: int, score: float) -> None:
        if number in self._trials:
            bar, description = self._trials[number]
            self.bars.update(bar, completed=step, info=f"{description.split('(')[0]}  "
                                                       f"meta-val {score:.4g}")

    def trial_status(self, number: int, text: str) -> None:
        if number in self._trials:
            bar, description = self._trials[number]
            self.bars.update(bar, info=f"{description.split('(')[0]}  {text}")

    def trial_finished(self, number: int, state: str, value: float | None, note: str) -> None:
        from rich.text import Text

        bar, description = self._trials.pop(number, (None, ""))
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
        search = next((t for t in self.bars.tasks if t.id == self._search), None)
        total = None if search is None else search.total
        if search is not None and total is not None and search.completed + 1 > total:
            # A trial beyond the count (a completion trial, queued once the budget is
            # spent): the count grows, rather than showing 13/12.
            total = search.completed + 1
        self.bars.update(self._search, total=total, advance=1, info=best)

    def phase(self, text: str) -> None:
        from rich.text import Text

        self.bars.console.print(Text(text), highlight=False)


def _stderr_console() -> Any:
    """stderr; not folded at 80 columns when it is a pipe or a log file."""
    from rich.console import Console

    console = Console(stderr=True)
    return console if console.is_terminal else Console(stderr=True, width=200)
