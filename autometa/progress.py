"""Progress display of a search: trial n of N, best score so far, steps of the running trial.

The engine talks to a :class:`Progress`; :class:`NullProgress` shows nothing (the default
from Python), :class:`RichProgress` draws bars on stderr (the CLI's default).
"""

from __future__ import annotations

from types import TracebackType
from typing import Any


class Progress:
    """Callbacks of the engine; every method is optional to override."""

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        return None

    def search_started(
        self, total: int | None, done: int, timeout: float | None, metric: str
    ) -> None:
        """``total`` trials to run (None: until timeout), ``done`` already in the study."""

    def trial_started(self, number: int, description: str, meta_steps: int) -> None:
        """A trial began with ``meta_steps`` of meta-training."""

    def step(self, step: int) -> None:
        """The running trial finished meta-step ``step``."""

    def trial_finished(
        self, number: int, state: str, value: float | None, best: float | None, note: str
    ) -> None:
        """A trial ended (``state``: COMPLETE, PRUNED or FAIL; ``note`` says why if not)."""


NullProgress = Progress


class RichProgress(Progress):
    """Two bars on stderr: trials of the search, meta-steps of the running trial."""

    def __init__(self) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            TextColumn,
            TimeElapsedColumn,
        )
        from rich.progress import Progress as Bars

        self.metric = "score"
        self.bars = Bars(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.fields[info]}"),
            console=_stderr_console(),
            transient=False,
        )
        self._search: Any = None
        self._trial: Any = None
        self._description = ""

    def __enter__(self) -> RichProgress:
        self.bars.start()
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.bars.stop()

    def search_started(
        self, total: int | None, done: int, timeout: float | None, metric: str
    ) -> None:
        self.metric = metric
        limit = f" (stops after {timeout:g}s)" if timeout else ""
        self._search = self.bars.add_task(
            f"trials{limit}", total=None if total is None else total + done,
            completed=done, info="",
        )

    def trial_started(self, number: int, description: str, meta_steps: int) -> None:
        if self._trial is not None:
            self.bars.remove_task(self._trial)
        self._description = description
        self._trial = self.bars.add_task(f"trial {number}", total=meta_steps,
                                         info=description.split("(")[0])

    def step(self, step: int) -> None:
        self.bars.update(self._trial, completed=step)

    def trial_finished(
        self, number: int, state: str, value: float | None, best: float | None, note: str
    ) -> None:
        from rich.text import Text

        result = f"{self.metric} {value:.4g}" if state == "COMPLETE" and value is not None \
            else state.lower()
        line = f"trial {number}: {result}{f' ({note})' if note else ''}  {self._description}"
        self.bars.console.print(Text(line), highlight=False)
        best_text = f"best {self.metric} {best:.4g}" if best is not None else "no result yet"
        self.bars.update(self._search, advance=1, info=best_text)


def _stderr_console() -> Any:
    """stderr; not folded at 80 columns when it is a pipe or a log file."""
    from rich.console import Console

    console = Console(stderr=True)
    return console if console.is_terminal else Console(stderr=True, width=200)
