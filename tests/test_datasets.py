"""The datasets toolkit: train/val/test splits, class splits, target tasks, per-example CIs."""

from __future__ import annotations

import math

import pytest
import torch

from autometa import DataError, Episodes
from autometa.datasets import (
    FewShotTask,
    TargetTask,
    check_finite,
    split_classes,
    split_examples,
)
from autometa.episodes import ClassPool
from autometa.metrics import ACCURACY, MSE, mean_ci95
from autometa.trial import evaluate, scored_per_example


def test_stratified_split_is_seeded_disjoint_and_keeps_every_class_in_every_part():
    y = torch.tensor([0] * 50 + [1] * 30 + [2] * 5)
    parts = split_examples(y, val_fraction=0.2, test_fraction=0.3, seed=4, stratify=True,
                           name="t")
    again = split_examples(y, val_fraction=0.2, test_fraction=0.3, seed=4, stratify=True,
                           name="t")
    other = split_examples(y, val_fraction=0.2, test_fraction=0.3, seed=5, stratify=True,
                           name="t")
    assert all(torch.equal(a, b) for a, b in zip(parts, again, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(parts, other, strict=True))
    every = torch.cat(parts)
    assert sorted(every.tolist()) == list(range(len(y)))  # a partition
    for part in parts:
        assert set(y[part].tolist()) == {0, 1, 2}
    train, val, test = parts
    assert (y[val] == 0).sum() == 10 and (y[test] == 0).sum() == 15  # proportions per class
    assert (y[val] == 2).sum() == 1 and (y[test] == 2).sum() == 2  # rounded, at least one


def test_split_refuses_a_class_too_small_for_three_parts():
    y = torch.tensor([0] * 10 + [7] * 2)
    with pytest.raises(DataError, match="class 7 has 2 example"):
        split_examples(y, val_fraction=0.2, test_fraction=0.2, seed=0, stratify=True, name="t")


def test_split_refuses_fractions_that_leave_nothing_to_train_on():
    with pytest.raises(Exception, match="val_fraction \\+ test_fraction = 0.9"):
        split_examples(torch.zeros(20), val_fraction=0.45, test_fraction=0.45, seed=0,
                       stratify=False, name="t")


def test_class_split_is_disjoint_and_seeded():
    groups = split_classes(list(range(30)), [20, 4, 6], seed=1, name="t")
    assert [len(g) for g in groups] == [20, 4, 6]
    assert len(set().union(*map(set, groups))) == 30
    assert groups == split_classes(list(range(30)), [20, 4, 6], seed=1, name="t")
    assert groups != split_classes(list(range(30)), [20, 4, 6], seed=2, name="t")
    with pytest.raises(DataError, match="needs 20 \\+ 4 \\+ 7 = 31 classes, the data has 30"):
        split_classes(list(range(30)), [20, 4, 7], seed=1, name="t")


def test_check_finite_names_the_first_bad_row():
    x = torch.ones(5, 3)
    x[3, 1] = math.nan
    x[4, 0] = math.inf
    with pytest.raises(DataError, match="feats: 2 example\\(s\\) hold NaN or infinite values "
                                        "\\(first: row 3\\)"):
        check_finite(x, "feats")
    check_finite(torch.ones(0, 3), "empty")  # nothing to check


def test_class_pool_without_shuffling_keeps_the_pool_labels():
    x = torch.arange(12.0).view(12, 1)
    y = torch.tensor([0, 1, 2] * 4)
    pool = ClassPool(x, y, [0, 1, 2], name="p")
    batch = pool.sample(5, 3, 2, 1, torch.Generator().manual_seed(0), shuffle_classes=False)
    # Every example sits under its own class: x mod 3 is the class of x.
    assert torch.equal(batch.support_x[..., 0].long() % 3, batch.support_y)
    assert torch.equal(batch.query_x[..., 0].long() % 3, batch.query_y)


class _Table(TargetTask):
    """A small target dataset built by the tests."""

    def __init__(self, x, y, kind, *, shots=2, queries=2, seed=0):
        super().__init__(shots=shots, queries=queries, val_fraction=0.25, test_fraction=0.25,
                         seed=seed)
        self.kind = kind
        self.set_data(x, y, self.split(y, "table"), name="table")


def test_target_task_classification_episodes():
    x = torch.randn(40, 3)
    y = torch.arange(40) % 4
    task = _Table(x, y, "classification")
    assert (task.output_size, task.train_classes, task.input_shape) == (4, 4, (3,))
    val, test = task.meta_val(), task.meta_test()
    assert len(val) == len(test) == 1
    assert torch.equal(val.support_x, test.support_x)  # both adapt on the train split
    seen = [set(map(tuple, e.tolist())) for e in (val.support_x[0], val.query_x[0],
                                                  test.query_x[0])]
    assert not (seen[0] & seen[1] or seen[0] & seen[2] or seen[1] & seen[2])
    batch = task.sample(3, torch.Generator().manual_seed(0))
    assert batch.support_x.shape == (3, 8, 3) and batch.query_x.shape == (3, 8, 3)
    rows = {tuple(r.tolist()): int(c) for r, c in zip(x, y, strict=True)}
    for xs, ys in ((batch.support_x, batch.support_y), (batch.query_x, batch.query_y)):
        for r, c in zip(xs.flatten(0, 1), ys.flatten(), strict=True):
            assert rows[tuple(r.tolist())] == int(c)  # fixed, global labels
            assert tuple(r.tolist()) in seen[0]  # from the train split only
    xl, yl = task.sample_labelled(16, torch.Generator().manual_seed(0))
    assert all(rows[tuple(r.tolist())] == int(c) for r, c in zip(xl, yl, strict=True))


def test_target_task_regression_episodes_come_from_the_train_split():
    x = torch.randn(30, 2)
    y = x.sum(1, keepdim=True)
    task = _Table(x, y, "regression", shots=3, queries=4)
    assert task.output_size == 1 and task.train_classes == 0
    batch = task.sample(5, torch.Generator().manual_seed(0))
    assert batch.support_y.shape == (5, 3, 1) and batch.query_y.shape == (5, 4, 1)
    torch.testing.assert_close(batch.support_x.sum(-1, keepdim=True), batch.support_y)
    train = set(map(tuple, task.meta_val().support_x[0].tolist()))
    assert set(map(tuple, batch.query_x.flatten(0, 1).tolist())) <= train


def test_target_task_refuses_bad_data():
    with pytest.raises(DataError, match="hold NaN"):
        _Table(torch.full((12, 2), math.nan), torch.arange(12) % 2, "classification")
    with pytest.raises(DataError, match="1 class\\(es\\)"):
        _Table(torch.randn(12, 2), torch.zeros(12, dtype=torch.long), "classification")
    with pytest.raises(DataError, match="fewer than shots \\+ queries"):
        _Table(torch.randn(12, 2), torch.arange(12) % 2, "classification", shots=5)
    with pytest.raises(DataError, match="train split, which has 6"):
        _Table(torch.randn(12, 2), torch.randn(12), "regression", shots=5)


class _Fixed:
    """An 'algorithm' whose predictions are given: evaluate() scores them."""

    def __init__(self, pred):
        self.pred = pred
        self.model = torch.nn.Linear(1, 1)

    def adapt_and_predict(self, episodes):
        return self.pred[: len(episodes)]


class _Kind:
    def __init__(self, metric, output_size=1):
        self.metric = metric
        self.output_size = output_size  # evaluate() checks predictions against it


def test_one_episode_is_scored_per_example_with_the_same_mean():
    target = torch.tensor([[0, 1, 1, 0, 1]])
    logits = torch.tensor([[[1.0, 0], [0, 1], [1, 0], [1, 0], [0, 1]]])  # 4 of 5 right
    episode = Episodes(torch.zeros(1, 2, 1), torch.zeros(1, 2, dtype=torch.long),
                       torch.zeros(1, 5, 1), target)
    task = _Kind(ACCURACY, output_size=2)
    assert scored_per_example(episode, task)
    scores = evaluate(_Fixed(logits), episode, task)
    assert scores.tolist() == [1, 1, 0, 1, 1]
    mean, half = mean_ci95(scores)
    assert mean == pytest.approx(float(ACCURACY(logits, target)))
    assert half > 0  # an interval over examples, where one episode has none

    pred, y = torch.randn(1, 6, 2), torch.randn(1, 6, 2)
    regression = Episodes(torch.zeros(1, 2, 1), torch.zeros(1, 2, 2), torch.zeros(1, 6, 1), y)
    scores = evaluate(_Fixed(pred), regression, _Kind(MSE, output_size=2))
    assert scores.shape == (6,)
    assert float(scores.mean()) == pytest.approx(float(MSE(pred, y)))


def test_many_episodes_are_scored_per_episode():
    pred, y = torch.randn(4, 6, 2), torch.randn(4, 6, 2)
    episodes = Episodes(torch.zeros(4, 2, 1), torch.zeros(4, 2, 2), torch.zeros(4, 6, 1), y)
    assert not scored_per_example(episodes, _Kind(MSE))
    torch.testing.assert_close(evaluate(_Fixed(pred), episodes, _Kind(MSE, output_size=2)),
                               MSE(pred, y))


# -- labelled_digest: what pre-training sees, and the split --------------------------------
class _Classes(FewShotTask):
    """A few-shot task over the given examples and class split."""

    def __init__(self, x, y, split=((0, 1, 2), (3, 4), (5, 6))):
        super().__init__(ways=2, shots=1, queries=1, val_episodes=2, test_episodes=2)
        self.input_shape = tuple(x.shape[1:])
        self.set_pools(*(ClassPool(x, y, classes, name=f"part {i}")
                         for i, classes in enumerate(split)))


def _examples(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(28, 1, 3, 3, generator=g), torch.arange(28) % 7  # 4 per class


def test_few_shot_digest_follows_the_meta_train_data_and_the_class_split():
    x, y = _examples()
    digest = _Classes(x, y).labelled_digest()
    assert len(digest) == 64 and int(digest, 16) >= 0  # sha256, hexadecimal
    assert _Classes(x.clone(), y.clone()).labelled_digest() == digest  # content, not identity
    assert _Classes(x.double(), y).labelled_digest() == digest  # canonical dtype
    val_changed = x.clone()
    val_changed[y == 3] += 1  # a meta-val class: pre-training never sees it
    assert _Classes(val_changed, y).labelled_digest() == digest
    changed = x.clone()
    changed[7, 0, 0, 0] += 1e-3  # one value of one meta-train example (class 0)
    assert _Classes(changed, y).labelled_digest() != digest
    reordered = _Classes(x, y, split=((0, 2, 1), (3, 4), (5, 6)))  # global labels change
    moved = _Classes(x, y, split=((0, 1, 2), (3, 5), (4, 6)))  # same meta-train data
    assert reordered.labelled_digest() != digest
    assert moved.labelled_digest() != digest


def test_target_digest_follows_the_train_split():
    x = torch.randn(40, 3)
    for y, kind in ((torch.arange(40) % 4, "classification"), (x.sum(1), "regression")):
        task = _Table(x, y, kind)
        digest = task.labelled_digest()
        assert _Table(x.clone(), y.clone(), kind).labelled_digest() == digest
        train = int(torch.nonzero(torch.isin(x, task.meta_val().support_x[0]).all(1))[0])
        changed = x.clone()
        changed[train, 0] += 1.0
        assert _Table(changed, y, kind).labelled_digest() != digest
        test = int(torch.nonzero(torch.isin(x, task.meta_test().query_x[0]).all(1))[0])
        changed = x.clone()
        changed[test, 0] += 1.0  # a test example: pre-training never sees it
        assert _Table(changed, y, kind).labelled_digest() == digest
        assert _Table(x, y, kind, seed=1).labelled_digest() != digest  # another split


def test_evaluation_chunks_are_bounded_in_bytes() -> None:
    """200 episodes of 80 images at 84 px would be 1.3 GB of float32: fewer at a time."""
    from autometa.task import IndexedEpisodes
    from autometa.trial import EVAL_BYTES, EVAL_CHUNK, eval_chunk

    class Images:
        input_shape = (3, 84, 84)

    index = torch.zeros(600, 5, dtype=torch.long), torch.zeros(600, 75, dtype=torch.long)
    big = IndexedEpisodes(index[0], index[0], index[1], index[1], gather=lambda i: i)
    size = eval_chunk(big, Images())  # type: ignore[arg-type]
    assert 1 <= size < EVAL_CHUNK and size * 80 * 4 * 3 * 84 * 84 <= EVAL_BYTES
    small = Episodes(torch.zeros(600, 5, 1), torch.zeros(600, 5), torch.zeros(600, 10, 1),
                     torch.zeros(600, 10))
    assert eval_chunk(small, Images()) == EVAL_CHUNK  # type: ignore[arg-type]
