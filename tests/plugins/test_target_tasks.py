"""Bundled target tasks: scikit-learn's iris, wine, breast cancer, and digits-vs-rest."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import autometa
import autometa_plugins.maml
import autometa_plugins.mlp
import autometa_plugins.sklearn_datasets
from autometa import create_host
from autometa.testing import check_task
from autometa_plugins.digits.task import DigitsVsRest
from autometa_plugins.sklearn_datasets.task import BreastCancer, Iris, Wine


@pytest.mark.parametrize(("cls", "sizes", "features", "classes"), [
    (Iris, (75, 30, 45), 4, 3),
    (Wine, (89, 36, 53), 13, 3),
    (BreastCancer, (285, 113, 171), 30, 2),
])
def test_sklearn_tasks(cls, sizes, features, classes):
    task = check_task(cls)
    assert (task.sizes["train"], task.sizes["val"], task.sizes["test"]) == sizes
    assert task.input_shape == (features,) and task.output_size == classes
    # Standardised with the train split's statistics only: exactly mean 0, std 1 there.
    train = task.meta_val().support_x[0].double()
    torch.testing.assert_close(train.mean(0), torch.zeros(features, dtype=torch.float64),
                               atol=1e-6, rtol=0)
    torch.testing.assert_close(train.std(0, unbiased=False),
                               torch.ones(features, dtype=torch.float64), atol=1e-5, rtol=0)
    held_out = torch.cat([task.meta_val().query_x[0], task.meta_test().query_x[0]]).double()
    assert held_out.mean(0).abs().max() > 1e-3  # not re-standardised on its own


def test_digits_vs_rest_is_binary_and_stratified_by_digit():
    from sklearn.datasets import load_digits

    task = check_task(DigitsVsRest, target=7)
    assert task.output_size == 2 and task.class_names == ["not 7", "7"]
    images = torch.tensor(load_digits().images, dtype=torch.float32) / 16.0
    digit_of = {tuple(im.flatten().tolist()): d for im, d in zip(images, load_digits().target,
                                                                 strict=True)}
    for x, y in ((task.meta_val().support_x[0], task.meta_val().support_y[0]),
                 (task.meta_test().query_x[0], task.meta_test().query_y[0])):
        digits = np.array([digit_of.get(tuple(im.flatten().tolist()), -1) for im in x])
        assert set(digits) == set(range(10))  # every digit in every part
        assert np.array_equal(digits == 7, y.numpy() == 1)


def test_a_target_task_search_ranks_on_val_and_reports_a_ci_over_test_examples(tmp_path):
    host = create_host(entry_points=False, plugins={
        "sklearn": autometa_plugins.sklearn_datasets, "maml": autometa_plugins.maml,
        "mlp": autometa_plugins.mlp})
    board = autometa.search("iris", host=host, algorithms=["maml"], sources=["mlp"],
                            n_trials=2, meta_steps=20, eval_every=10, seed=0,
                            algorithm_params={"maml": {"strategy": "loop"}},
                            storage=f"sqlite:///{tmp_path / 'a.db'}",
                            artifacts=str(tmp_path / "art"))
    frame = board.frame
    assert len(frame) == 2 and set(frame["test_ci_over"]) == {"examples"}
    assert set(frame["test_n"]) == {45}  # iris' test split
    # an accuracy over the test examples: Wilson's interval, named as such
    assert set(frame["test_ci_method"]) == {"wilson"}
    assert ((frame["test_ci_low"] <= frame["test_accuracy"])
            & (frame["test_accuracy"] <= frame["test_ci_high"])
            & (frame["test_ci_high"] <= 1)).all()
    assert "95% Wilson interval over 45 test examples" in board.to_markdown()
