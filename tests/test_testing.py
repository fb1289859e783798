"""The conformance kit (autometa.testing) passes on every first-party plugin and catches faults."""

from __future__ import annotations

import pytest
import torch

from autometa import Float, Task
from autometa.testing import check_meta_algorithm, check_source_model, check_space, check_task
from autometa_plugins.anil.algorithm import ANIL
from autometa_plugins.conv4.model import Conv4
from autometa_plugins.digits.task import Digits
from autometa_plugins.finetune.algorithm import FineTune
from autometa_plugins.glyphs.task import Glyphs
from autometa_plugins.linear_probe.algorithm import LinearProbe
from autometa_plugins.maml.algorithm import MAML
from autometa_plugins.metasgd.algorithm import MetaSGD
from autometa_plugins.mlp.model import MLP
from autometa_plugins.protonet.algorithm import ProtoNet
from autometa_plugins.reptile.algorithm import Reptile
from autometa_plugins.resnet12.model import ResNet12
from autometa_plugins.sinusoid.task import Sinusoid
from autometa_plugins.sklearn_datasets.task import Iris

SINUSOID = {"val_episodes": 4, "test_episodes": 4, "eval_queries": 5}
DIGITS = {"ways": 3, "shots": 1, "queries": 2, "val_episodes": 4, "test_episodes": 4}


@pytest.fixture(scope="module")
def sinusoid() -> Task:
    return Sinusoid(**SINUSOID)


@pytest.fixture(scope="module")
def digits() -> Task:
    return Digits(**DIGITS)


GLYPHS = {**DIGITS, "train_classes": 10, "val_classes": 4, "test_classes": 4, "examples": 4}


@pytest.mark.parametrize(("task_cls", "params"), [
    (Sinusoid, SINUSOID), (Digits, DIGITS), (Glyphs, GLYPHS), (Iris, {}),
])
def test_tasks_conform(task_cls: type[Task], params: dict) -> None:
    check_task(task_cls, **params)


def test_sources_conform(sinusoid: Task, digits: Task) -> None:
    check_source_model(MLP, sinusoid, hidden=8)
    check_source_model(MLP, digits)
    check_source_model(Conv4, digits, channels=8)
    check_source_model(ResNet12, digits, channels="8-16-32-64")


@pytest.mark.parametrize(("algorithm", "hyperparameters"), [
    (MAML, {"strategy": "vmap"}),
    (MAML, {"strategy": "loop", "first_order": True}),
    (ANIL, {"meta_batch_size": 2}),
    (MetaSGD, {}),
    (Reptile, {"meta_batch_size": 2}),
    (FineTune, {"batch_tasks": 2}),
])
def test_algorithms_conform_on_regression(sinusoid: Task, algorithm: type,
                                          hyperparameters: dict) -> None:
    check_meta_algorithm(algorithm, sinusoid, MLP, {"hidden": 8}, **hyperparameters)


@pytest.mark.parametrize(("algorithm", "hyperparameters"), [
    (MAML, {"meta_batch_size": 2}),
    (ANIL, {"meta_batch_size": 2}),
    (MetaSGD, {"meta_batch_size": 2}),
    (Reptile, {"meta_batch_size": 2}),
    (ProtoNet, {"meta_batch_size": 2}),
    (LinearProbe, {}),
    (FineTune, {"head": "cosine", "finetune_steps": 5}),
])
def test_algorithms_conform_on_classification(digits: Task, algorithm: type,
                                              hyperparameters: dict) -> None:
    check_meta_algorithm(algorithm, digits, Conv4, {"channels": 8}, **hyperparameters)


def test_the_kit_catches_a_task_whose_validation_episodes_move() -> None:
    class Drifting(Sinusoid):
        def meta_val(self):
            return self.sample(3, torch.Generator().manual_seed(int(torch.randint(9, ()))))

    with pytest.raises(AssertionError, match="meta_val"):
        check_task(Drifting, **SINUSOID)


def test_the_kit_catches_a_default_outside_its_declared_range() -> None:
    class Odd(MLP):
        @classmethod
        def search_space(cls):
            return {"hidden": Float(100.0, 200.0)}

    with pytest.raises(AssertionError, match="default 40 is outside"):
        check_space(Odd, Odd.search_space())


def test_the_kit_catches_an_algorithm_that_forgets_state(sinusoid: Task) -> None:
    class Forgetful(MetaSGD):
        def state_dict(self):
            return {"model": self.model.state_dict(),
                    "inner_lr": {k: torch.full_like(v, 0.5) for k, v in self.inner_lr.items()}}

    with pytest.raises(AssertionError, match="round trip"):
        check_meta_algorithm(Forgetful, sinusoid, MLP, {"hidden": 8})
