"""The three contracts checked (task, source model, meta-algorithm), run as the engine runs them.

Each check builds the plugin's class, calls it the way :mod:`autometa.trial` does (the
model in train mode for ``meta_step``, in eval mode for ``adapt_and_predict``) and raises
``AssertionError`` naming the class and the file and line of the method that broke the
contract (see :mod:`autometa.testing.locate`). The kit's own frames are hidden from pytest's
tracebacks (``__tracebackhide__``), so an exception raised inside plugin code shows the
plugin's line.
"""

from __future__ import annotations

import inspect
import io
import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any, NoReturn

import torch
from torch import Tensor, nn

from autometa.algorithm import MetaAlgorithm
from autometa.errors import ConfigError
from autometa.params import ENGINE_ARGUMENTS, TASK_ENGINE_ARGUMENTS, declared_types, parse
from autometa.source_model import Backbone, SourceModel
from autometa.space import Categorical, Float, Int, SearchSpace, check_value
from autometa.task import Episodes, EpisodeSet, MixedEpisodes, Task
from autometa.testing.locate import located

__all__ = ["check_meta_algorithm", "check_source_model", "check_space", "check_task"]

#: Tolerance of the comparisons of two predictions that should be the same computation.
ATOL = 1e-6


def _fail(cls: type, message: str, method: str | None = None) -> NoReturn:
    __tracebackhide__ = True
    raise AssertionError(f"{located(cls, method)}: {message}")


def _same(a: EpisodeSet, b: EpisodeSet, first: int = 16) -> bool:
    """Whether the ``first`` episodes of ``a`` and ``b`` hold the same tensors (episode by
    episode where either set's episodes differ in size)."""
    if len(a) != len(b):
        return False
    if isinstance(a, MixedEpisodes) or isinstance(b, MixedEpisodes):
        return all(_same(a[i : i + 1], b[i : i + 1]) for i in range(min(first, len(a))))
    x, y = a[:first], b[:first]
    if x.support_x.shape != y.support_x.shape or x.query_x.shape != y.query_x.shape:
        return False
    return all(torch.equal(p, q) for p, q in zip(
        (x.support_x, x.support_y, x.query_x, x.query_y),
        (y.support_x, y.support_y, y.query_x, y.query_y), strict=True))


def _first(episodes: EpisodeSet, n: int) -> Episodes:
    """The first episodes of ``episodes`` (at most ``n``) that share one size, gathered."""
    for k in range(min(n, len(episodes)), 1, -1):
        head = episodes[:k]
        if isinstance(head, Episodes):
            return head
    head = episodes[:1]
    assert isinstance(head, Episodes)
    return head


def _space_method(cls: type) -> str | None:
    """The method declaring ``cls``'s space: ``search_space``, or None for a task's
    ``params`` (a class attribute: the class's own line)."""
    return None if issubclass(cls, Task) else "search_space"


def check_space(cls: type, space: SearchSpace) -> None:
    """Every declared name is a keyword of ``cls.__init__`` whose default lies in its range,
    a condition (``when=``) names a keyword with a default, and every keyword parameter has
    a type annotation its default satisfies (the engine parses users' values as that type,
    :mod:`autometa.params`)."""
    __tracebackhide__ = True
    parameters = inspect.signature(cls).parameters
    for name, declared in declared_types(cls, skip=ENGINE_ARGUMENTS).items():
        if declared is Any:
            default = parameters[name].default
            example = (f"{name}: {type(default).__name__} = {default!r}"
                       if default is not inspect.Parameter.empty and default is not None
                       else f"{name}: int = 5")
            _fail(cls, f"parameter {name!r} has no type annotation (or one that cannot be "
                  f"resolved at run time); annotate it, e.g. `{example}`, so that users' "
                  "values are checked", "__init__")
        default = parameters[name].default
        if default is not inspect.Parameter.empty:
            try:
                parse(f"{cls.__name__}.{name}", declared, default)
            except ConfigError as exc:
                _fail(cls, f"the default of {exc}", "__init__")
    for name, param in space.items():
        if name not in parameters:
            _fail(cls, f"declares {name!r} but its __init__ has no such keyword",
                  _space_method(cls))
        when = getattr(param, "when", None)
        if when is not None and (when[0] not in parameters
                                 or parameters[when[0]].default is inspect.Parameter.empty):
            _fail(cls, f"{name}: its condition names {when[0]!r}, which is no keyword of "
                  "__init__ with a default", _space_method(cls))
        default = parameters[name].default
        if default is inspect.Parameter.empty:
            continue
        if not isinstance(param, Float | Int | Categorical):
            continue  # a fixed value: nothing is searched, the engine passes it as given
        if isinstance(param, Categorical):
            if default not in param.choices:
                _fail(cls, f"{name}: default {default!r} is not one of {list(param.choices)}",
                      _space_method(cls))
        elif not param.low <= default <= param.high:
            _fail(cls, f"{name}: default {default!r} is outside [{param.low}, {param.high}]",
                  _space_method(cls))


def _check_episodes(task_cls: type[Task], task: Task, episodes: Episodes, where: str,
                    method: str) -> None:
    __tracebackhide__ = True
    n = len(episodes)
    for field in ("support_x", "query_x"):
        x = getattr(episodes, field)
        if tuple(x.shape[2:]) != tuple(task.input_shape) or x.shape[0] != n:
            _fail(task_cls, f"{where}.{field} has shape {list(x.shape)}; expected "
                  f"(tasks, n, {', '.join(map(str, task.input_shape))})", method)
    for field in ("support_x", "support_y", "query_x", "query_y"):
        if getattr(episodes, field).device.type != task.device.type:
            _fail(task_cls, f"{where}.{field} is on {getattr(episodes, field).device}, the "
                  f"task on {task.device}", method)
    for field in ("support_y", "query_y"):
        y = getattr(episodes, field)
        if task.kind == "classification":
            if y.dtype != torch.long or y.dim() != 2:
                _fail(task_cls, f"{where}.{field}: classification labels must be long "
                      f"(tasks, n); got {y.dtype} {list(y.shape)}", method)
            if int(y.min()) < 0 or int(y.max()) >= task.output_size:
                _fail(task_cls, f"{where}.{field}: labels outside [0, {task.output_size})",
                      method)
        elif y.dim() != 3 or y.shape[-1] != task.output_size:
            _fail(task_cls, f"{where}.{field}: regression targets must be (tasks, n, "
                  f"{task.output_size}); got {list(y.shape)}", method)


def check_task(task_cls: type[Task], **params: Any) -> Task:
    """Check a task class built with ``params``; returns the instance (seed 0)."""
    __tracebackhide__ = True
    check_space(task_cls, task_cls.params)
    task = task_cls(seed=0, **params)
    if task.kind not in ("classification", "regression"):
        _fail(task_cls, f"kind is {task.kind!r}; expected 'classification' or 'regression'")
    if task.metric.direction not in ("minimize", "maximize"):
        _fail(task_cls, f"metric.direction is {task.metric.direction!r}", "metric")
    twin, other = task_cls(seed=0, **params), task_cls(seed=1, **params)
    for split in ("meta_val", "meta_test"):
        episodes = getattr(task, split)()
        if isinstance(episodes, MixedEpisodes):  # the first 3 episodes of each size
            for ids in episodes.by_size():
                some = episodes[ids[:3]]
                assert isinstance(some, Episodes)
                _check_episodes(task_cls, task, some, f"{split}()[{ids[:3].tolist()}]", split)
        else:
            _check_episodes(task_cls, task, episodes, split, split)
        if not _same(episodes, getattr(task, split)()):
            _fail(task_cls, f"{split}() changes between calls: it must return fixed episodes",
                  split)
        if not _same(episodes, getattr(twin, split)()):
            _fail(task_cls, f"{split}() differs between two tasks with the same seed", split)
        if _same(episodes, getattr(other, split)()):
            _fail(task_cls, f"{split}() does not depend on the seed", split)
        domains = task.episode_domains(split.replace("_", "-"))
        if domains is not None and (len(domains) != len(episodes)
                                    or not all(isinstance(d, str) for d in domains)):
            _fail(task_cls, f"episode_domains({split.replace('_', '-')!r}) must name the "
                  f"domain of each of the {len(episodes)} {split}() episodes, in order; got "
                  f"{type(domains).__name__} of {len(domains)}", "episode_domains")
    _check_trial_params(task_cls, task)
    batch = task.sample(3, torch.Generator(device=task.device).manual_seed(0))
    _check_episodes(task_cls, task, batch, "sample(3)", "sample")
    if len(batch) != 3:
        _fail(task_cls, f"sample(3) returned {len(batch)} episodes", "sample")
    if _same(batch, task.sample(3, torch.Generator(device=task.device).manual_seed(1))):
        _fail(task_cls, "sample() does not depend on its generator", "sample")
    return task


def _check_trial_params(task_cls: type[Task], task: Task) -> None:
    """Each per-trial setting has a default in its range and is no constructor parameter;
    setting other values leaves meta-val and meta-test as they were (the task ends at its
    defaults)."""
    __tracebackhide__ = True
    declared = task_cls.trial_params
    constructor = declared_types(task_cls, skip=TASK_ENGINE_ARGUMENTS)
    others = {}
    for name, param in declared.items():
        if name in constructor:
            _fail(task_cls, f"trial_params declares {name!r}, also a constructor parameter; "
                  "a per-trial setting is set by configure_trial, not passed to __init__")
        if not hasattr(task_cls, name):
            _fail(task_cls, f"trial_params declares {name!r} without a default: set a class "
                  f"attribute of that name, e.g. {name} = ...")
        default = getattr(task_cls, name)
        try:
            check_value(f"{task_cls.__name__}.{name}", param, default)
        except ConfigError as exc:
            _fail(task_cls, f"the default of {exc}")
        others[name] = (param.choices[-1] if isinstance(param, Categorical)
                        else param.high if default != param.high else param.low)
    if not declared:
        return
    before = task.meta_val(), task.meta_test()
    task.configure_trial(**others)
    for split, episodes in zip(("meta_val", "meta_test"), before, strict=True):
        if not _same(episodes, getattr(task, split)()):
            _fail(task_cls, f"{split}() changes with the trial_params {others}: they may "
                  "change meta-train episodes only", split)
    task.configure_trial(**{name: getattr(task_cls, name) for name in declared})


def check_source_model(source_cls: type[SourceModel], task: Task, **hyperparameters: Any
                       ) -> Backbone:
    """Check a source model on ``task``; returns the built Backbone."""
    __tracebackhide__ = True
    check_space(source_cls, source_cls.search_space())
    source = source_cls(**hyperparameters)
    reason = source.incompatibility(task.spec)
    if reason is not None:
        _fail(source_cls, f"says it cannot serve the task: {reason}", "incompatibility")
    source.prepare(task)
    net = source.build(task.spec).to(task.device)
    if not isinstance(net, Backbone):
        _fail(source_cls, f"returned {type(net).__name__}, not a Backbone", "build")
    x = task.meta_val()[:1].support_x[0]
    out = net(x)
    if tuple(out.shape) != (x.shape[0], task.output_size):
        _fail(source_cls, f"the network outputs {list(out.shape)} for inputs {list(x.shape)}; "
              f"expected ({x.shape[0]}, {task.output_size})", "build")
    if not torch.allclose(out, net.head(net.features(x))):
        _fail(source_cls, "the network's forward is not head(features(x))", "build")
    return net


@contextmanager
def _evaluating(algorithm: MetaAlgorithm) -> Iterator[None]:
    """The model in eval mode, then back in train mode, exactly as
    :func:`autometa.trial.evaluate` runs ``adapt_and_predict``."""
    algorithm.model.eval()
    try:
        yield
    finally:
        algorithm.model.train()


def _tensors(state: Any, prefix: str = "") -> Iterator[tuple[str, Tensor]]:
    """Every tensor of a (nested) state dict, with its dotted path."""
    if isinstance(state, Tensor):
        yield prefix, state
    elif isinstance(state, Mapping):
        for key, value in state.items():
            yield from _tensors(value, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(state, (list, tuple)):
        for i, value in enumerate(state):
            yield from _tensors(value, f"{prefix}.{i}" if prefix else str(i))


def _snapshot(algorithm: MetaAlgorithm) -> dict[str, Tensor]:
    """Copies of the algorithm's state and of every buffer of its model (non-persistent
    ones included: they are not in a state dict but change predictions all the same)."""
    out = {name: t.detach().clone() for name, t in _tensors(algorithm.state_dict())}
    for name, buffer in algorithm.model.named_buffers():
        out.setdefault(f"model.{name}", buffer.detach().clone())
    return out


def _changed(before: dict[str, Tensor], algorithm: MetaAlgorithm) -> list[str]:
    after = _snapshot(algorithm)
    return [k for k, v in before.items()
            if k not in after or after[k].shape != v.shape or not torch.equal(after[k], v)]


def _training(model: nn.Module) -> list[str]:
    """Names of the modules in train mode (``""`` for the model itself)."""
    return [name for name, module in model.named_modules() if module.training]


def check_meta_algorithm(
    algorithm_cls: type[MetaAlgorithm],
    task: Task,
    source_cls: type[SourceModel],
    source_params: dict[str, Any] | None = None,
    **hyperparameters: Any,
) -> None:
    """Check an algorithm on ``task`` with networks from ``source_cls``, run as the engine
    runs it (:mod:`autometa.trial`): ``meta_step`` with the model in train mode,
    ``adapt_and_predict`` in eval mode, which must leave every parameter and buffer
    (BatchNorm's running statistics) as it found them and give the same predictions twice
    and after a ``state_dict`` round trip."""
    __tracebackhide__ = True
    check_space(algorithm_cls, algorithm_cls.search_space())
    reason = algorithm_cls.incompatibility(task)
    if reason is not None:
        _fail(algorithm_cls, f"says it cannot serve the task: {reason}", "incompatibility")

    def fresh() -> MetaAlgorithm:  # as autometa.trial.build
        __tracebackhide__ = True
        torch.manual_seed(0)
        source = source_cls(**(source_params or {}))
        source.prepare(task)
        model = source.build(task.spec).to(task.device)
        return algorithm_cls(model, task, **hyperparameters)

    algo = fresh()
    if algo.meta_trains:
        algo.model.train()  # as autometa.trial.meta_train
        before = [p.detach().clone() for p in algo.model.parameters()]
        batch = task.sample(algo.tasks_per_step, torch.Generator(device=task.device)
                            .manual_seed(0))
        loss = algo.meta_step(batch)
        if not isinstance(loss, float) or not math.isfinite(loss):
            _fail(algorithm_cls, f"returned {loss!r}; expected a finite float", "meta_step")
        if all(torch.equal(a, b) for a, b in zip(before, algo.model.parameters(),
                                                 strict=True)):
            _fail(algorithm_cls, "changed no parameter of the model", "meta_step")
    episodes = _first(task.meta_val(), 3)
    n_query = episodes.query_x.shape[1]
    with _evaluating(algo):
        state = _snapshot(algo)
        pred = algo.adapt_and_predict(episodes)
        if not isinstance(pred, Tensor) or pred.dim() != 3 \
                or tuple(pred.shape) != (len(episodes), n_query, task.output_size):
            shape = list(pred.shape) if isinstance(pred, Tensor) else type(pred).__name__
            _fail(algorithm_cls, f"returned {shape}; expected ({len(episodes)}, {n_query}, "
                  f"{task.output_size}): (episodes, queries, the task's output_size)",
                  "adapt_and_predict")
        if not bool(torch.isfinite(pred).all()):
            _fail(algorithm_cls, "returned predictions that are not finite (NaN or inf) on "
                  "the first meta-val episodes", "adapt_and_predict")
        training = _training(algo.model)
        if training:
            _fail(algorithm_cls, "left the model in train mode ("
                  f"{', '.join(repr(n or 'model') for n in training[:3])}); the engine calls it "
                  "in eval mode: adapt a copy, or restore the mode it found "
                  "(`was = model.training; ...; model.train(was)`)", "adapt_and_predict")
        changed = _changed(state, algo)
        buffers = [n for n in changed if n.startswith("model.")
                   and n.removeprefix("model.") in dict(algo.model.named_buffers())]
        if buffers:
            _fail(algorithm_cls, f"changed the model's buffers {buffers[:3]} in eval mode "
                  "(BatchNorm running statistics are updated in train mode: does it switch "
                  "the model to train mode?); it must leave the meta-trained state as it "
                  "found it", "adapt_and_predict")
        if changed:
            _fail(algorithm_cls, f"changed the meta-trained state {changed[:3]}; it must "
                  "adapt a copy of the weights (autometa.inner_loop) and leave the state "
                  "as it found it", "adapt_and_predict")
        again = algo.adapt_and_predict(episodes)
        if again.shape != pred.shape or not torch.allclose(again, pred, atol=ATOL):
            _fail(algorithm_cls, "gave different predictions for the same episodes in two "
                  "calls in eval mode (dropout applied regardless of the mode? an "
                  "unseeded random draw?); predictions must be deterministic",
                  "adapt_and_predict")
        _check_adapted_module(algorithm_cls, algo, episodes, pred)
    # Saved, as the engine saves a trial (autometa.study.artifacts.save_state), after meta-training.
    buffer = io.BytesIO()
    torch.save(algo.state_dict(), buffer)
    buffer.seek(0)
    restored = fresh()
    restored.load_state_dict(torch.load(buffer, map_location=task.device, weights_only=True))
    with _evaluating(restored):
        replayed = restored.adapt_and_predict(episodes)
    if replayed.shape != pred.shape or not torch.allclose(replayed, pred, atol=ATOL):
        _fail(algorithm_cls, "a state_dict round trip changes the predictions: state_dict() "
              "must hold everything adapt_and_predict uses, and load_state_dict() restore it",
              "state_dict")


def _check_adapted_module(algorithm_cls: type[MetaAlgorithm], algo: MetaAlgorithm,
                          episodes: Episodes, pred: Tensor) -> None:
    """Where the algorithm gives them, its module adapted on the first episode's support
    set (``autometa export``'s model.pt2), and its adapt/predict pair (a few-shot task's
    adapt.pt2 and predict.pt2), predict that episode's query set as ``adapt_and_predict``
    did, and leave the meta-trained state as it found it."""
    __tracebackhide__ = True
    state = _snapshot(algo)
    with torch.random.fork_rng(), torch.no_grad():
        torch.manual_seed(0)  # as autometa.export_program calls it: the fixed seed
        adapted = algo.adapted_module(episodes.support_x[0], episodes.support_y[0])
        if adapted is not None:
            _same_predictions(algorithm_cls, adapted.eval()(episodes.query_x[0]), pred,
                              "adapted_module")
        # adapt takes class labels (a few-shot classification task's)
        pair = algo.adaptation_modules() if episodes.support_y.dtype == torch.long else None
        if pair is not None:
            fitted = pair[0].eval()(episodes.support_x[0], episodes.support_y[0])
            fitted = fitted if isinstance(fitted, tuple | list) else (fitted,)
            _same_predictions(algorithm_cls, pair[1].eval()(episodes.query_x[0], *fitted),
                              pred, "adaptation_modules")
    changed = _changed(state, algo)
    if changed:
        _fail(algorithm_cls, f"changed the meta-trained state {changed[:3]}; adapt a copy "
              "and leave the state as it found it", "adapted_module")


def _same_predictions(algorithm_cls: type[MetaAlgorithm], one: Any, pred: Tensor,
                      method: str) -> None:
    __tracebackhide__ = True
    if not isinstance(one, Tensor) or tuple(one.shape) != tuple(pred.shape[1:]) \
            or not torch.allclose(one.to(pred.dtype), pred[0], atol=1e-4, rtol=1e-4):
        shape = list(one.shape) if isinstance(one, Tensor) else type(one).__name__
        _fail(algorithm_cls, f"gave a module whose predictions ({shape}) are not "
              "adapt_and_predict's for the same support and query sets "
              f"({list(pred.shape[1:])}); its forward must compute what adapt_and_predict "
              "returns after adapting on that support set", method)
