"""Conformance checks for plugins: run them on your Task, SourceModel and MetaAlgorithm classes.

Every first-party plugin passes these checks in autometa's own test suite; a third-party
plugin should too. They are plain functions raising ``AssertionError`` with a message that
says which part of the contract is broken, so they work under any test runner::

    from autometa.testing import check_task, check_source_model, check_meta_algorithm

    def test_my_task():
        check_task(MyTask, ways=5)
"""

from __future__ import annotations

import inspect
import io
import math
from typing import Any

import torch

from autometa.algorithm import MetaAlgorithm
from autometa.errors import ConfigError
from autometa.params import declared_types, parse
from autometa.source_model import Backbone, SourceModel
from autometa.space import Categorical, SearchSpace
from autometa.task import Episodes, Task

__all__ = ["check_meta_algorithm", "check_source_model", "check_space", "check_task"]


def _fail(message: str) -> None:
    raise AssertionError(message)


def _same(a: Episodes, b: Episodes) -> bool:
    return all(torch.equal(x, y) for x, y in zip(
        (a.support_x, a.support_y, a.query_x, a.query_y),
        (b.support_x, b.support_y, b.query_x, b.query_y), strict=True))


def check_space(cls: type, space: SearchSpace) -> None:
    """Every declared name is a keyword of ``cls.__init__`` whose default lies in its range,
    and every keyword parameter has a type annotation its default satisfies (the engine
    parses users' values as that type, :mod:`autometa.params`)."""
    parameters = inspect.signature(cls).parameters
    engine = {"self", "model", "task", "seed", "device"}
    for name, declared in declared_types(cls, skip=frozenset(engine)).items():
        if declared is Any:
            _fail(f"{cls.__name__}.{name} has no type annotation (or one that cannot be "
                  "resolved at run time); annotate it, e.g. `{name}: int = 5`, so that users' "
                  "values are checked")
        default = parameters[name].default
        if default is not inspect.Parameter.empty:
            try:
                parse(f"{cls.__name__}.{name}", declared, default)
            except ConfigError as exc:
                _fail(f"the default of {exc}")
    for name, param in space.items():
        if name not in parameters:
            _fail(f"{cls.__name__} declares {name!r} but its __init__ has no such keyword")
        default = parameters[name].default
        if default is inspect.Parameter.empty:
            continue
        if isinstance(param, Categorical):
            if default not in param.choices:
                _fail(f"{cls.__name__}.{name}: default {default!r} is not one of "
                      f"{list(param.choices)}")
        elif not param.low <= default <= param.high:
            _fail(f"{cls.__name__}.{name}: default {default!r} is outside "
                  f"[{param.low}, {param.high}]")


def _check_episodes(task: Task, episodes: Episodes, where: str) -> None:
    n = len(episodes)
    for field in ("support_x", "query_x"):
        x = getattr(episodes, field)
        if tuple(x.shape[2:]) != tuple(task.input_shape) or x.shape[0] != n:
            _fail(f"{where}.{field} has shape {list(x.shape)}; expected "
                  f"(tasks, n, {', '.join(map(str, task.input_shape))})")
    for field in ("support_x", "support_y", "query_x", "query_y"):
        if getattr(episodes, field).device.type != task.device.type:
            _fail(f"{where}.{field} is on {getattr(episodes, field).device}, the task on "
                  f"{task.device}")
    for field in ("support_y", "query_y"):
        y = getattr(episodes, field)
        if task.kind == "classification":
            if y.dtype != torch.long or y.dim() != 2:
                _fail(f"{where}.{field}: classification labels must be long (tasks, n); got "
                      f"{y.dtype} {list(y.shape)}")
            if int(y.min()) < 0 or int(y.max()) >= task.output_size:
                _fail(f"{where}.{field}: labels outside [0, {task.output_size})")
        elif y.dim() != 3 or y.shape[-1] != task.output_size:
            _fail(f"{where}.{field}: regression targets must be (tasks, n, "
                  f"{task.output_size}); got {list(y.shape)}")


def check_task(task_cls: type[Task], **params: Any) -> Task:
    """Check a task class built with ``params``; returns the instance (seed 0)."""
    check_space(task_cls, task_cls.params)
    task = task_cls(seed=0, **params)
    if task.kind not in ("classification", "regression"):
        _fail(f"{task_cls.__name__}.kind is {task.kind!r}")
    if task.metric.direction not in ("minimize", "maximize"):
        _fail(f"{task_cls.__name__}.metric.direction is {task.metric.direction!r}")
    twin, other = task_cls(seed=0, **params), task_cls(seed=1, **params)
    for split in ("meta_val", "meta_test"):
        episodes = getattr(task, split)()
        _check_episodes(task, episodes, split)
        if not _same(episodes, getattr(task, split)()):
            _fail(f"{split}() changes between calls: it must return fixed episodes")
        if not _same(episodes, getattr(twin, split)()):
            _fail(f"{split}() differs between two tasks with the same seed")
        if _same(episodes, getattr(other, split)()):
            _fail(f"{split}() does not depend on the seed")
    batch = task.sample(3, torch.Generator(device=task.device).manual_seed(0))
    _check_episodes(task, batch, "sample(3)")
    if len(batch) != 3:
        _fail(f"sample(3) returned {len(batch)} episodes")
    if _same(batch, task.sample(3, torch.Generator(device=task.device).manual_seed(1))):
        _fail("sample() does not depend on its generator")
    return task


def check_source_model(source_cls: type[SourceModel], task: Task, **hyperparameters: Any
                       ) -> Backbone:
    """Check a source model on ``task``; returns the built Backbone."""
    check_space(source_cls, source_cls.search_space())
    source = source_cls(**hyperparameters)
    reason = source.incompatibility(task.spec)
    if reason is not None:
        _fail(f"{source_cls.__name__} says it cannot serve the task: {reason}")
    source.prepare(task)
    net = source.build(task.spec).to(task.device)
    if not isinstance(net, Backbone):
        _fail(f"{source_cls.__name__}.build returned {type(net).__name__}, not a Backbone")
    x = task.meta_val().support_x[0]
    out = net(x)
    if tuple(out.shape) != (x.shape[0], task.output_size):
        _fail(f"{source_cls.__name__}: outputs {list(out.shape)} for inputs {list(x.shape)}; "
              f"expected ({x.shape[0]}, {task.output_size})")
    if not torch.allclose(out, net.head(net.features(x))):
        _fail(f"{source_cls.__name__}: forward is not head(features(x))")
    return net


def check_meta_algorithm(
    algorithm_cls: type[MetaAlgorithm],
    task: Task,
    source_cls: type[SourceModel],
    source_params: dict[str, Any] | None = None,
    **hyperparameters: Any,
) -> None:
    """Check an algorithm on ``task`` with networks from ``source_cls``."""
    check_space(algorithm_cls, algorithm_cls.search_space())
    reason = algorithm_cls.incompatibility(task)
    if reason is not None:
        _fail(f"{algorithm_cls.__name__} says it cannot serve the task: {reason}")

    def fresh() -> MetaAlgorithm:
        torch.manual_seed(0)
        source = source_cls(**(source_params or {}))
        source.prepare(task)
        model = source.build(task.spec).to(task.device)
        return algorithm_cls(model, task, **hyperparameters)

    algo = fresh()
    if algo.meta_trains:
        before = [p.detach().clone() for p in algo.model.parameters()]
        batch = task.sample(algo.tasks_per_step, torch.Generator(device=task.device)
                            .manual_seed(0))
        loss = algo.meta_step(batch)
        if not isinstance(loss, float) or not math.isfinite(loss):
            _fail(f"{algorithm_cls.__name__}.meta_step returned {loss!r}; expected a finite "
                  "float")
        if all(torch.equal(a, b) for a, b in zip(before, algo.model.parameters(),
                                                 strict=True)):
            _fail(f"{algorithm_cls.__name__}.meta_step changed no parameter")
    episodes = task.meta_val()[:3]
    state = {k: v.clone() for k, v in algo.model.state_dict().items()}
    pred = algo.adapt_and_predict(episodes)
    n_query = episodes.query_x.shape[1]
    if tuple(pred.shape[:2]) != (len(episodes), n_query) or pred.dim() != 3:
        _fail(f"{algorithm_cls.__name__}.adapt_and_predict returned {list(pred.shape)}; "
              f"expected ({len(episodes)}, {n_query}, outputs)")
    if any(not torch.equal(state[k], v) for k, v in algo.model.state_dict().items()):
        _fail(f"{algorithm_cls.__name__}.adapt_and_predict changed the meta-trained state")
    buffer = io.BytesIO()
    torch.save(algo.state_dict(), buffer)
    buffer.seek(0)
    restored = fresh()
    restored.load_state_dict(torch.load(buffer, map_location=task.device, weights_only=True))
    if not torch.allclose(restored.adapt_and_predict(episodes), pred, atol=1e-6):
        _fail(f"{algorithm_cls.__name__}: a state_dict round trip changes the predictions")
