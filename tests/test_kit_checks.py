"""The contract checks run algorithms as the engine does (train mode to meta-train, eval
mode to adapt and predict) and point their failures at the plugin's code."""

from __future__ import annotations

import re
from pathlib import Path
from typing import ClassVar

import pytest
import torch
from torch import nn

from autometa import Backbone, Episodes, MetaAlgorithm, SourceModel, Task, TaskSpec
from autometa.testing import check_meta_algorithm
from autometa.trial import meta_train
from autometa_plugins.sinusoid.task import Sinusoid

HERE = Path(__file__).name


def at(marker: str) -> str:
    """A pattern for ``this_file.py:line`` of the marked line, whatever the directory."""
    return rf"(?:\S*/)?{re.escape(HERE)}:{line_of(marker)}"
SINUSOID = {"val_episodes": 4, "test_episodes": 4, "eval_queries": 5}


def line_of(marker: str) -> int:
    """Line number of the line of this file that ends with ``# <marker>``."""
    lines = Path(__file__).read_text().splitlines()
    return next(i for i, text in enumerate(lines, 1) if text.endswith(f"# {marker}"))


@pytest.fixture(scope="module")
def sinusoid() -> Task:
    return Sinusoid(**SINUSOID)


class Normed(SourceModel):
    """An MLP with BatchNorm (running statistics kept) and dropout: eval mode matters."""

    input_ranks = (1,)

    def __init__(self, hidden: int = 16) -> None:
        self.hidden = hidden

    def build(self, spec: TaskSpec) -> Backbone:
        features = nn.Sequential(nn.Linear(spec.input_shape[0], self.hidden),
                                 nn.BatchNorm1d(self.hidden), nn.ReLU(), nn.Dropout(0.5))
        return Backbone(features, nn.Linear(self.hidden, spec.output_size))


class Direct(MetaAlgorithm):
    """Predicts the query points with the network itself, no adaptation."""

    def __init__(self, model: Backbone, task: Task, lr: float = 0.01) -> None:
        super().__init__(model, task)
        self.optimizer = torch.optim.SGD(model.parameters(), lr=lr)
        self.tasks_per_step = 2

    def predict(self, x: torch.Tensor) -> torch.Tensor:  # (tasks, n, 1) -> (tasks, n, 1)
        return self.model(x.flatten(0, 1)).view(*x.shape[:2], -1)

    def meta_step(self, batch: Episodes) -> float:  # Direct.meta_step
        loss = self.task.loss(self.predict(batch.query_x), batch.query_y)
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        return loss.item()

    def adapt_and_predict(self, episodes: Episodes) -> torch.Tensor:
        with torch.no_grad():
            return self.predict(episodes.query_x)


def test_an_algorithm_that_relies_on_eval_mode_passes(sinusoid: Task) -> None:
    """BatchNorm with running statistics and dropout are fine when predicting in eval mode
    (run in train mode, as the kit once did, they change the state and the predictions)."""
    check_meta_algorithm(Direct, sinusoid, Normed)


class Recording(Direct):
    """Notes the model's mode at each call."""

    modes: ClassVar[set[tuple[str, bool]]] = set()

    def meta_step(self, batch: Episodes) -> float:
        self.modes.add(("meta_step", self.model.training))
        return super().meta_step(batch)

    def adapt_and_predict(self, episodes: Episodes) -> torch.Tensor:
        self.modes.add(("adapt_and_predict", self.model.training))
        return super().adapt_and_predict(episodes)


def test_the_kit_calls_the_algorithm_in_the_modes_the_engine_does(sinusoid: Task) -> None:
    """meta_step in train mode, adapt_and_predict in eval mode, as autometa.trial runs them."""
    Recording.modes = set()
    check_meta_algorithm(Recording, sinusoid, Normed)
    kit = Recording.modes
    Recording.modes = set()
    torch.manual_seed(0)
    engine = Recording(Normed().build(sinusoid.spec), sinusoid)
    meta_train(engine, sinusoid, meta_steps=2, eval_every=1,
               generator=torch.Generator().manual_seed(0))
    assert kit == Recording.modes == {("meta_step", True), ("adapt_and_predict", False)}


class LeftInTrain(Direct):
    def adapt_and_predict(self, episodes: Episodes) -> torch.Tensor:  # LeftInTrain
        self.model.train()  # fine-tunes "as in training": BatchNorm statistics move
        return super().adapt_and_predict(episodes)


class SwitchesBack(Direct):
    def adapt_and_predict(self, episodes: Episodes) -> torch.Tensor:
        self.model.train()
        try:
            return super().adapt_and_predict(episodes)
        finally:
            self.model.eval()


class AlwaysDropout(Direct):
    def adapt_and_predict(self, episodes: Episodes) -> torch.Tensor:
        return nn.functional.dropout(super().adapt_and_predict(episodes), 0.5, training=True)


@pytest.mark.parametrize(("algorithm", "message"), [
    (LeftInTrain, r"left the model in train mode \('model', 'features'"),
    (SwitchesBack, r"changed the model's buffers \['model.features.1.running_mean'"),
    (AlwaysDropout, r"different predictions for the same episodes in two calls in eval mode"),
])
def test_an_algorithm_that_relies_on_train_mode_to_predict_is_caught(
        sinusoid: Task, algorithm: type[MetaAlgorithm], message: str) -> None:
    with pytest.raises(AssertionError, match=message):
        check_meta_algorithm(algorithm, sinusoid, Normed)


def test_a_failure_names_the_class_and_the_line_of_the_failing_method(sinusoid: Task) -> None:
    with pytest.raises(AssertionError) as failed:
        check_meta_algorithm(LeftInTrain, sinusoid, Normed)
    assert re.match(rf"LeftInTrain\.adapt_and_predict \({at('LeftInTrain')}\): left the "
                    "model in train mode", str(failed.value))


class Frozen(Direct):  # Frozen
    def __init__(self, model: Backbone, task: Task, lr: float = 0.0) -> None:
        super().__init__(model, task, lr)


def test_an_inherited_method_points_at_its_code_and_at_the_class(sinusoid: Task) -> None:
    with pytest.raises(AssertionError) as failed:
        check_meta_algorithm(Frozen, sinusoid, Normed)
    assert re.fullmatch(
        rf"Frozen\.meta_step \({at('Direct.meta_step')}, inherited from Direct; Frozen at "
        rf"{at('Frozen')}\): changed no parameter of the model", str(failed.value))


def test_a_task_failure_points_at_the_task_method(sinusoid: Task) -> None:
    from autometa.testing import check_task

    class Drifting(Sinusoid):
        def meta_test(self) -> Episodes:  # Drifting.meta_test
            return self.sample(2, torch.Generator().manual_seed(int(torch.randint(9, ()))))

    with pytest.raises(AssertionError) as failed:
        check_task(Drifting, **SINUSOID)
    assert re.match(rf"Drifting\.meta_test \({at('Drifting.meta_test')}\): "
                    r"meta_test\(\) changes between calls", str(failed.value))


def test_episode_domains_must_name_each_fixed_episode() -> None:
    from autometa.testing import check_task

    class Misnamed(Sinusoid):
        def episode_domains(self, split: str) -> list[str] | None:  # Misnamed.episode_domains
            return ["a", "b"]

    with pytest.raises(AssertionError) as failed:
        check_task(Misnamed, **SINUSOID)
    assert re.match(rf"Misnamed\.episode_domains \({at('Misnamed.episode_domains')}\): "
                    r"episode_domains\('meta-val'\) must name the domain of each of the \d+ "
                    r"meta_val\(\) episodes, in order; got list of 2", str(failed.value))


class WrongWidth(Direct):
    """Predicts one output too many."""

    def adapt_and_predict(self, episodes: Episodes) -> torch.Tensor:
        out = super().adapt_and_predict(episodes)
        return torch.cat([out, out[..., :1]], dim=-1)


def test_predictions_must_have_the_tasks_output_size(sinusoid: Task) -> None:
    with pytest.raises(AssertionError, match=r"returned \[3, 5, 2\]; expected \(3, 5, 1\)"):
        check_meta_algorithm(WrongWidth, sinusoid, Normed)


def test_a_fixed_value_in_a_declared_space_is_accepted() -> None:
    from autometa import Float
    from autometa.testing import check_space

    class Fixed(SourceModel):
        def __init__(self, *, width: int = 8, rate: float = 0.1) -> None:
            self.width, self.rate = width, rate

        def build(self, spec: TaskSpec) -> Backbone:
            raise NotImplementedError

    check_space(Fixed, {"width": 16, "rate": Float(0.01, 1.0)})
    with pytest.raises(AssertionError, match="outside"):
        check_space(Fixed, {"width": 16, "rate": Float(0.5, 1.0)})
