"""Glyphs: the task contract, the keyed randomness, class identity and disjoint splits,
instance variation, parameter errors, and learning."""

from __future__ import annotations

import random

import pytest
import torch

from autometa import DataError
from autometa.testing import check_task
from autometa.trial import evaluate
from autometa_plugins.glyphs.render import Keyed, _mix, glyph_images
from autometa_plugins.glyphs.task import Glyphs
from autometa_plugins.maml.algorithm import MAML
from autometa_plugins.mlp.model import MLP

#: A few classes and images: every test but the learning one builds in milliseconds.
SMALL = {"ways": 3, "shots": 1, "queries": 2, "val_episodes": 4, "test_episodes": 4,
         "train_classes": 12, "val_classes": 6, "test_classes": 6, "examples": 5}


def by_class(x: torch.Tensor, examples: int) -> torch.Tensor:
    """Class-major images (classes * examples, 1, 28, 28) -> (classes, examples, 784)."""
    return x.reshape(-1, examples, 28 * 28)


def test_conformance():
    task = check_task(Glyphs, **SMALL)
    assert task.describe()["classes"] == {"meta-train": 12, "meta-val": 6, "meta-test": 6}


def test_images_shapes_pixel_range_and_device():
    task = Glyphs(**SMALL, device="cpu")
    x = task.train.x
    assert x.shape == (12 * 5, 1, 28, 28) and x.dtype == torch.float32
    assert x.device == task.device == torch.device("cpu")
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0
    ink = x.flatten(1).sum(1)  # (n,): every image has a glyph, none fills the image
    assert bool((ink > 20).all()) and bool((ink < 0.5 * 28 * 28).all())
    episodes = task.meta_val()
    assert episodes.support_x.shape == (4, 3, 1, 28, 28)
    assert episodes.query_x.shape == (4, 6, 1, 28, 28)


def test_hash_matches_a_pure_python_lowbias32():
    def reference(x: int) -> int:
        x ^= x >> 16
        x = (x * 0x7FEB352D) & 0xFFFFFFFF
        x ^= x >> 15
        x = (x * 0x846CA68B) & 0xFFFFFFFF
        return x ^ (x >> 16)

    rng = random.Random(0)
    values = [0, 1, 0xFFFFFFFF, 0x80000000] + [rng.getrandbits(32) for _ in range(1000)]
    got = _mix(torch.tensor(values, dtype=torch.int64)).tolist()
    assert got == [reference(v) for v in values]


def test_keyed_numbers_depend_on_the_keys_only():
    keyed = Keyed(7, 1, device=torch.device("cpu"))
    grid = keyed.uniform(torch.arange(50)[:, None], torch.arange(40))  # (50, 40)
    assert torch.equal(grid[3:5, 10], keyed.uniform(torch.tensor([3, 4]), 10))
    assert not torch.equal(grid, Keyed(8, 1, device=torch.device("cpu")).uniform(
        torch.arange(50)[:, None], torch.arange(40)))
    assert 0 < float(grid.min()) and float(grid.max()) < 1
    assert abs(float(grid.mean()) - 0.5) < 0.03  # 2,000 numbers: sd of the mean ~0.0065
    assert len(torch.unique(grid)) > 1990


def test_a_class_is_the_same_whatever_the_split_sizes():
    small = Glyphs(**SMALL)
    bigger = Glyphs(**{**SMALL, "train_classes": 20, "val_classes": 9, "examples": 8})
    assert torch.equal(by_class(small.train.x, 5), by_class(bigger.train.x, 8)[:12, :5])
    # The meta-val classes (and so the fixed meta-val episodes) ignore the other splits.
    grown = Glyphs(**{**SMALL, "train_classes": 30, "test_classes": 9})
    assert torch.equal(grown.meta_val().query_x, small.meta_val().query_x)
    other_seed = Glyphs(**SMALL, seed=1)
    assert (by_class(other_seed.train.x, 5) - by_class(small.train.x, 5)).abs().amax() > 0.5


def test_splits_are_disjoint():
    """No template (an undistorted class) of one split is close to one of another split."""
    templates = [glyph_images(0, split, 30, 1, distortion=0.0).flatten(1) for split in range(3)]
    for a in range(3):
        for b in range(a + 1, 3):
            assert float(torch.cdist(templates[a], templates[b]).min()) > 3.0, (a, b)


def test_instances_vary_around_their_class():
    """Instances of a class differ, yet raw-pixel nearest class means beat chance clearly."""
    classes, examples = 20, 10
    x = by_class(glyph_images(3, 0, classes, examples), examples)  # (20, 10, 784)
    pairs = torch.cdist(x, x)  # (20, 10, 10) within each class
    off_diagonal = ~torch.eye(examples, dtype=torch.bool)
    assert float(pairs[:, off_diagonal].min()) > 1.0
    # 20-way, 5 references per class, the other 5 as queries; chance is 5%.
    means = x[:, :5].mean(1)  # (20, 784)
    queries = x[:, 5:].reshape(-1, 28 * 28)
    predicted = torch.cdist(queries, means).argmin(1)
    accuracy = float((predicted == torch.arange(classes).repeat_interleave(5)).float().mean())
    assert 0.3 < accuracy < 1.0, accuracy
    # Without distortion every instance is its template.
    still = by_class(glyph_images(3, 0, classes, 3, distortion=0.0), 3)
    assert torch.equal(still[:, 0], still[:, 1]) and torch.equal(still[:, 0], still[:, 2])


def test_distortion_controls_difficulty():
    def accuracy(distortion: float) -> float:
        task = Glyphs(**{**SMALL, "ways": 5, "test_classes": 30, "test_episodes": 100,
                         "examples": 10, "queries": 5}, distortion=distortion)
        episodes = task.meta_test()
        nearest = torch.cdist(episodes.query_x.flatten(2), episodes.support_x.flatten(2))
        predicted = episodes.support_y.gather(1, nearest.argmin(-1))
        return float((predicted == episodes.query_y).float().mean())

    easy, default, hard = accuracy(0.3), accuracy(1.0), accuracy(2.0)
    assert easy > default + 0.1 and default > hard + 0.1, (easy, default, hard)


@pytest.mark.parametrize(("params", "message"), [
    ({"ways": 7}, "7-way episodes need 7 meta-val classes"),
    ({"ways": 5, "test_classes": 4, "val_classes": 5}, "meta-test has 4"),
    ({"shots": 3, "queries": 3}, "raise 'examples'"),
])
def test_bad_parameters_give_one_clear_data_error(params, message):
    with pytest.raises(DataError, match=message):
        Glyphs(**{**SMALL, **params})


def test_meta_training_learns_5way_1shot():
    """150 MAML steps of a small MLP lift 5-way 1-shot meta-test accuracy far from chance."""
    task = Glyphs(ways=5, shots=1, queries=5, val_episodes=2, test_episodes=100,
                  train_classes=200, val_classes=5, test_classes=50, examples=10)
    torch.manual_seed(0)
    algo = MAML(MLP(hidden=64).build(task.spec), task, inner_lr=0.4, meta_lr=3e-3,
                meta_batch_size=4, strategy="vmap")
    untrained = float(evaluate(algo, task.meta_test(), task).mean())
    g = torch.Generator().manual_seed(0)
    for _ in range(150):
        algo.meta_step(task.sample(algo.tasks_per_step, g))
    trained = float(evaluate(algo, task.meta_test(), task).mean())
    assert trained > 0.45 and trained > untrained + 0.2, (untrained, trained)
