"""One trial: build the source model for the task, meta-train it with the algorithm,
score it on meta-val episodes along the way and on meta-test at the end; and a stored
trial rebuilt with the state it saved (:func:`restore`).

What a stored trial holds (its plan, seed, rank, scores) is :mod:`autometa.study.trials`;
where its state is kept, :mod:`autometa.study.artifacts`."""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from autometa.algorithm import MetaAlgorithm
from autometa.errors import PluginError
from autometa.feature_store import embedded, note_source
from autometa.plugins import PluginHost
from autometa.precision import DEFAULT_PRECISION, autocast
from autometa.study.artifacts import download_state, load_state, open_store
from autometa.study.build import trial_defaults
from autometa.study.inputs import localize
from autometa.study.settings import search_seed
from autometa.study.trials import MetaTestScore, TrialPlan, trial_seed
from autometa.task import Episodes, EpisodeSet, IndexedEpisodes, MixedEpisodes, Task

#: Episodes evaluated at once, at most; bounds memory on large meta-val/meta-test sets.
EVAL_CHUNK = 200
#: Bytes of inputs evaluated at once, at most (one episode at least): 200 episodes of 80
#: images at 84 px would be 1.3 GB of float32, and an image task's episodes are gathered
#: from its store a chunk at a time.
EVAL_BYTES = 64 << 20


def eval_chunk(episodes: Episodes | IndexedEpisodes, task: Task) -> int:
    """Episodes of ``episodes`` (of one size) scored at once: :data:`EVAL_CHUNK`, fewer if
    their inputs would pass :data:`EVAL_BYTES` as float32."""
    shape = (episodes.support_x.shape[2:] if isinstance(episodes, Episodes)
             else tuple(getattr(task, "input_shape", ())))
    per_example = 4 * math.prod(shape)
    examples = episodes.support_y.shape[1] + episodes.query_y.shape[1]
    return max(1, min(EVAL_CHUNK, EVAL_BYTES // max(1, per_example * examples)))


class Diverged(Exception):
    """The meta-training loss, or predictions or scores on evaluation episodes, became NaN
    or infinite; the message names where."""


def build(host: PluginHost, task: Task, plan: TrialPlan, seed: int,
          root: Path | None = None) -> MetaAlgorithm:
    """Configure the task for the plan, instantiate the source model's network on the
    task's device and wrap it in the algorithm.

    The task gets the plan's per-trial settings (:meth:`~autometa.task.Task.configure_trial`;
    a setting the plan lacks, as in a trial stored before the task declared it, at its
    default). Relative input paths among the settings (a checkpoint's ``path``) resolve
    against ``root`` (None: the working directory).
    """
    defaults = trial_defaults(task)
    task.configure_trial(**{**defaults, **plan.task_params})
    source_cls = host.get("source", plan.source).load()
    algorithm_cls = host.get("algorithm", plan.algorithm).load()
    torch.manual_seed(seed)  # network initialisation
    try:
        source = source_cls(**localize(source_cls, plan.source_params, root))
        source.prepare(task)
        model = source.build(task.spec).to(task.device)
        note_source(model, plan.source, plan.source_params)  # keys its stored features
        return algorithm_cls(model, task, **localize(algorithm_cls, plan.algorithm_params,
                                                     root))
    except TypeError as exc:
        raise PluginError(f"cannot build {plan.describe(defaults)}: {exc}") from exc


def scored_per_example(episodes: EpisodeSet, task: Task) -> bool:
    """True if :func:`evaluate` scores ``episodes`` per query example, not per episode.

    A split that is one episode (a target dataset's val or test split) has no spread over
    episodes; its examples' scores have the same mean and give a confidence interval.
    """
    return len(episodes) == 1 and task.metric.per_example is not None


def evaluate(algorithm: MetaAlgorithm, episodes: EpisodeSet, task: Task, *,
             split: str | None = None) -> Tensor:
    """Scores of the adapted model on ``episodes``: (tasks,), or (n_query,) for one episode.

    The mean is the split's score either way (see :func:`scored_per_example`). Episodes
    are scored a chunk at a time (:func:`eval_chunk`), one chunk in memory at once; a
    :class:`~autometa.task.MixedEpisodes` set (episodes of differing sizes), one size at a
    time, its scores put back in episode order (per-domain scores stay aligned). A frozen
    feature algorithm on episodes held as indices gets each chunk with the network's
    stored features (:mod:`autometa.feature_store`: computed once, shared by trials).

    Args:
        split: the name of ``episodes`` in messages ("meta-val", "meta-test"); by default
            found by identity among the task's splits.

    Raises:
        Diverged: a prediction or a score is NaN or infinite (argmax would silently rank
            NaN logits as class 0), or the algorithm raised ``FloatingPointError`` on
            numbers it cannot use (e.g. non-finite features).
    """
    algorithm.model.eval()
    scores: list[Tensor] = []
    numbers: list[Tensor] = []  # the episode numbers of each chunk's scores
    try:
        attach = embedded(algorithm, episodes, task)
        for ids in _chunks(episodes, task):
            chunk = episodes[ids]
            assert isinstance(chunk, Episodes)  # one size per chunk
            if attach is not None:
                chunk = attach(chunk, ids)
            try:
                pred = algorithm.adapt_and_predict(chunk)  # (chunk, n_query, out)
            except FloatingPointError as exc:
                raise Diverged(f"{_split(split, episodes, task)}: {exc}") from exc
            _check_shape(algorithm, pred, (len(chunk), chunk.query_x.shape[1],
                                           task.output_size))
            pred = pred.detach()
            first = ids.start if isinstance(ids, slice) else ids
            _check_finite(pred, first, "predictions", "episodes", split, episodes, task)
            if scored_per_example(episodes, task):
                assert task.metric.per_example is not None
                score = task.metric.per_example(pred, chunk.query_y)[0]  # (n_query,)
                unit = "examples"
            else:
                score = task.metric(pred, chunk.query_y)  # (chunk,)
                unit = "episodes"
            _check_finite(score, first, f"{task.metric.name} scores", unit, split, episodes,
                          task)
            scores.append(score)
            if isinstance(ids, Tensor):
                numbers.append(ids)
            # Freed before the next chunk is gathered, not after: one chunk in memory at once.
            del chunk, pred
    finally:
        algorithm.model.train()
    out = torch.cat(scores)
    if numbers and not scored_per_example(episodes, task):  # back in episode order
        out = out[torch.argsort(torch.cat(numbers)).to(out.device)]
    return out


def _chunks(episodes: EpisodeSet, task: Task) -> list[slice] | list[Tensor]:
    """What :func:`evaluate` scores at once: slices of a set of equal-sized episodes, or
    the episode numbers of one size of a mixed set, in chunks (:func:`eval_chunk` each)."""
    if not isinstance(episodes, MixedEpisodes):
        size = eval_chunk(episodes, task)
        return [slice(start, start + size) for start in range(0, len(episodes), size)]
    out = []
    for ids in episodes.by_size():
        # The group of the size's first episode: its index shapes size the chunks (no
        # image is gathered to learn them).
        size = eval_chunk(episodes.groups[int(episodes.group[ids[0]])], task)
        out += [ids[start : start + size] for start in range(0, len(ids), size)]
    return out


def _check_shape(algorithm: MetaAlgorithm, pred: Any, expected: tuple[int, int, int]) -> None:
    """Raise :class:`PluginError` unless ``pred`` is a tensor of shape ``expected``: a wrong
    shape can broadcast against the targets and be scored (even ranked) silently."""
    if isinstance(pred, Tensor) and tuple(pred.shape) == expected:
        return
    got = f"shape {tuple(pred.shape)}" if isinstance(pred, Tensor) else type(pred).__name__
    cls = type(algorithm)
    raise PluginError(f"{cls.__module__}.{cls.__qualname__}.adapt_and_predict returned {got}; "
                      f"expected {expected}: (episodes, queries, the task's output_size); "
                      "autometa.testing.check_meta_algorithm checks it")


def _check_finite(values: Tensor, first_index: int | Tensor, what: str, unit: str,
                  split: str | None, episodes: EpisodeSet, task: Task) -> None:
    """Raise :class:`Diverged` naming the split, what and where, unless all are finite.

    ``values`` has one row per episode (or per example, ``unit``), the first numbered
    ``first_index``, or each row's episode number in ``first_index`` (a tensor).
    """
    bad = ~torch.isfinite(values)
    if not bool(bad.any()):
        return
    rows = bad.reshape(len(values), -1).any(1).nonzero().flatten()
    kinds = " and ".join(k for k, m in (("NaN", values.isnan()), ("inf", values.isinf()))
                         if bool(m.any()))
    raise Diverged(f"{_split(split, episodes, task)} {what} are not finite ({kinds}) in "
                   f"{len(rows)} {unit}, the first being {unit.rstrip('s')} "
                   f"{_number(first_index, int(rows[0]), unit)}")


def _number(first: int | Tensor, row: int, unit: str) -> int:
    """The number of row ``row`` of a chunk whose rows are numbered from ``first`` (or
    numbered by the episode numbers ``first``; a one-episode chunk's examples from 0)."""
    if isinstance(first, int):
        return first + row
    return int(first[row]) if unit == "episodes" else row


def _split(split: str | None, episodes: EpisodeSet, task: Task) -> str:
    """The split's name for a message (looked up only when one is needed)."""
    if split is not None:
        return split
    if episodes is task.meta_val():
        return "meta-val"
    if episodes is task.meta_test():
        return "meta-test"
    return "evaluation"


@dataclass
class Clock:
    """Wall time of a trial's parts (what AutoGluon users know as ``fit_time`` and
    ``pred_time``), filled by :func:`meta_train`.

    Attributes:
        train_s: seconds spent in meta-steps (sampling episodes included, meta-val
            evaluations excluded).
        eval_s: seconds spent adapting to and predicting meta-val episodes.
        eval_episodes: meta-val episodes evaluated (each evaluation counts them again).
        steps: meta-steps run (fewer than the budget when the trial was pruned or
            stopped at its time limit).
        timed_out: meta-training stopped at ``time_limit`` (:func:`meta_train`) before
            the last of its meta-steps; set before that step's evaluation.
    """

    train_s: float = 0.0
    eval_s: float = 0.0
    eval_episodes: int = 0
    steps: int = 0
    timed_out: bool = False

    @property
    def adapt_ms(self) -> float:
        """Milliseconds to adapt to one episode and predict its query set (NaN if none)."""
        return 1000 * self.eval_s / self.eval_episodes if self.eval_episodes else math.nan


def meta_train(
    algorithm: MetaAlgorithm,
    task: Task,
    *,
    meta_steps: int,
    eval_every: int,
    generator: torch.Generator,
    on_eval: Callable[[int, float], None] = lambda step, score: None,
    on_step: Callable[[int], None] = lambda step: None,
    clock: Clock | None = None,
    final_score: Callable[[MetaAlgorithm], float] | None = None,
    on_final_scores: Callable[[Tensor], None] = lambda scores: None,
    time_limit: float | None = None,
    on_phase: Callable[[str], None] = lambda phase: None,
) -> float:
    """Meta-train for ``meta_steps``, or until ``time_limit`` seconds of meta-training,
    and return the final meta-val score.

    ``on_eval(step, score)`` runs after each evaluation (every ``eval_every`` steps and at
    the end); it may raise ``optuna.TrialPruned`` to stop the trial. ``clock``, if given,
    accumulates the time spent training and evaluating. ``final_score``, if given, scores
    the last evaluation instead of the plain meta-val mean (:func:`paired_val_score`);
    otherwise ``on_final_scores`` gets the last evaluation's scores, shape (episodes,) in
    episode order, or (examples,) for a task scored per example (before ``on_eval``).
    ``on_phase(name)`` is told ``"meta-train"`` when meta-steps start (again) and
    ``"evaluating meta-val"`` before each evaluation (a display shows what it waits for).

    ``time_limit`` counts seconds as ``clock.train_s`` does (meta-val evaluations
    excluded) and is checked after each meta-step: the step that reaches it is the last,
    its evaluation the final one (``final_score`` and ``on_final_scores`` as above), and
    ``clock.timed_out`` is set before that evaluation. None: no limit.

    Raises:
        Diverged: the training loss, a meta-val prediction or a score is not finite.
    """
    clock = clock if clock is not None else Clock()
    algorithm.model.train()
    steps = meta_steps if algorithm.meta_trains else 0
    score = math.nan
    started = time.perf_counter()
    if steps:
        on_phase("meta-train")
    for step in range(1, steps + 1):
        loss = algorithm.meta_step(task.sample(algorithm.tasks_per_step, generator))
        if not math.isfinite(loss):
            raise Diverged(f"meta-training loss is {loss} at step {step}")
        clock.steps = step
        on_step(step)
        cut = time_limit is not None and step < steps \
            and clock.train_s + time.perf_counter() - started >= time_limit
        if step % eval_every == 0 or step == steps or cut:
            clock.train_s += time.perf_counter() - started
            clock.timed_out = cut
            last = step == steps or cut
            on_phase("evaluating meta-val")
            score = _val_score(algorithm, task, clock, final_score if last else None,
                               on_final_scores if last else None)
            started = time.perf_counter()
            on_eval(step, score)
            if cut:
                break
            if not last:
                on_phase("meta-train")
    clock.train_s += time.perf_counter() - started
    if steps == 0:
        on_phase("evaluating meta-val")
        score = _val_score(algorithm, task, clock, final_score, on_final_scores)
        on_eval(0, score)
    return score


def _val_score(algorithm: MetaAlgorithm, task: Task, clock: Clock,
               score_with: Callable[[MetaAlgorithm], float] | None = None,
               on_scores: Callable[[Tensor], None] | None = None) -> float:
    _sync(task.device)
    started = time.perf_counter()
    episodes = task.meta_val()
    try:
        if score_with is not None:
            score = score_with(algorithm)
        else:  # .mean() synchronises
            scores = evaluate(algorithm, episodes, task, split="meta-val")
            score = float(scores.mean())
            if on_scores is not None and math.isfinite(score):
                on_scores(scores)
    finally:
        clock.eval_s += time.perf_counter() - started
        clock.eval_episodes += len(episodes)
    if not math.isfinite(score):
        raise Diverged(f"meta-val {task.metric.name} is {score}")
    return score


class EvaluationPruned(Exception):
    """The pruner stopped a trial part-way through its final meta-val evaluation.

    Attributes:
        mean: the mean score of the episodes evaluated so far (Optuna's advice for the
            Wilcoxon pruner: the trial returns it, so that the sampler learns from it).
        evaluated: how many of the ``total`` meta-val episodes were scored.
    """

    def __init__(self, mean: float, evaluated: int, total: int) -> None:
        super().__init__(f"wilcoxon: stopped after {evaluated} of {total} meta-val "
                         "episodes, worse than the best trial (paired signed-rank test)")
        self.mean, self.evaluated, self.total = mean, evaluated, total


def paired_val_score(algorithm: MetaAlgorithm, task: Task, *, generator: torch.Generator,
                     report: Callable[[int, float], None], should_stop: Callable[[], bool],
                     chunk: int = 10) -> float:
    """The meta-val mean, episode by episode in a shuffled order, for a paired pruner.

    Each episode's score is passed to ``report(episode_index, score)`` (its fixed index in
    ``task.meta_val()``, so that trials pair up); after each ``chunk`` of episodes,
    ``should_stop()`` returning True stops the evaluation. The order is a permutation drawn from
    ``generator`` (per trial: no trial overfits the first episodes), as Optuna's
    WilcoxonPruner recommends.

    Raises:
        EvaluationPruned: ``report`` asked to stop; carries the running mean.
        Diverged: a prediction or score is not finite.
    """
    episodes = task.meta_val()
    n = len(episodes)
    order = torch.randperm(n, generator=generator, device="cpu")
    # In episode order at the end, so that the mean is summed as the plain evaluation's is.
    scores: Tensor | None = None
    for start in range(0, n, chunk):
        ids = order[start : start + chunk]
        # Of a mixed set (episodes of differing sizes), a selection of several sizes is
        # itself mixed: evaluate scores it size by size, in the order of ``ids``.
        got = evaluate(algorithm, _part(episodes, ids), task, split="meta-val")
        if scores is None:
            scores = torch.empty(n, device=got.device)
        ids = ids.to(scores.device)
        scores[ids] = got
        for index, score in zip(ids.tolist(), scores[ids].tolist(), strict=True):
            report(index, score)
        seen = start + len(ids)
        if seen < n and should_stop():
            done = order[:seen].to(scores.device)
            raise EvaluationPruned(float(scores[done].mean()), seen, n)
    assert scores is not None
    return float(scores.mean())


def _part(episodes: EpisodeSet, ids: Tensor) -> EpisodeSet:
    """Episodes ``ids`` of ``episodes``, still as indices where they are (so that a frozen
    network's stored features serve them too)."""
    if isinstance(episodes, IndexedEpisodes):
        return MixedEpisodes([episodes], torch.zeros(len(ids), dtype=torch.long), ids)
    if isinstance(episodes, MixedEpisodes):
        return MixedEpisodes(episodes.groups, episodes.group[ids], episodes.position[ids])
    return episodes[ids]


def _sync(device: torch.device) -> None:
    """Wait for queued CUDA work, so that a timer started next measures only what follows."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def score_meta_test(algorithm: MetaAlgorithm, task: Task, *,
                    precision: str = DEFAULT_PRECISION) -> MetaTestScore:
    """Score ``algorithm`` (meta-trained) on the task's meta-test episodes, in
    ``precision`` (the trial's: :mod:`autometa.precision`).

    The interval is Student's t over episodes, or Wilson's for an accuracy over a target
    dataset's test examples (:meth:`MetaTestScore.of`). A model whose predictions are not
    finite gets a :class:`MetaTestScore` with ``failure`` set rather than an exception: it
    stays listed, never ranked on NaN. A task with a train split
    (:meth:`~autometa.task.Task.train_episodes`) gets its train score too (NaN if the
    predictions on the train split are not finite).
    """
    with autocast(precision, task.device):
        return _score_meta_test(algorithm, task)


def _score_meta_test(algorithm: MetaAlgorithm, task: Task) -> MetaTestScore:
    episodes = task.meta_test()
    over = "examples" if scored_per_example(episodes, task) else "episodes"
    try:
        scores = evaluate(algorithm, episodes, task, split="meta-test")
    except Diverged as exc:
        return MetaTestScore(math.nan, math.nan, 0, over, failure=f"diverged: {exc}")
    test = MetaTestScore.of(scores.double().cpu().tolist(), over, binary=task.metric.binary)
    train = task.train_episodes()
    if train is None:
        return test
    try:
        return replace(test, train=float(evaluate(algorithm, train, task,
                                                  split="train").double().mean()))
    except Diverged:
        return test


def restore(study: Any, trial: Any, task: Task, host: PluginHost, *, artifacts: str,
            root: Path | None = None) -> MetaAlgorithm:
    """Rebuild completed ``trial`` of ``study`` (Optuna objects) on ``task`` with its plan
    and seed, and load its state from the artifact store at ``artifacts``.

    Raises:
        ConfigError: the state is not in the store.
        DataError: the state is damaged (see :func:`load_state`).
    """
    store = open_store(artifacts, study.study_name)
    with tempfile.TemporaryDirectory(prefix="autometa-state-") as tmp:
        state = download_state(study, trial, store, artifacts, Path(tmp))
        algorithm = build(host, task, TrialPlan.of(trial),
                          trial_seed(search_seed(study), trial.number), root)
        load_state(algorithm, state, f"trial {trial.number}'s state in {artifacts!r}")
    return algorithm
