"""How long a running trial and the whole search have left, from what the display saw.

Pure arithmetic on the times of the engine's events (no terminal): :class:`TrialEta` for
one trial's line (its phase, the meta-steps' rate measured in meta-training alone, its
evaluations' mean length), :class:`SearchEta` for the search (finished trials' wall times
÷ workers, counted down between events so that it never freezes). Times are seconds of
``clock`` (``time.monotonic`` by default; tests pass their own).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable

#: The phase a trial is in while it meta-trains (any other phase stops the steps' clock).
META_TRAIN = "meta-train"
#: The phase of a meta-val evaluation during (or at the end of) meta-training.
EVALUATING = "evaluating meta-val"
#: The phase after meta-training: no meta-step or evaluation is left to come.
SCORING = "scoring on meta-test"
#: How a baseline trial's description starts (the worker's ``trial_started``).
BASELINE = "baseline "

Clock = Callable[[], float]
#: Seconds of meta-training over which the meta-steps' rate is measured.
WINDOW = 30.0


def clock_text(seconds: float) -> str:
    """``h:mm:ss``, as rich's columns write times."""
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class TrialEta:
    """One running trial: its phase, since when, and the time left to its end.

    The meta-steps' rate is measured over the time spent in :data:`META_TRAIN` only, so
    that an evaluation does not slow it down; the time left adds the evaluations still to
    come, each as long as the mean one so far. With a ``time_limit`` (the search's
    ``trial_timeout``: seconds of meta-training) meta-training ends at whichever comes
    first, the last meta-step or the limit, and one more evaluation follows the cut.
    ``baseline``: a baseline trial (seconds long; the search's ETA keeps its cost apart).
    """

    def __init__(self, meta_steps: int, clock: Clock = time.monotonic,
                 time_limit: float | None = None, baseline: bool = False) -> None:
        self.meta_steps, self.clock = meta_steps, clock
        self.time_limit, self.baseline = time_limit, baseline
        self.started = clock()
        self.phase, self.phase_started = "starting", self.started
        self.done: int | None = None  # the phase's own units done, when it counts them
        self.total: int | None = None
        self.phase_done0, self.phase_at0 = 0, self.started  # where its rate is measured from
        self.step, self.step_at = 0, self.started
        self.train_s = 0.0  # seconds in META_TRAIN before the current stretch of it
        self.train_at_step = 0.0  # seconds in META_TRAIN when meta-step ``step`` ended
        self.samples: list[tuple[float, int]] = []  # (train_at_step, step), the last WINDOW s
        self.every: int | None = None  # meta-steps between evaluations (the first one's step)
        self.evals: list[float] = []  # seconds each finished meta-val evaluation took

    def enter(self, phase: str, done: int | None = None, total: int | None = None) -> bool:
        """The trial is in ``phase`` (with ``done`` of ``total`` units when it counts them);
        True if that is a new phase."""
        now = self.clock()
        new = phase != self.phase
        if new:
            if self.phase == META_TRAIN:
                self.train_s += now - self.phase_started
            elif self.phase == EVALUATING:
                self.evals.append(now - self.phase_started)
            self.phase, self.phase_started = phase, now
            self.phase_done0, self.phase_at0 = done or 0, now
        if done is not None and total is not None and (new or done < (self.done or 0)):
            self.phase_done0, self.phase_at0 = done, now  # a restart of its count
        self.done, self.total = done, total
        return new

    def stepped(self, step: int) -> None:
        """Meta-step ``step`` is done (the trial is meta-training)."""
        if self.phase != META_TRAIN:
            self.enter(META_TRAIN)
        self.step, self.step_at = step, self.clock()
        self.train_at_step = self.train_s + (self.step_at - self.phase_started)
        self.samples.append((self.train_at_step, step))
        while len(self.samples) > 2 and self.samples[1][0] < self.train_at_step - WINDOW:
            self.samples.pop(0)

    def per_step(self) -> float | None:
        """Seconds of meta-training per meta-step, over the last :data:`WINDOW` seconds of
        it (a neighbour that stops or starts changes it within a window)."""
        if len(self.samples) >= 2:
            (t0, s0), (t1, s1) = self.samples[0], self.samples[-1]
            if s1 > s0 and t1 > t0:
                return (t1 - t0) / (s1 - s0)
        return self.train_at_step / self.step if self.step > 0 else None

    def evaluated(self, step: int) -> None:
        """A meta-val evaluation after meta-step ``step`` is done."""
        if step and self.every is None:
            self.every = step
        self.step = max(self.step, step)

    def in_phase(self) -> float:
        """Seconds in the current phase."""
        return self.clock() - self.phase_started

    def phase_left(self) -> float | None:
        """Seconds left in a phase that counts its units, from its rate so far."""
        if self.done is None or not self.total:
            return None
        done = self.done - self.phase_done0
        spent = self.clock() - self.phase_at0
        if done <= 0 or spent <= 0:
            return None
        return (self.total - self.done) * spent / done

    def left(self) -> float | None:
        """Seconds left to the end of meta-training (the evaluations to come included);
        None until a meta-step has been timed."""
        now = self.clock()
        if self.phase == SCORING:  # meta-training and its evaluations are over
            return 0.0
        per_step = self.per_step() if self.train_at_step > 0 else None
        if per_step is None or per_step <= 0:
            return None
        remaining = max(0, self.meta_steps - self.step)
        steps = remaining * per_step
        since = now - max(self.step_at, self.phase_started) if self.phase == META_TRAIN else 0.0
        if self.phase == META_TRAIN:  # counted down between steps, down to one step less
            steps = max(steps - since, max(0, remaining - 1) * per_step)
        end = self.meta_steps  # the meta-step meta-training will end at
        if self.time_limit is not None and remaining:
            budget = max(0.0, self.time_limit - self.train_at_step - since)
            if budget < steps:  # the limit comes first: the step that reaches it is the last
                steps = budget
                end = min(self.meta_steps, self.step + math.ceil(budget / per_step))
        evals = 0.0
        if self.evals and self.every:
            every, mean = self.every, sum(self.evals) / len(self.evals)
            to_come = 0 if remaining == 0 else (end // every - self.step // every
                                                 + (1 if end % every else 0))
            evals = to_come * mean
            if self.phase == EVALUATING:  # the one under way (after meta-step ``step``)
                evals += max(0.0, mean - self.in_phase())
        return max(0.0, steps + evals)

    def expected(self) -> float | None:
        """This trial's whole wall time, as far as it can be told now (None: not yet)."""
        left = self.left()
        return None if left is None else self.clock() - self.started + left

    def text(self) -> str:
        """What the trial's line says of its phase and time: ``meta-train, eta 0:00:43``,
        ``evaluating meta-val 0:01:12``, ``pre-training conv4, eta 0:09:00``."""
        if self.phase == META_TRAIN:
            left = self.left()
            return f"{self.phase}, eta {clock_text(left)}" if left is not None else self.phase
        left = self.phase_left()
        if left is not None:
            return f"{self.phase}, eta {clock_text(left)}"
        return f"{self.phase} {clock_text(self.in_phase())}"


class SearchEta:
    """The time left to the whole search: the trials still to run times the mean wall
    time of the finished ones (complete, pruned or failed; stored ones first, as on a
    resume), divided among the workers; before any has finished, a running trial's own
    projection. Baseline trials (seconds each, run first) are kept apart: their times
    never stand for a searched trial's, so until one has finished or timed a meta-step
    the search's ETA is unknown ("eta after the first trial"). Capped by the time left to
    ``timeout``, past which no trial starts."""

    def __init__(self, remaining: int | None, workers: int, timeout: float | None,
                 costs: Iterable[float] = (), clock: Clock = time.monotonic) -> None:
        self.remaining, self.workers, self.clock = remaining, max(1, workers), clock
        self.deadline = None if timeout is None else clock() + timeout
        self.costs = [c for c in costs if c is not None and math.isfinite(c) and c >= 0]
        self.baseline_costs: list[float] = []
        self.running: dict[int, TrialEta] = {}

    def started(self, number: int, trial: TrialEta) -> None:
        self.running[number] = trial

    def finished(self, number: int, again: bool = False) -> None:
        """Trial ``number`` ended; ``again``: it was queued to run again (still owed, and
        its time so far is no trial's cost)."""
        trial = self.running.pop(number, None)
        if again:
            return
        if trial is not None:
            cost = self.clock() - trial.started
            (self.baseline_costs if trial.baseline else self.costs).append(cost)
        if self.remaining is not None:
            self.remaining = max(0, self.remaining - 1)

    def left(self) -> float | None:
        """Seconds left, or None when nothing tells yet."""
        now = self.clock()
        # Snapshots: a display's refresh thread asks while events change them.
        trials, costs = list(self.running.values()), list(self.costs)
        if costs:
            mean = sum(costs) / len(costs)
        else:
            guesses = [g for g in (t.expected() for t in trials if not t.baseline) if g]
            mean = max(guesses) if guesses else math.nan
        running = [max(0.0, (t.expected() or mean) - (now - t.started)) for t in trials]
        running = [r for r in running if math.isfinite(r)]
        if self.remaining is None:
            left = math.nan  # until the timeout
        else:
            queued = max(0, self.remaining - len(trials))
            left = (sum(running) + queued * mean) / self.workers
            if running:
                left = max(left, max(running))
        if self.deadline is not None:
            cap = max(self.deadline - now, max(running, default=0.0))
            left = cap if math.isnan(left) else min(left, cap)
        return None if math.isnan(left) else max(0.0, left)

    def text(self) -> str:
        left = self.left()
        return "eta after the first trial" if left is None else f"eta {clock_text(left)}"
