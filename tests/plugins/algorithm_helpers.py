"""Helpers shared by the algorithm plugins' tests (test_anil, test_metasgd, test_reptile,
test_protonet, test_linear_probe, test_finetune).

Imported as a top-level module: pytest's default "prepend" import mode puts this directory
(it has no ``__init__.py``) on ``sys.path`` before importing the test modules in it.
"""

from __future__ import annotations

import inspect
import math
from pathlib import Path
from types import ModuleType

import torch
from torch import Tensor, nn

from autometa import Backbone, Episodes, MetaAlgorithm, PluginHost, Task, create_host
from autometa.space import check_value
from autometa.study.artifacts import load_state, save_state
from autometa.study.trials import TrialPlan
from autometa.trial import build, meta_train


class StubTask(Task):
    """A task that only defines its kind and shapes; episodes are built by the tests."""

    def __init__(self, kind: str, input_shape: tuple[int, ...], output_size: int) -> None:
        super().__init__()
        self.kind, self.input_shape, self.output_size = kind, input_shape, output_size

    def sample(self, n_tasks, generator):
        raise NotImplementedError

    def meta_val(self):
        raise NotImplementedError

    def meta_test(self):
        raise NotImplementedError


def small_network(in_size: int, hidden: int, out: int, dtype: torch.dtype = torch.float64,
                  seed: int | None = None) -> Backbone:
    """Linear -> tanh features and a linear head; ``seed`` seeds torch's global generator
    first (without it, the caller's seeding decides the initialisation)."""
    if seed is not None:
        torch.manual_seed(seed)
    # tanh rather than ReLU: its second derivative is not zero, so every second-order
    # term of the meta-gradient is exercised.
    features = nn.Sequential(nn.Linear(in_size, hidden), nn.Tanh())
    return Backbone(features, nn.Linear(hidden, out)).to(dtype)


def random_episodes(kind: str, in_size: int, out: int, tasks: int = 3, n_s: int = 5,
                    n_q: int = 6, dtype: torch.dtype = torch.float64) -> Episodes:
    """Random inputs of ``in_size`` features; random labels among ``out`` classes, or
    random regression targets of ``out`` values."""
    g = torch.Generator().manual_seed(1)

    def targets(n: int) -> Tensor:
        if kind == "classification":
            return torch.randint(0, out, (tasks, n), generator=g)  # (tasks, n)
        return torch.randn(tasks, n, out, generator=g, dtype=dtype)  # (tasks, n, out)

    return Episodes(torch.randn(tasks, n_s, in_size, generator=g, dtype=dtype), targets(n_s),
                    torch.randn(tasks, n_q, in_size, generator=g, dtype=dtype), targets(n_q))


def labelled_episodes(support_y: Tensor, n_q: int, input_shape: tuple[int, ...], ways: int,
                      generator: torch.Generator) -> Episodes:
    """Float64 episodes around given support labels ``(tasks, n_support)``: random inputs
    and random query labels among ``ways`` classes, drawn from ``generator``."""
    tasks, n_s = support_y.shape
    return Episodes(
        torch.randn(tasks, n_s, *input_shape, generator=generator, dtype=torch.float64),
        support_y,
        torch.randn(tasks, n_q, *input_shape, generator=generator, dtype=torch.float64),
        torch.randint(0, ways, (tasks, n_q), generator=generator),
    )


def meta_train_steps(algo: MetaAlgorithm, task: Task, steps: int) -> None:
    """``steps`` meta-steps on batches the task samples from a generator seeded with 0."""
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        algo.meta_step(task.sample(algo.tasks_per_step, g))


def assert_search_space_defaults_in_range(algorithm: type[MetaAlgorithm], name: str) -> None:
    """Every searched hyperparameter is a keyword-only argument whose default is in range."""
    defaults = {arg: p.default for arg, p in inspect.signature(algorithm).parameters.items()
                if p.kind is inspect.Parameter.KEYWORD_ONLY}
    for arg, param in algorithm.search_space().items():
        assert arg in defaults, arg
        check_value(f"{name}.{arg}", param, defaults[arg])  # raises ConfigError if outside


def trial_host(name: str, plugin: ModuleType, algorithm: type[MetaAlgorithm]) -> PluginHost:
    """A host with only the algorithm's plugin and the MLP, which finds the algorithm."""
    import autometa_plugins.mlp

    host = create_host(entry_points=False, plugins={name: plugin, "mlp": autometa_plugins.mlp})
    assert host.get("algorithm", name).load() is algorithm
    return host


def assert_state_round_trip(host: PluginHost, task: Task, plan: TrialPlan, algo: MetaAlgorithm,
                            tmp_path: Path) -> None:
    """save_state, then load_state into another initialisation: the same predictions."""
    save_state(algo, tmp_path / "trial.pt")
    restored = build(host, task, plan, seed=1)  # another initialisation
    load_state(restored, tmp_path / "trial.pt")
    episodes = task.meta_val()
    assert torch.equal(restored.adapt_and_predict(episodes), algo.adapt_and_predict(episodes))


def assert_runs_in_a_trial(tmp_path: Path, name: str, plugin: ModuleType,
                           algorithm: type[MetaAlgorithm], task: Task,
                           params: dict[str, object]) -> float:
    """Built by a host from the plugin (on an MLP with 40 hidden units), 3 meta-train steps
    give a finite score, and the state survives a round trip. Returns the score."""
    host = trial_host(name, plugin, algorithm)
    plan = TrialPlan(name, "mlp", params, {"hidden": 40})
    algo = build(host, task, plan, seed=0)
    score = meta_train(algo, task, meta_steps=3, eval_every=3,
                       generator=torch.Generator().manual_seed(0))
    assert math.isfinite(score)
    assert_state_round_trip(host, task, plan, algo, tmp_path)
    return score
